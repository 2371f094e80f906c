"""The RateQuant pipeline as library calls: statistics -> distortion table -> fit -> curves -> allocation -> plan.

:func:`calibrate` is what ``ratequant calibrate`` runs. Its pieces are separate so that ``compare`` captures
the statistics once and fits every quantizer design from them (:func:`fit_design`), and builds each design's
cost model the same way (:func:`cost_model_for`).

One module of this size because the stages pass each other a few shared types (:class:`DesignFit`,
:class:`DesignCalibration`, :class:`CalibrationRun`) and each stage is a short function; the settings, the candidates
and the search have modules of their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ratequant.allocation import (
    Allocation,
    AllocationOptions,
    Budget,
    CostModel,
    Curves,
    allocate,
)
from ratequant.allocation.fitting import DistortionFit, fit_distortion
from ratequant.calibration.candidates import (
    MEASURED,
    Candidate,
    choose_candidate,
    held_out_windows,
    split_allocations,
)
from ratequant.calibration.search import best_start, check_search_tokens, kl_on, search_allocation, window_kl
from ratequant.calibration.settings import (
    AUTO,
    AUTO_REFERENCE,
    CAPTURE_BATCH_SIZE,
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_SEQUENCES,
    SINK_CANDIDATES,
    SINK_GAIN,
    SINK_REFERENCE_BITS,
    CalibrationSettings,
)
from ratequant.errors import BudgetError, RateQuantError
from ratequant.evaluation.protocol import WindowProtocol, Windows, bos_token_id, make_windows
from ratequant.geometry import Geometry
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.measure.capture import CalibrationStats, capture
from ratequant.measure.distortion import DEFAULT_METRIC, METRICS, DistortionTable, measure_distortion
from ratequant.plan import Plan
from ratequant.progress import note, progress_bar
from ratequant.quantizers import Quantizer, get_quantizer
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, KVQuantSpec, StoragePolicy


@dataclass(frozen=True, eq=False)
class DesignFit:
    """A design's measured distortion table (all widths), its fit and allocation curves (informative widths)."""

    design: str
    table: DistortionTable
    fit: DistortionFit
    curves: Curves
    seconds: dict[str, float]

    def measured_curves(self) -> Curves:
        """The measured distortions at the allocation curves' widths, made non-increasing in the width (a wider
        code that measured worse counts as the narrower one's value): what RateQuant allocates on without the
        fit's smoothing. No per-component floors: they keep the fit off widths it cannot follow, while the
        measured damage already prices a width that reconstructs worse than the mean."""
        widths = self.curves.bitset
        values = self.table.values[..., [self.table.bitset.index(b) for b in widths]]
        return Curves.measured(
            np.minimum.accumulate(values, axis=-1), widths, design=self.design, label=f"{self.table.metric} measured"
        )


@dataclass
class CalibrationRun:
    """A finished calibration: the plan plus the evidence behind it."""

    plan: Plan
    table: DistortionTable
    fit: DistortionFit
    curves: Curves
    allocation: Allocation
    phases: dict[str, float]
    candidates: dict[str, float] = field(default_factory=dict)
    """Every candidate's mean KL on the held-out calibration windows (empty when only one was built)."""
    candidate_windows: dict[str, int] = field(default_factory=dict)
    """How many held-out windows each candidate was scored on (close calls get more)."""
    chosen: str = "ratequant"


