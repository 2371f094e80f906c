"""The methods a comparison scores: every way of spending a budget, as typed records with their conditions.

At every budget (average code bits) and for every quantizer design:

* ``uniform`` -- one width for every component (only when the budget is a width of the bit set);
* ``kv-split`` -- one width for keys and one for values, every ``K{k}V{v}`` with ``k != v``,
  ``|k - v| <= split_max_gap`` and ``(k + v) / 2 == budget`` ("Quantize What Counts", arXiv:2502.15075);
* ``layerwise`` -- one width per layer, allocated on the design's curves (KVTuner-style);
* ``ratequant`` -- a width per component, the exact integer optimum of the design's own fitted curves
  D(b) = alpha * beta^-b (RateQuant, arXiv:2605.06675);
* ``mismatched`` -- the same allocation on *another* design's curves, stored with this design: the paper's
  distortion-model-mismatch failure mode (the curves' provenance, :class:`~ratequant.allocation.Curves`);
* ``ratequant-search`` (when asked for) -- RateQuant's widths refined on the KL they cause on calibration text
  (:func:`ratequant.calibration.pipeline.refine_allocation`, what ``calibrate --search`` does);

and, per budget (design-independent), rank reduction ("Quantization dominates rank reduction for KV-cache
compression"): ``rank`` keeps ``r = floor(budget * head_dim / 16)`` PCA coefficients per token at 16 bits,
and ``rank+quant`` the largest ``r`` whose coefficients, quantized by ``hybrid_design`` at ``hybrid_bits``
*including its per-token metadata*, fit the same ``budget * head_dim`` bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ratequant.allocation import Allocation, AllocationOptions, Budget, CostModel, Curves, allocate, get_strategy
from ratequant.allocation.fitting import DistortionFit
from ratequant.calibration import DesignFit, cost_model_for, covered_widths
from ratequant.errors import BudgetError
from ratequant.evaluation.conditions import Condition, Simulated, Streaming, Within
from ratequant.geometry import KINDS
from ratequant.inputs.models import LoadedModel
from ratequant.lab.config import (
    ALLOCATED_METHODS,
    CompareConfig,
    budget_text,
)
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec, StoragePolicy


@dataclass(frozen=True, eq=False)
class Method:
    """A method to score: what it is (``method``, ``label``, ``design``, ``budget``), what it stores
    (``avg_bits``, mean ``key_bits`` and ``value_bits``, true ``kv_bytes_per_token``; ``bits [2, L, H]`` where
    the widths vary), and how the model runs under it (``condition``)."""

    method: str
    label: str
    design: str | None
    budget: float | None
    avg_bits: float
    key_bits: float | None
    value_bits: float | None
    kv_bytes_per_token: float
    condition: Condition | None
    details: dict = field(default_factory=dict)
    bits: np.ndarray | None = None


@dataclass(frozen=True)
class Skipped:
    """A method that could not be built at a budget, and why."""

    method: str
    label: str
    design: str | None
    budget: float
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def uniform_label(budget: float) -> str:
    """The label of the uniform scheme at ``budget`` bits: ``"uniform 2"``."""
    return f"uniform {budget_text(budget)}"


def condition_for(spec: KVQuantSpec, config: CompareConfig, label: str) -> Condition:
    """How a quantized method runs: simulated quantization, or the real cache (``config.mode``)."""
    if config.mode == "streaming":
        return Streaming(spec, config.prefill_chunk, label=label)
    return Simulated(spec, config.prefill_chunk or 1, label=label)


def pick_mismatch_sources(fits: dict[str, DistortionFit]) -> dict[str, str | None]:
    """For each design, the other design whose ``(beta_key, beta_value)`` is farthest (Euclidean) from its own."""
    out: dict[str, str | None] = {}
    for name, fit in fits.items():
        others = [
            (math.hypot(fit.beta_key - o.beta_key, fit.beta_value - o.beta_value), other)
            for other, o in fits.items()
            if other != name
        ]
        out[name] = max(others)[1] if others else None
    return out


@dataclass(frozen=True, eq=False)
class Allocated:
    """A further allocated method of a design: ``method`` name, ``label``, its curves and strategy."""

    method: str
    label: str
    curves: Curves
    strategy: str


Refine = Callable[[Allocation, Curves, CostModel, StoragePolicy], tuple[Allocation, dict]]
"""``(allocation, curves, cost model, policy) -> (refined allocation, record)``: how ``ratequant-search`` refines
RateQuant's widths."""


