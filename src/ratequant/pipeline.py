"""The RateQuant pipeline as library calls: statistics -> distortion table -> fit -> curves -> allocation -> plan.

:func:`calibrate` is what ``ratequant calibrate`` runs. Its pieces are separate so that ``compare`` captures
the statistics once and fits every quantizer design from them (:func:`fit_design`), and builds each design's
cost model the same way (:func:`cost_model_for`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ratequant.allocation import (
    DEFAULT_WIDTHS,
    Allocation,
    AllocationOptions,
    Budget,
    CostModel,
    Curves,
    allocate,
    check_reachable,
)
from ratequant.allocation.strategies import STRATEGIES
from ratequant.calibration import CalibrationStats, capture
from ratequant.data import Corpus
from ratequant.distortion import DEFAULT_METRIC, METRICS, DistortionTable, measure_distortion
from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import WindowProtocol, Windows, bos_token_id, make_windows
from ratequant.fitting import DistortionFit, fit_distortion
from ratequant.geometry import Geometry
from ratequant.kl_search import best_start, check_search_tokens, fixed_splits, kl_on, search_allocation
from ratequant.models import LoadedModel
from ratequant.plan import Plan
from ratequant.progress import progress_bar
from ratequant.quantizers import Quantizer, get_quantizer
from ratequant.spec import DEFAULT_RESIDUAL_LENGTH, KVQuantSpec, StoragePolicy
from ratequant.validation import check_bitset, check_int

DEFAULT_CONTEXT = 4096
CAPTURE_BATCH_SIZE = 1
"""Calibration windows per forward/backward pass: one keeps the backward's activations small."""
INFORMATIVE_PER = "kind"
SINK_CANDIDATES = (0, 1, 2, 4, 8, 16)
"""The sink-token counts ``sink_tokens="auto"`` chooses from."""
SINK_REFERENCE_BITS = 2
SINK_GAIN = 4.0
"""How informative widths are decided: ``"kind"`` (keys and values each) or ``"pooled"`` (both must pass)."""