def collect_statistics(
    loaded: LoadedModel,
    corpus: Corpus,
    *,
    seq_len: int = DEFAULT_CALIBRATION_SEQ_LEN,
    sequences: int = DEFAULT_CALIBRATION_SEQUENCES,
    metric: str = DEFAULT_METRIC,
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

    With ``informative_only`` the fit, and so the widths an allocation may use (the curves' per-component
    ``min_bits``), leave out the widths below each component's lowest informative width
    (:meth:`DistortionTable.component_floors`); the table covers all of ``bitset``.
    """
    start = time.perf_counter()
    table = measure_distortion(stats, quantizer, bitset, metric, sink_tokens=sink_tokens)
    measured = time.perf_counter()
    low = table.component_floors() if informative_only else np.full(table.shape, table.bitset[0])
    low = np.minimum(low, table.bitset[-2])  # a component needs two widths to fit its curve: the two widest
    fitted = tuple(b for b in table.bitset if b >= int(low.min()))
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
    settings: CalibrationSettings,
    curves: Curves,
    geometry: Geometry,
    cost_model: CostModel,
    budget: Budget | None = None,
) -> Allocation:
    """Run the settings' strategy on ``curves`` within the settings' widths, at ``budget`` (default the settings')."""
    if curves.shape != geometry.shape:
        raise RateQuantError(f"the curves cover components {curves.shape} but the model has {geometry.shape}")
    options = AllocationOptions(
        bitset=covered_widths(settings.bitset, curves),
        b_min=settings.b_min,
        b_max=settings.b_max,
        cost_model=cost_model,
    )
    return allocate(curves, budget or settings.budget, settings.strategy, options)


def equal_bytes_budget(settings: CalibrationSettings, geometry: Geometry, cost_model: CostModel) -> Budget:
    """The settings' budget in true bytes per token under ``cost_model`` (the reference design's): how
    ``--quantizer auto`` compares designs whose scales and zeros cost different bytes at the same width."""
    if settings.budget.kind == "bytes_per_token":
        return settings.budget
    options = AllocationOptions(bitset=settings.bitset, b_min=settings.b_min, b_max=settings.b_max)
    bits = allocate(Curves.flat(geometry, settings.bitset), settings.budget, "ratequant", options).bits
    return Budget.bytes_per_token(cost_model.bytes_per_token(bits), cost_model.context_tokens)


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
    """``allocation`` refined by :func:`ratequant.calibration.search.search_allocation` (``proposals`` moves, ``seed``)
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
    splits = split_allocations(Budget.avg_bits(allocation.avg_bits), curves, cost_model, *widths)
    limit = allocation.bytes_per_token * (1 + 1e-9)
    starts = {allocation.method: np.array(allocation.bits)}
    starts.update({name: a.bits for name, a in splits.items() if a.bytes_per_token <= limit})
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


@dataclass(frozen=True, eq=False)
class DesignCalibration:
    """One design's calibration: its storage policy (with the sinks chosen), fitted curves, cost model and the
    allocation of the settings' strategy at the budget."""

    policy: StoragePolicy
    fitted: DesignFit
    curves_design: Quantizer
    cost_model: CostModel
    allocation: Allocation
    measured_allocation: Allocation | None = None  # the same strategy on the measured distortions, when choosing


def design_sink_tokens(stats: CalibrationStats, settings: CalibrationSettings, design: str) -> int:
    """The sink tokens of ``design``: the settings' count, or for ``"auto"`` :func:`choose_sink_tokens`'s."""
    if settings.sink_tokens != "auto":
        return settings.sink_tokens
    return choose_sink_tokens(stats, settings.design(design), settings.metric)[0]


def calibrate_design(
    loaded: LoadedModel,
    stats: CalibrationStats,
    settings: CalibrationSettings,
    design: str,
    phases: dict[str, float],
    budget: Budget | None = None,
) -> DesignCalibration:
    """Sinks, distortion table, fit, cost model and allocation of ``design`` on ``stats`` (times into ``phases``)."""
    start = time.perf_counter()
    sinks = design_sink_tokens(stats, settings, design)
    if settings.sink_tokens == "auto":
        phases["sink_tokens"] = phases.get("sink_tokens", 0.0) + time.perf_counter() - start
    policy = settings.policy(sinks, design)
    curves_design = get_quantizer(settings.curves_from) if settings.curves_from else policy.quantizer
    fitted = fit_design(
        stats,
        curves_design,
        metric=settings.metric,
        bitset=settings.bitset,
        informative_only=settings.informative_only,
        sink_tokens=policy.sink_tokens,
    )
    for name, seconds in fitted.seconds.items():
        phases[name] = phases.get(name, 0.0) + seconds
    start = time.perf_counter()
    calibrated = allocate_design(loaded, settings, policy, fitted, curves_design, budget)
    phases["allocation"] = phases.get("allocation", 0.0) + time.perf_counter() - start
    return calibrated


def allocate_design(
    loaded: LoadedModel,
    settings: CalibrationSettings,
    policy: StoragePolicy,
    fitted: DesignFit,
    curves_design: Quantizer | None = None,
    budget: Budget | None = None,
) -> DesignCalibration:
    """The cost model of ``policy`` and the settings' allocation on ``fitted``'s curves at ``budget`` (default the
    settings'): a design's calibration once its curves are fitted."""
    context = settings.budget.context_tokens or DEFAULT_CONTEXT_TOKENS
    cost_model = cost_model_for(policy, loaded, context, settings.bitset)
    allocation = allocate_for(settings, fitted.curves, loaded.geometry, cost_model, budget)
    measured = None
    if settings.choose and settings.strategy == "ratequant" and fitted.curves.source == "fit":
        found = allocate_for(settings, fitted.measured_curves(), loaded.geometry, cost_model, budget)
        if not np.array_equal(found.bits, allocation.bits):
            measured = replace(found, method=MEASURED)  # its details name the measured curves
    return DesignCalibration(policy, fitted, curves_design or policy.quantizer, cost_model, allocation, measured)


def candidates_of(
    settings: CalibrationSettings, calibrated: DesignCalibration, budget: Budget, qualified: bool
) -> list[Candidate]:
    """RateQuant's allocation of ``calibrated``, its allocation on the measured distortions where that differs, and,
    when the settings choose, the fixed key/value splits of the same ``budget`` (names prefixed by the design when
    ``qualified``)."""
    prefix = f"{calibrated.policy.quantizer.name}/" if qualified else ""
    c = calibrated
    out = [Candidate(prefix + c.allocation.method, c.allocation, c.policy, c.fitted.curves, c.cost_model)]
    if c.measured_allocation is not None:
        measured = c.measured_allocation
        out.append(Candidate(prefix + measured.method, measured, c.policy, c.fitted.measured_curves(), c.cost_model))
    if settings.choose and settings.strategy == "ratequant":
        widths = c.fitted.curves.restrict(
            covered_widths(settings.bitset, c.fitted.curves), settings.b_min, settings.b_max
        ).bitset
        for name, split in split_allocations(budget, c.fitted.curves, c.cost_model, widths).items():
            out.append(Candidate(prefix + name, split, c.policy, c.fitted.curves, c.cost_model))
    return out


def plan_of(
    loaded: LoadedModel,
    corpus: Corpus,
    allocation: Allocation,
    policy: StoragePolicy,
    fitted: DesignFit,
    *,
    budget: Budget,
    metric: str,
    calibration: dict,
) -> Plan:
    """The plan of ``allocation`` stored under ``policy``: ``fitted``'s fit and its measured distortions at the
    fitted widths, and a calibration record of the corpus (name, hash) followed by ``calibration``."""
    table, fit = fitted.table, fitted.fit
    return Plan.from_allocation(
        allocation,
        model_name=loaded.name,
        geometry=loaded.geometry,
        quantizer=policy.quantizer,
        budget=budget,
        fit=fit,
        metric=metric,
        fit_design=fitted.design,
        measured=table.values[..., [table.bitset.index(b) for b in fit.bitset]],
        residual_length=policy.residual_length,
        sink_tokens=policy.sink_tokens,
        calibration={"corpus": corpus.name, "corpus_sha256": corpus.sha256, **calibration},
    )


def calibrate(loaded: LoadedModel, corpus: Corpus, settings: CalibrationSettings) -> CalibrationRun:
    """Statistics, distortion table, fit, allocation and plan for ``loaded`` on ``corpus``'s calibration split.

    Every design of the settings (all of them for ``"auto"``, at the true bytes the reference design takes at the
    budget) is fitted on the same statistics; with ``settings.choose`` RateQuant's allocation and the fixed key/value
    splits of the budget are scored on held-out calibration text (:mod:`ratequant.calibration.candidates`) and the plan
    is the one with the least KL; ``settings.search_proposals`` then refines it by the KL search.
    """
    phases: dict[str, float] = {}
    search = search_windows(loaded, corpus, settings.search_tokens) if settings.search_proposals else None
    start = time.perf_counter()
    stats = collect_statistics(
        loaded, corpus, seq_len=settings.seq_len, sequences=settings.sequences, metric=settings.metric
    )
    phases["capture"] = time.perf_counter() - start
    auto = settings.quantizer == AUTO
    calibrated: dict[str, DesignCalibration] = {}
    candidates: list[Candidate] = []
    budget = settings.budget
    for design in settings.designs():
        try:
            calibrated[design] = calibrate_design(loaded, stats, settings, design, phases, budget)
        except BudgetError as exc:
            if not auto:
                raise
            note(f"{design} left out of the automatic choice: {exc}")
            continue
        if auto and design == AUTO_REFERENCE:  # the other designs get the reference design's true bytes
            budget = equal_bytes_budget(settings, loaded.geometry, calibrated[design].cost_model)
        candidates += candidates_of(settings, calibrated[design], budget, auto)
    tokens = stats.token_count
    del stats
    chosen, choice = candidates[0], None
    if len(candidates) > 1:
        start = time.perf_counter()
        windows = held_out_windows(
            loaded.tokenizer,
            corpus,
            settings.capture_tokens,
            settings.choice_window_tokens(),
            settings.choice_windows,
        )
        choice = choose_candidate(window_kl(loaded.model, windows), candidates, windows.ids.shape[0])
        chosen = choice.best
        phases["choice"] = time.perf_counter() - start
    design = calibrated[chosen.policy.quantizer.name]
    allocation, searched = chosen.allocation, {}
    if settings.search_proposals:
        start = time.perf_counter()
        allocation, searched = refine_allocation(
            loaded,
            search,
            chosen.policy,
            chosen.curves,
            chosen.cost_model,
            allocation,
            proposals=settings.search_proposals,
            widths=search_widths(chosen.curves, settings.bitset, settings.b_min, settings.b_max),
            seed=settings.search_seed,
        )
        phases["search"] = time.perf_counter() - start
    record = {}
    if choice is not None:
        record = {
            "choice": chosen.name,
            "choice_tokens": windows.protocol.seq_len,
            "choice_windows": choice.windows[chosen.name],
            **{f"choice_kl_{name}": value for name, value in choice.kl.items()},
        }
    plan = plan_of(
        loaded,
        corpus,
        allocation,
        chosen.policy,
        design.fitted,
        budget=budget if auto else settings.budget,
        metric=settings.metric,
        calibration={
            "tokens": tokens,
            "seconds": sum(phases.values()),
            "phases": dict(phases),
            "bos_token_id": bos_token_id(loaded.tokenizer),
            "sink_tokens_chosen": "auto" if settings.sink_tokens == "auto" else "given",
            **({"quantizer_chosen": "auto", "requested_budget": settings.budget.describe()} if auto else {}),
            **record,
            **searched,
        },
    )
    return CalibrationRun(
        plan=plan,
        table=design.fitted.table,
        fit=design.fitted.fit,
        curves=design.fitted.curves,
        allocation=allocation,
        phases=phases,
        candidates=choice.kl if choice else {},
        candidate_windows=choice.windows if choice else {},
        chosen=chosen.name,
    )
