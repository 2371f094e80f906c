"""The RateQuant pipeline as library calls: statistics -> distortion table -> fit -> allocation -> plan.

``calibrate`` is what ``ratequant calibrate`` runs. Its pieces are separate so that ``compare`` can capture
the statistics once and fit every quantizer design from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ratequant.allocation import ALLOCATORS, Allocation, Budget, CostModel
from ratequant.calibration import CalibrationStats, capture
from ratequant.data import Corpus, token_windows
from ratequant.distortion import DEFAULT_METRIC, METRICS, DistortionTable, measure_distortion
from ratequant.errors import RateQuantError
from ratequant.fitting import DistortionFit, fit_distortion
from ratequant.models import LoadedModel
from ratequant.plan import Plan
from ratequant.quantizers import Quantizer, get_quantizer

DEFAULT_RESIDUAL = 128
DEFAULT_CONTEXT = 4096
CAPTURE_BATCH_SIZE = 1
"""Calibration windows per forward/backward pass: one keeps the backward's activations small."""


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that decides a plan besides the model and corpus (validated on construction)."""

    quantizer: str = "kivi"
    quantizer_params: dict = field(default_factory=dict)
    budget: Budget = field(default_factory=lambda: Budget.avg_bits(4.0))
    metric: str = DEFAULT_METRIC
    allocator: str = "ratequant"
    curves_from: str | None = None  # design whose curves a "mismatched" allocation uses
    bitset: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    b_min: int | None = None
    b_max: int | None = None
    use: str = "fit"
    informative_only: bool = True  # drop widths worse than storing the mean (see informative_widths)
    seq_len: int = 512
    sequences: int = 4
    residual_length: int = DEFAULT_RESIDUAL

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise RateQuantError(f"unknown metric {self.metric!r}; choose one of: {', '.join(METRICS)}")
        if self.allocator not in ALLOCATORS:
            raise RateQuantError(f"unknown allocator {self.allocator!r}; choose one of: {', '.join(ALLOCATORS)}")
        if self.allocator == "mismatched" and not self.curves_from:
            raise RateQuantError("the mismatched allocator needs the design whose curves it uses (--curves-from)")
        if self.curves_from and self.allocator != "mismatched":
            raise RateQuantError("--curves-from only applies to the mismatched allocator")
        for name in ("seq_len", "sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seq_len" else 1):
                raise RateQuantError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.residual_length, bool) or not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise RateQuantError(f"residual length must be a non-negative integer, got {self.residual_length!r}")
        self.design()  # validates the quantizer name and parameters
        from ratequant.allocation import check_reachable
        from ratequant.cache import chunk_sizes

        chunk_sizes(self.design(), self.residual_length)  # a residual window the design can use
        check_reachable(self.budget, self.bitset, self.b_min, self.b_max)  # before any measurement

    def design(self) -> Quantizer:
        return get_quantizer(self.quantizer, **self.quantizer_params)


@dataclass
class CalibrationRun:
    """A finished calibration: the plan plus the evidence behind it."""

    plan: Plan
    table: DistortionTable
    fit: DistortionFit
    allocation: Allocation
    phases: dict[str, float]


def collect_statistics(
    loaded: LoadedModel, corpus: Corpus, *, seq_len: int = 512, sequences: int = 4, gradients: bool = True, queries: bool = False
) -> CalibrationStats:
    """Capture keys, values (and gradients, queries) on ``sequences`` windows of the calibration split, in
    passes of :data:`CAPTURE_BATCH_SIZE` windows."""
    windows = token_windows(loaded.tokenizer, corpus.calibration, seq_len, sequences)
    return capture(
        loaded.model, windows.to(loaded.device), gradients=gradients, queries=queries, batch_size=CAPTURE_BATCH_SIZE
    )


def informative_widths(stats: CalibrationStats, quantizer: Quantizer, bitset) -> tuple[int, ...]:
    """The widths of ``bitset`` at which ``quantizer`` reconstructs the calibration keys and values better than
    storing each channel's mean would: pooled per kind, ``sum (X - Q_b(X))^2 < sum (X - mean_tokens(X))^2``.

    A width that fails carries no information about the tensor (1-bit min-max keeps only each group's
    extremes and does worse than the mean); its damage also departs from the exponential model, so the
    allocator must not trade bits down to it. Error falls with the width, so the lowest passing width
    and everything above it are kept.
    """
    bitset = tuple(sorted(bitset))
    keep = stats.attention_mask[None, :, None, :, None].to(stats.keys.dtype)  # [1, B, 1, T, 1]
    tokens = keep.sum(dim=3, keepdim=True)
    for i, bits in enumerate(bitset):
        informative = True
        for kind in ("key", "value"):
            x = stats.tensor(kind)  # [L, B, H, T, D]
            mean = (x * keep).sum(dim=3, keepdim=True) / tokens
            spread = ((x - mean).square() * keep).sum()
            x_hat = quantizer.fake_quantize(x.flatten(0, 1), bits, kind).view_as(x)
            informative &= bool(((x - x_hat).square() * keep).sum() < spread)
        if informative:
            return bitset[i:]
    return bitset[-1:]


def fit_design(
    stats: CalibrationStats,
    quantizer: Quantizer,
    *,
    metric: str = DEFAULT_METRIC,
    bitset=(1, 2, 3, 4, 5, 6, 7, 8),
    informative_only: bool = True,
) -> tuple[DistortionTable, DistortionFit, dict[str, float]]:
    """Measure ``quantizer``'s distortion table on ``stats`` over ``bitset`` and fit D(b) = alpha * beta^-b.

    With ``informative_only`` the fit, and so the widths an allocation may use (``fit.bitset``), leave out
    the widths :func:`informative_widths` rejects; the returned table still covers all of ``bitset``.
    """
    start = time.perf_counter()
    table = measure_distortion(stats, quantizer, bitset, metric)
    measured = time.perf_counter()
    widths = informative_widths(stats, quantizer, table.bitset) if informative_only else table.bitset
    if len(widths) < 2:
        widths = table.bitset[-2:]
    columns = [table.bitset.index(b) for b in widths]
    fit = fit_distortion(table.values[..., columns], widths)
    return table, fit, {"distortion": measured - start, "fit": time.perf_counter() - measured}


def cost_model_for(quantizer: Quantizer, loaded: LoadedModel, settings: CalibrationSettings) -> CostModel:
    """True bytes per token under ``settings`` (the residual window is kept in the model's dtype)."""
    return CostModel.from_quantizer(
        quantizer, loaded.geometry, residual_length=settings.residual_length,
        context_tokens=settings.budget.context_tokens or DEFAULT_CONTEXT, kv_dtype_bytes=loaded.dtype.itemsize,
        bitset=settings.bitset,
    )


def allocate(
    settings: CalibrationSettings, fit: DistortionFit, geometry, cost_model: CostModel, *, source_design: str | None = None
) -> Allocation:
    """Run the settings' allocator on ``fit`` (the curves of ``source_design`` for mismatched plans)."""
    widths = tuple(b for b in settings.bitset if b in fit.bitset)
    options = dict(bitset=widths, b_min=settings.b_min, b_max=settings.b_max, cost_model=cost_model, use="fit")
    if settings.allocator == "mismatched":
        options["source_design"] = source_design
    return ALLOCATORS[settings.allocator](fit, settings.budget, geometry, **options)


def calibrate(loaded: LoadedModel, corpus: Corpus, settings: CalibrationSettings) -> CalibrationRun:
    """Statistics, distortion table, fit, allocation and plan for ``loaded`` on ``corpus``'s calibration split."""
    phases: dict[str, float] = {}
    start = time.perf_counter()
    stats = collect_statistics(
        loaded, corpus, seq_len=settings.seq_len, sequences=settings.sequences,
        gradients=settings.metric == "fisher", queries=settings.metric == "attention",
    )
    phases["capture"] = time.perf_counter() - start
    quantizer = settings.design()
    curves_design = get_quantizer(settings.curves_from) if settings.curves_from else quantizer
    table, fit, fit_phases = fit_design(
        stats, curves_design, metric=settings.metric, bitset=settings.bitset, informative_only=settings.informative_only
    )
    phases.update(fit_phases)
    start = time.perf_counter()
    cost_model = cost_model_for(quantizer, loaded, settings)
    allocation = allocate(settings, fit, loaded.geometry, cost_model, source_design=curves_design.name)
    phases["allocation"] = time.perf_counter() - start
    total = sum(phases.values())
    plan = Plan.from_allocation(
        allocation,
        model_name=loaded.name,
        geometry=loaded.geometry,
        quantizer=quantizer,
        budget=settings.budget,
        fit=fit,
        metric=settings.metric,
        fit_design=curves_design.name,
        measured=table.values[..., [table.bitset.index(b) for b in fit.bitset]],
        residual_length=settings.residual_length,
        calibration={
            "corpus": corpus.name,
            "corpus_sha256": corpus.sha256,
            "tokens": stats.token_count,
            "seconds": total,
            "phases": dict(phases),
        },
    )
    return CalibrationRun(plan=plan, table=table, fit=fit, allocation=allocation, phases=phases)


def bits_histogram(bits: np.ndarray) -> dict[int, int]:
    """``{width: count}`` of an integer bit array."""
    widths, counts = np.unique(np.asarray(bits), return_counts=True)
    return {int(w): int(c) for w, c in zip(widths, counts)}