def check_search_text(tokens: int, residual_length: int, sink_tokens: int | str) -> int:
    """:func:`ratequant.kl_search.check_search_tokens` before the sinks are chosen: ``"auto"`` counts as the most
    it can choose."""
    return check_search_tokens(tokens, residual_length, max(SINK_CANDIDATES) if sink_tokens == "auto" else sink_tokens)


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that decides a plan besides the model and corpus (validated on construction).

    ``strategy`` names the allocation strategy (:data:`ratequant.allocation.STRATEGIES`); ``curves_from`` the
    design whose distortion curves it allocates with (default: the quantizer's own; another one reproduces
    the paper's distortion-model mismatch).
    """

    quantizer: str = "kivi"
    quantizer_params: dict = field(default_factory=dict)
    budget: Budget = field(default_factory=lambda: Budget.avg_bits(4.0))
    metric: str = DEFAULT_METRIC
    strategy: str = "ratequant"
    curves_from: str | None = None
    bitset: tuple[int, ...] = DEFAULT_WIDTHS
    b_min: int | None = None
    b_max: int | None = None
    informative_only: bool = True  # drop widths worse than storing the mean (DistortionTable.informative_widths)
    seq_len: int = 512
    sequences: int = 4
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    sink_tokens: int | str = "auto"
    search_proposals: int = 0  # > 0: refine the allocation on the KL it causes (ratequant.kl_search); slow
    search_tokens: int = 1024
    search_seed: int = 0

    def __post_init__(self) -> None:
        METRICS.get(self.metric)
        STRATEGIES.get(self.strategy)
        if self.sink_tokens != "auto":
            check_int(self.sink_tokens, "sink tokens (a count, or 'auto')", lo=0, hi=1 << 16)
        object.__setattr__(self, "bitset", check_bitset(self.bitset))
        check_int(self.seq_len, "seq_len", lo=2)
        check_int(self.sequences, "sequences", lo=1)
        check_int(self.search_proposals, "search proposals", lo=0, hi=1 << 20)
        if self.search_proposals:
            check_search_text(self.search_tokens, self.residual_length, self.sink_tokens)
        else:
            check_int(self.search_tokens, "search tokens", lo=2)
        check_int(self.search_seed, "search seed", lo=0)
        self.policy()  # validates the design, its parameters, the residual window and the sinks
        if self.curves_from is not None:
            get_quantizer(self.curves_from)
        check_reachable(self.budget, self.bitset, self.b_min, self.b_max)  # before any measurement

    def design(self) -> Quantizer:
        return get_quantizer(self.quantizer, **self.quantizer_params)

    def policy(self, sink_tokens: int | None = None) -> StoragePolicy:
        """The storage policy; ``sink_tokens`` stands in for ``"auto"`` (0 until one is chosen)."""
        chosen = self.sink_tokens if sink_tokens is None else sink_tokens
        return StoragePolicy(self.design(), self.residual_length, 0 if chosen == "auto" else chosen)


@dataclass(frozen=True, eq=False)
class DesignFit:
    """A design's measured distortion table (all widths), its fit and allocation curves (informative widths)."""

    design: str
    table: DistortionTable
    fit: DistortionFit
    curves: Curves
    seconds: dict[str, float]


@dataclass
class CalibrationRun:
    """A finished calibration: the plan plus the evidence behind it."""

    plan: Plan
    table: DistortionTable
    fit: DistortionFit
    curves: Curves
    allocation: Allocation
    phases: dict[str, float]


def collect_statistics(
    loaded: LoadedModel, corpus: Corpus, *, seq_len: int = 512, sequences: int = 4, metric: str = DEFAULT_METRIC
) -> CalibrationStats:
    """Capture keys and values (and the gradients or queries ``metric`` needs) on ``sequences`` windows of the
    calibration split, cut by the evaluation protocol (BOS first where the tokenizer adds one), in passes of
    :data:`CAPTURE_BATCH_SIZE` windows."""
    needs = METRICS.get(metric)
    windows = make_windows(loaded.tokenizer, corpus.calibration, WindowProtocol(seq_len, sequences))
    ids = windows.ids.to(loaded.device)
    parts = []
    with progress_bar(total=ids.shape[0], desc="capture", unit="window") as bar:
        for start in range(0, ids.shape[0], CAPTURE_BATCH_SIZE):
            batch = ids[start : start + CAPTURE_BATCH_SIZE]
            parts.append(capture(loaded.model, batch, gradients=needs.needs_gradients, queries=needs.needs_queries))
            bar.update(batch.shape[0])
    return parts[0] if len(parts) == 1 else CalibrationStats.concat(parts)


def choose_sink_tokens(
    stats: CalibrationStats, quantizer: Quantizer, metric: str = DEFAULT_METRIC, bits: int = SINK_REFERENCE_BITS
) -> tuple[int, dict[int, float]]:
    """How many first tokens to keep at full precision (the attention sink), from the calibration data alone.

    For every candidate ``S`` of :data:`SINK_CANDIDATES` the summed distortion ``D(S)`` of all components at
    ``bits`` with the first ``S`` tokens unquantized. Keeping ordinary tokens aside lowers ``D`` by about their
    share of it; a sink lowers it by far more (its outlier values stretch the quantization ranges). ``S`` grows
    from 0 through the candidates while each step removes more than :data:`SINK_GAIN` times the distortion of
    as many average tokens. Returns ``(S, {S: D(S)})``. A sink token costs ``head_dim`` values per component once
    per sequence: negligible at long contexts.
    """
    tokens = stats.keys.shape[3]
    totals = {
        s: float(measure_distortion(stats, quantizer, (bits,), metric, sink_tokens=s).values.sum())
        for s in SINK_CANDIDATES
        if s < tokens // 2
    }
    per_token = totals[0] / tokens
    chosen = 0
    for s in sorted(totals)[1:]:
        if totals[chosen] - totals[s] <= SINK_GAIN * (s - chosen) * per_token:
            break
        chosen = s
    return chosen, totals


def fit_design(
    stats: CalibrationStats,
    quantizer: Quantizer,
    *,
    metric: str = DEFAULT_METRIC,
    bitset=(1, 2, 3, 4, 5, 6, 7, 8),
    informative_only: bool = True,
    sink_tokens: int = 0,
) -> DesignFit:
    """Measure ``quantizer``'s distortion table on ``stats`` over ``bitset`` and fit D(b) = alpha * beta^-b.

    With ``informative_only`` the fit, and so the widths an allocation may use (the curves' ``min_bits``),
    leave out the widths :meth:`DistortionTable.informative_widths` rejects; the table covers all of ``bitset``.
    """
    start = time.perf_counter()
    table = measure_distortion(stats, quantizer, bitset, metric, sink_tokens=sink_tokens)
    measured = time.perf_counter()
    widths = table.informative_widths(INFORMATIVE_PER) if informative_only else (table.bitset, table.bitset)
    # a kind needs two widths to fit its slope: fall back to the two widest
    low = tuple(min(w[0], table.bitset[-2]) for w in widths)
    fitted = tuple(b for b in table.bitset if b >= min(low))
    fit = fit_distortion(table.values[..., [table.bitset.index(b) for b in fitted]], fitted, min_bits=low)
    curves = Curves.from_fit(fit, fitted, design=quantizer.name, label=metric, min_bits=low)
    seconds = {"distortion": measured - start, "fit": time.perf_counter() - measured}
    return DesignFit(quantizer.name, table, fit, curves, seconds)


def cost_model_for(
    policy: StoragePolicy, loaded: LoadedModel, context_tokens: int, bitset=(1, 2, 3, 4, 5, 6, 7, 8)
) -> CostModel:
    """True bytes per token of ``policy`` on ``loaded`` at ``context_tokens`` (full-precision tokens kept in the
    model's dtype)."""
    return CostModel.from_policy(policy, loaded.geometry, context_tokens, itemsize=loaded.dtype.itemsize, bitset=bitset)


def covered_widths(bitset, curves: Curves) -> tuple[int, ...]:
    """The widths of ``bitset`` the curves cover (all of the curves' when none is)."""
    return tuple(b for b in bitset if b in curves.bitset) or curves.bitset


def allocate_for(
    settings: CalibrationSettings, curves: Curves, geometry: Geometry, cost_model: CostModel
) -> Allocation:
    """Run the settings' strategy on ``curves`` within the settings' widths."""
    if curves.shape != geometry.shape:
        raise RateQuantError(f"the curves cover components {curves.shape} but the model has {geometry.shape}")
    options = AllocationOptions(
        bitset=covered_widths(settings.bitset, curves),
        b_min=settings.b_min,
        b_max=settings.b_max,
        cost_model=cost_model,
    )
    return allocate(curves, settings.budget, settings.strategy, options)


def search_windows(loaded: LoadedModel, corpus: Corpus, tokens: int) -> Windows:
    """The text the KL search scores: the first two windows of ``tokens`` tokens of the calibration split (BOS
    first where the tokenizer adds one), every position scored; the search moves on the first and keeps its
    moves only if they help on the second too."""
    return make_windows(loaded.tokenizer, corpus.calibration, WindowProtocol(tokens, 2, "auto", "all"))


def search_widths(curves: Curves, bitset, b_min: int | None = None, b_max: int | None = None):
    """``(key widths, value widths)`` a search may move among: those of ``bitset`` the curves cover, within
    ``b_min..b_max``, each kind's informative ones."""
    return curves.restrict(covered_widths(bitset, curves), b_min, b_max).kind_widths()


def refine_allocation(
    loaded: LoadedModel,
    windows: Windows,
    policy: StoragePolicy,
    curves: Curves,
    cost_model: CostModel,
    allocation: Allocation,
    *,
    proposals: int,
    widths: tuple[tuple[int, ...], tuple[int, ...]],
    seed: int = 0,
) -> tuple[Allocation, dict]:
    """``allocation`` refined by :func:`ratequant.kl_search.search_allocation` (``proposals`` moves, ``seed``)
    on the first of ``windows`` (:func:`search_windows`), within ``widths`` (:func:`search_widths`), from the
    allocation or the fixed key/value split of its size that causes less KL there; the moves found are kept only
    if they also lower the KL on the second window (else the result is that start). Returns it with the
    search's record (for a plan's calibration record)."""
    check_search_tokens(windows.protocol.seq_len, policy.residual_length, policy.sink_tokens)
    spec = KVQuantSpec(
        allocation.bits, policy.quantizer, residual_length=policy.residual_length, sink_tokens=policy.sink_tokens
    )
    search, held_out = (Windows(ids, windows.protocol, windows.bos_token_id) for ids in windows.ids.split(1))
    kl = kl_on(loaded.model, search)
    starts = {allocation.method: np.array(allocation.bits), **fixed_splits(allocation.bits, widths, cost_model)}
    first, start_kls = best_start(kl, spec, starts)
    result = search_allocation(
        kl,
        replace(spec, bits=starts[first]),
        curves,
        cost_model,
        proposals=proposals,
        widths=widths,
        seed=seed,
        start_kl=start_kls[first],
    )
    bits, record = starts[first], {}
    if result.accepted:  # the moves are kept only if they also lower the KL on the held-out window
        check = kl_on(loaded.model, held_out)
        before, after = check(replace(spec, bits=bits)), check(replace(spec, bits=result.bits))
        record = {"search_held_out_kl_start": before, "search_held_out_kl": after, "search_kept": after < before}
        bits = result.bits if after < before else bits
    record = {
        **result.summary(),
        **record,
        "search_tokens": int(search.ids.numel()),
        "search_start": first,
        **{f"search_kl_{name}": value for name, value in start_kls.items()},
    }
    refined = Allocation(
        bits=bits,
        avg_bits=float(bits.mean()),
        bytes_per_token=cost_model.bytes_per_token(bits),
        predicted_distortion=curves.total(bits) if curves.predicts else None,
        method=f"{allocation.method}+kl-search",
        details={**allocation.details, "search": record},
    )
    return refined, record


def calibrate(loaded: LoadedModel, corpus: Corpus, settings: CalibrationSettings) -> CalibrationRun:
    """Statistics, distortion table, fit, allocation and plan for ``loaded`` on ``corpus``'s calibration split."""
    phases: dict[str, float] = {}
    search = search_windows(loaded, corpus, settings.search_tokens) if settings.search_proposals else None
    start = time.perf_counter()
    stats = collect_statistics(
        loaded, corpus, seq_len=settings.seq_len, sequences=settings.sequences, metric=settings.metric
    )
    phases["capture"] = time.perf_counter() - start
    sinks, sink_totals = settings.sink_tokens, None
    if sinks == "auto":
        start = time.perf_counter()
        sinks, sink_totals = choose_sink_tokens(stats, settings.design(), settings.metric)
        phases["sink_tokens"] = time.perf_counter() - start
    policy = settings.policy(sinks)
    curves_design = get_quantizer(settings.curves_from) if settings.curves_from else policy.quantizer
    fitted = fit_design(
        stats,
        curves_design,
        metric=settings.metric,
        bitset=settings.bitset,
        informative_only=settings.informative_only,
        sink_tokens=policy.sink_tokens,
    )
    phases.update(fitted.seconds)
    start = time.perf_counter()
    context = settings.budget.context_tokens or DEFAULT_CONTEXT
    cost_model = cost_model_for(policy, loaded, context, settings.bitset)
    allocation = allocate_for(settings, fitted.curves, loaded.geometry, cost_model)
    phases["allocation"] = time.perf_counter() - start
    searched = {}
    if settings.search_proposals:
        start = time.perf_counter()
        allocation, searched = refine_allocation(
            loaded,
            search,
            policy,
            fitted.curves,
            cost_model,
            allocation,
            proposals=settings.search_proposals,
            widths=search_widths(fitted.curves, settings.bitset, settings.b_min, settings.b_max),
            seed=settings.search_seed,
        )
        phases["search"] = time.perf_counter() - start
    table, fit = fitted.table, fitted.fit
    plan = Plan.from_allocation(
        allocation,
        model_name=loaded.name,
        geometry=loaded.geometry,
        quantizer=policy.quantizer,
        budget=settings.budget,
        fit=fit,
        metric=settings.metric,
        fit_design=curves_design.name,
        measured=table.values[..., [table.bitset.index(b) for b in fit.bitset]],
        residual_length=policy.residual_length,
        sink_tokens=policy.sink_tokens,
        calibration={
            "corpus": corpus.name,
            "corpus_sha256": corpus.sha256,
            "tokens": stats.token_count,
            "seconds": sum(phases.values()),
            "phases": dict(phases),
            "bos_token_id": bos_token_id(loaded.tokenizer),
            "sink_tokens_chosen": "auto" if sink_totals else "given",
            **searched,
        },
    )
    return CalibrationRun(plan=plan, table=table, fit=fit, curves=fitted.curves, allocation=allocation, phases=phases)


def bits_histogram(bits: np.ndarray) -> dict[int, int]:
    """``{width: count}`` of an integer bit array."""
    widths, counts = np.unique(np.asarray(bits), return_counts=True)
    return {int(w): int(c) for w, c in zip(widths, counts)}