def quantized_methods(
    config: CompareConfig,
    loaded: LoadedModel,
    design: DesignFit,
    policy: StoragePolicy,
    source: DesignFit | None,
    skipped: list[Skipped],
    extra: tuple[Allocated, ...] = (),
    refine: Refine | None = None,
) -> list[Method]:
    """Every quantized method of ``design`` stored under ``policy``, at every budget (``source``: the design whose
    curves the mismatched allocation uses; ``extra``: peers and diagnostics; ``refine``: how ``ratequant-search``
    refines RateQuant's widths, None: not scored); methods that cannot meet a budget go to ``skipped``."""
    bitset = config.calibration.bitset
    cost = cost_model_for(policy, loaded, config.context_tokens, bitset)
    fixed = AllocationOptions(bitset=bitset, cost_model=cost)  # fixed schemes use the widths they name
    allocated = AllocationOptions(bitset=covered_widths(bitset, design.curves), cost_model=cost)
    plain = Curves.from_fit(design.fit, bitset, design=design.design, label=config.calibration.metric)
    methods: list[Method] = []

    def add(
        method: str,
        label: str,
        budget: float,
        curves: Curves,
        strategy,
        options: AllocationOptions,
        refined: Refine | None = None,
    ) -> None:
        if not config.scores(method):
            return
        start = time.perf_counter()
        try:
            alloc = allocate(curves, Budget.avg_bits(budget), strategy, options)
        except BudgetError as exc:
            skipped.append(Skipped(method, label, design.design, budget, str(exc)))
            return
        search = {}
        if refined is not None:
            alloc, search = refined(alloc, curves, cost, policy)
        spec = KVQuantSpec(alloc.bits, policy.quantizer, policy.residual_length, policy.sink_tokens)
        details = {
            "allocation_seconds": time.perf_counter() - start,
            "quantizer": policy.quantizer.to_config(),
            "residual": policy.residual_length,
            "sink_tokens": policy.sink_tokens,
            "context_tokens": config.context_tokens,
            "predicted_distortion": alloc.predicted_distortion,
            "curves": alloc.details["curves"],
            **({"search": search} if search else {}),
        }
        methods.append(
            Method(
                method,
                label,
                design.design,
                budget,
                alloc.avg_bits,
                float(alloc.bits[0].mean()),
                float(alloc.bits[1].mean()),
                float(alloc.bytes_per_token),
                condition_for(spec, config, label),
                details,
                alloc.bits if method in ALLOCATED_METHODS else None,
            )
        )

    for budget in config.budgets:
        if float(budget).is_integer() and int(budget) in config.calibration.bitset:
            add("uniform", uniform_label(budget), budget, plain, "uniform", fixed)
        else:
            skipped.append(
                Skipped(
                    "uniform",
                    "uniform",
                    design.design,
                    budget,
                    f"{budget_text(budget)} is not a width in {list(config.calibration.bitset)}",
                )
            )
        for k, v in config.kv_splits(budget):
            add("kv-split", f"K{k}V{v}", budget, plain, get_strategy("kv-split", key_bits=k, value_bits=v), fixed)
        add("layerwise", "layerwise", budget, design.curves, "layerwise", allocated)
        add("ratequant", "RateQuant", budget, design.curves, "ratequant", allocated)
        if refine is not None:
            add("ratequant-search", "RateQuant + KL search", budget, design.curves, "ratequant", allocated, refine)
        if source is None:
            skipped.append(
                Skipped("mismatched", "mismatched", design.design, budget, "needs a second design whose curves to use")
            )
        else:
            add(
                "mismatched",
                f"mismatched ({source.design} curves)",
                budget,
                source.curves,
                "ratequant",
                AllocationOptions(bitset=source.curves.bitset, cost_model=cost),
            )
        for peer in extra:
            add(peer.method, peer.label, budget, peer.curves, peer.strategy, allocated)
    return methods


