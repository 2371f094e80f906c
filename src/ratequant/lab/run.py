"""``run_compare``: calibrate every design once, build every method, score them all on the same windows.

Calibration statistics (keys, values and loss gradients on the calibration split) are captured once and each
design's distortion is measured and fitted on them (:func:`ratequant.calibration.pipeline.fit_design`); the rank
bases come from the same statistics. Every method is then scored against one full-precision reference pass per window
(:func:`ratequant.evaluation.perplexity.score_conditions`), on the evaluation split of the calibration corpus
and of every further corpus, whole-window and second-half scores from the same passes. Passkey retrieval, when
asked for, runs a few of the methods through the real cache.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ratequant import __version__
from ratequant.calibration import (
    collect_statistics,
    design_sink_tokens,
    fit_design,
    refine_allocation,
    search_widths,
    search_windows,
)
from ratequant.compat.placement import describe_placement
from ratequant.errors import RateQuantError
from ratequant.evaluation.perplexity import REFERENCE, score_conditions
from ratequant.evaluation.protocol import WindowProtocol, bos_token_id, make_windows
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.lab.choice import chosen_methods
from ratequant.lab.config import FULL_PRECISION, SCORINGS, CompareConfig, budget_text
from ratequant.lab.long_context import long_context_study, study_tasks
from ratequant.lab.methods import (
    Method,
    Skipped,
    pick_mismatch_sources,
    quantized_methods,
    rank_methods,
)
from ratequant.lab.results import CompareResults, DesignResult, MethodResult
from ratequant.lab.studies import extra_methods, sink_study
from ratequant.measure.weight_norms import weight_norms
from ratequant.progress import Stages
from ratequant.quantizers import get_quantizer
from ratequant.spec import StoragePolicy


def evaluation_name(corpus: str, scoring: str) -> str:
    """The key of an evaluation in :attr:`CompareResults.evaluations`: ``"<corpus>/<scoring>"``."""
    return f"{corpus}/{scoring}"


def run_compare(
    loaded: LoadedModel,
    corpus: Corpus,
    config: CompareConfig,
    progress: bool | Stages = True,
    eval_corpora: dict[str, Corpus] | None = None,
) -> CompareResults:
    """Run every method of ``config`` on ``loaded``: calibrate on ``corpus``, score on its evaluation split and
    on those of ``eval_corpora`` (``{name: Corpus}``, the corpora ``config.eval_corpora`` names)."""
    from ratequant.measure.rank import RankBases

    if not isinstance(config, CompareConfig):
        raise RateQuantError(f"config must be a CompareConfig, got {type(config).__name__}")
    study_tasks(config)  # refuses bad long-context settings before any work
    eval_corpora = dict(eval_corpora or {})
    if set(eval_corpora) != set(config.eval_corpora):
        raise RateQuantError(
            f"the config names evaluation corpora {list(config.eval_corpora)} but {list(eval_corpora)} were given"
        )
    say = progress if isinstance(progress, Stages) else Stages(bool(progress))
    started = time.perf_counter()
    g, cal = loaded.geometry, config.calibration
    protocol = WindowProtocol(config.seq_len, config.windows, config.bos, config.scoring)
    side = WindowProtocol(config.seq_len, config.side_windows or config.windows, config.bos, config.scoring)
    windows = {corpus.name: make_windows(loaded.tokenizer, corpus.evaluation, protocol)}
    windows |= {c.name: make_windows(loaded.tokenizer, c.evaluation, side) for c in eval_corpora.values()}
    search_text = search_windows(loaded, corpus, cal.search_tokens) if cal.search_proposals else None
    say(
        f"compare: {loaded.name}, calibrated on {corpus.name}; designs {', '.join(config.designs)}; budgets "
        f"{', '.join(map(budget_text, config.budgets))} bits; {config.mode} evaluation on "
        + "; ".join(f"{name}: {w.summary()}" for name, w in windows.items())
    )

    timings: dict = {}
    t = time.perf_counter()
    stats = collect_statistics(loaded, corpus, seq_len=cal.seq_len, sequences=cal.sequences, metric=cal.metric)
    timings["capture"] = time.perf_counter() - t
    say(
        f"calibration capture: {stats.keys.shape[1]} sequence(s), {stats.token_count} tokens, metric {cal.metric} "
        f"({timings['capture']:.1f} s)"
    )
    fitted, sinks, side = {}, {}, {}
    for design in config.designs:
        quantizer = get_quantizer(design)
        sinks[design] = design_sink_tokens(stats, cal, design)
        fitted[design] = fit_design(stats, quantizer, metric=cal.metric, bitset=cal.bitset, sink_tokens=sinks[design])
        fit = fitted[design].fit
        say(
            f"{design}: distortion measured and fitted ({sum(fitted[design].seconds.values()):.1f} s): beta key "
            f"{fit.beta_key:.2f}, value {fit.beta_value:.2f}, R^2 {fit.r2_overall:.3f}; {sinks[design]} sink token(s)"
        )
        side[design] = extra_methods(config, loaded, corpus, stats, fitted[design], sinks[design], say)
    sources = pick_mismatch_sources({name: f.fit for name, f in fitted.items()})
    t = time.perf_counter()
    bases = RankBases.fit(stats.keys, stats.values, stats.attention_mask)
    timings["rank_bases"] = time.perf_counter() - t
    calibration_tokens = int(stats.token_count)
    del stats

    def refine(allocation, curves, cost_model, policy):
        say(f"{policy.quantizer.name}: KL search from RateQuant at {allocation.avg_bits:g} bits")
        return refine_allocation(
            loaded,
            search_text,
            policy,
            curves,
            cost_model,
            allocation,
            proposals=cal.search_proposals,
            widths=search_widths(curves, cal.bitset),
        )

    t = time.perf_counter()
    skipped: list[Skipped] = []
    methods: list[Method] = []
    for design in config.designs:
        source = fitted[sources[design]] if sources[design] else None
        policy = StoragePolicy(get_quantizer(design), cal.residual_length, sinks[design])
        methods += quantized_methods(
            config,
            loaded,
            fitted[design],
            policy,
            source,
            skipped,
            side[design][0],
            refine if search_text is not None else None,
        )
    chosen, choice_info = chosen_methods(config, loaded, corpus, fitted, sinks, skipped, say)
    methods += chosen
    rank_skipped: list[Skipped] = []
    ranked, rank_info = rank_methods(config, loaded, bases, rank_skipped)
    methods += [m for m in ranked if config.scores(m.method)]
    skipped += [s for s in rank_skipped if config.scores(s.method)]
    timings["allocation"] = time.perf_counter() - t
    say(f"allocations: {len(methods)} methods ({timings['allocation']:.1f} s); {len(skipped)} skipped")
    timings["calibration"] = {
        "capture": timings["capture"],
        "per_design": {d: sum(fitted[d].seconds.values()) for d in config.designs},
        "rank_bases": timings["rank_bases"],
    }

    keys = [f"{i}:{m.label}" for i, m in enumerate(methods)]
    conditions = dict(zip(keys, (m.condition for m in methods)))
    scores: dict[str, dict] = {}  # evaluation name -> {condition key -> ConditionScore}
    evaluations: dict[str, dict] = {}
    timings["evaluation"] = {}
    for name, w in windows.items():
        t = time.perf_counter()
        say(f"evaluation on {name}: {len(keys) + 1} passes per window over {w.count} windows")
        by_scoring = score_conditions(loaded.model, w, conditions, scorings=SCORINGS, progress=say.enabled)
        timings["evaluation"][name] = time.perf_counter() - t
        for scoring, per_condition in by_scoring.items():
            key = evaluation_name(name, scoring)
            scores[key] = per_condition
            evaluations[key] = {
                "corpus": name,
                "split": "evaluation",
                "mode": config.mode,
                "calibrated_on": corpus.name,
                **w.with_scoring(scoring).describe(),
            }
    primary = evaluation_name(corpus.name, config.scoring)

    itemsize = loaded.dtype.itemsize
    fp = Method(
        FULL_PRECISION,
        "full precision",
        None,
        None,
        8.0 * itemsize,
        None,
        None,
        float(g.kv_bytes_per_token(itemsize)),
        None,
        {"dtype": str(loaded.dtype).removeprefix("torch."), "fp16_kv_bytes_per_token": g.kv_bytes_per_token(2)},
    )

    def record(key: str, m: Method) -> MethodResult:
        return MethodResult(
            method=m.method,
            label=m.label,
            design=m.design,
            budget=m.budget,
            avg_bits=m.avg_bits,
            key_bits=m.key_bits,
            value_bits=m.value_bits,
            kv_bytes_per_token=m.kv_bytes_per_token,
            scores={ev: scores[ev][key] for ev in scores},
            primary=primary,
            details=m.details,
            bits=m.bits,
        )

    extra: dict = {"sink_tokens": sinks, "weight_norms": weight_norms(loaded.model).to_dict(), "choice": choice_info}
    extra["headroom"] = {d: info for d, (_, info) in side.items() if info}
    if config.sink_study:
        t = time.perf_counter()
        extra["sink_study"] = sink_study(config, loaded, corpus, methods, say)
        timings["sink_study"] = time.perf_counter() - t
    if config.long_context_tokens is not None:
        t = time.perf_counter()
        kl = {m: scores[primary][key].kl for key, m in zip(keys, methods)}
        extra["long_context"] = long_context_study(loaded, corpus, config, methods, kl, say)
        timings["long_context"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    designs = {
        name: DesignResult(
            name=name,
            quantizer=get_quantizer(name).to_config(),
            fit=f.fit,
            measured=np.asarray(f.table.values[..., [f.table.bitset.index(b) for b in f.fit.bitset]]),
            mismatch_source=sources[name],
            seconds=f.seconds,
            min_bits=None if f.curves.min_bits is None else f.curves.lowest_widths(),
            floors=None if f.curves.min_bits is None else np.array(f.curves.component_min_bits()),
        )
        for name, f in fitted.items()
    }
    results = CompareResults(
        config=config,
        model=loaded.describe(),
        corpus={
            **corpus.describe(),
            "bos_token_id": bos_token_id(loaded.tokenizer),
            "calibration_tokens": calibration_tokens,
        },
        evaluations=evaluations,
        primary=primary,
        designs=designs,
        methods=(record(REFERENCE, fp), *(record(k, m) for k, m in zip(keys, methods))),
        skipped=tuple(s.to_dict() for s in skipped),
        rank={
            "per_budget": rank_info,
            "hybrid_design": config.hybrid_design,
            "hybrid_bits": config.hybrid_bits,
            "matching": "r * 16 <= budget * head_dim bits per token and component (rank); the hybrid's coefficients "
            "plus its per-token metadata fit the same bits (rank+quant); bases are a per-model constant",
        },
        timings=timings,
        environment={
            "ratequant_version": __version__,
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": describe_placement(loaded.model),
        },
        extra=extra,
    )
    say(f"done in {timings['total']:.0f} s")
    return results


__all__ = ["evaluation_name", "run_compare"]