def hybrid_rank(budget_bits_per_token: float, quantizer, coefficient_bits: int, head_dim: int) -> int:
    """Largest ``r <= head_dim`` whose ``r`` coefficients at ``coefficient_bits``, quantized by ``quantizer``
    *with its per-token metadata*, fit ``budget_bits_per_token`` bits (both kinds must fit)."""
    for r in range(head_dim, 0, -1):
        cost = max(quantizer.bits_per_token(r, coefficient_bits, kind) for kind in KINDS)
        if cost <= budget_bits_per_token + 1e-9:
            return r
    return 0


def rank_methods(
    config: CompareConfig, loaded: LoadedModel, bases, skipped: list[Skipped] | None = None
) -> tuple[list[Method], dict]:
    """Rank reduction (16-bit coefficients) and the rank-plus-quantization hybrid at every budget; a method whose
    rank would be 0 at a budget (small heads: not one coefficient fits) goes to ``skipped`` instead."""
    from ratequant.measure.rank import rank_for_bits, simulated_rank_reduction

    g = loaded.geometry
    model, d, n = loaded.model, g.head_dim, g.num_components
    hybrid = get_quantizer(config.hybrid_design)
    methods, info = [], {}

    def basis_bytes(r: int) -> int:
        return n * (d + d * r) * 2  # mean + r directions per component, float16: a per-model constant

    for budget in config.budgets:
        bits_per_token = budget * d
        r = rank_for_bits(bits_per_token, coefficient_bits=16)
        r_h = hybrid_rank(bits_per_token, hybrid, config.hybrid_bits, d)
        hb = config.hybrid_bits

        def quantize(c, hb=hb):
            return hybrid.fake_quantize(c, hb, "value")

        info[budget_text(budget)] = {"rank": r, "hybrid_rank": r_h, "bits_per_token_per_component": bits_per_token}
        for method, rank, coefficient in (("rank", r, 16), ("rank+quant", r_h, hb)):
            if rank == 0:  # small heads: a method that would store nothing is left out, before any evaluation
                reason = (
                    f"not one {coefficient}-bit coefficient (with its metadata) fits the {bits_per_token:g} bits per "
                    f"token of a {d}-dimensional head"
                )
                if skipped is not None:
                    skipped.append(Skipped(method, method, None, budget, reason))
        if r:
            label = f"rank {r} (16-bit)"
            methods.append(
                Method(
                    "rank",
                    label,
                    None,
                    budget,
                    r * 16 / d,
                    None,
                    None,
                    n * r * 2.0,
                    Within(lambda r=r: simulated_rank_reduction(model, bases, r), label=label),
                    {"rank": r, "coefficient_bits": 16, "basis_bytes": basis_bytes(r)},
                )
            )
        if r_h:
            hybrid_bytes = sum(hybrid.bits_per_token(r_h, hb, kind) for kind in KINDS) / 8 * (n // 2)
            label = f"rank {r_h} + {config.hybrid_design} {hb}-bit"
            methods.append(
                Method(
                    "rank+quant",
                    label,
                    None,
                    budget,
                    r_h * hb / d,
                    None,
                    None,
                    hybrid_bytes,
                    Within(
                        lambda r_h=r_h: simulated_rank_reduction(model, bases, r_h, quantize=quantize),
                        label=label,
                    ),
                    {
                        "rank": r_h,
                        "coefficient_bits": hb,
                        "coefficient_design": config.hybrid_design,
                        "basis_bytes": basis_bytes(r_h),
                    },
                )
            )
    return methods, info


__all__ = [
    "Allocated",
    "Method",
    "Refine",
    "Skipped",
    "hybrid_rank",
    "pick_mismatch_sources",
    "quantized_methods",
    "rank_methods",
    "uniform_label",
]
