"""``run_compare``: calibrate every design once, build every method, score them all on the same windows.

Calibration statistics (keys, values and loss gradients on the calibration split) are captured once and each
design's distortion is measured and fitted on them (:func:`ratequant.pipeline.fit_design`); the rank bases come
from the same statistics. Every method is then scored against one full-precision reference pass per window
(:func:`ratequant.evaluation.perplexity.score_conditions`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ratequant import __version__
from ratequant.data import Corpus
from ratequant.errors import RateQuantError
from ratequant.evaluation.perplexity import REFERENCE, score_conditions
from ratequant.evaluation.protocol import WindowProtocol, make_windows
from ratequant.experiments.config import CompareConfig, budget_text
from ratequant.experiments.methods import (
    FULL_PRECISION,
    Method,
    Skipped,
    pick_mismatch_sources,
    quantized_methods,
    rank_methods,
)
from ratequant.experiments.results import CompareResults, DesignResult, MethodResult
from ratequant.models import LoadedModel
from ratequant.pipeline import collect_statistics, fit_design
from ratequant.progress import Stages
from ratequant.quantizers import get_quantizer


def run_compare(
    loaded: LoadedModel, corpus: Corpus, config: CompareConfig, progress: bool | Stages = True
) -> CompareResults:
    """Run every method of ``config`` on ``loaded`` and ``corpus`` (see the module docstring)."""
    from ratequant.rank import RankBases

    if not isinstance(config, CompareConfig):
        raise RateQuantError(f"config must be a CompareConfig, got {type(config).__name__}")
    say = progress if isinstance(progress, Stages) else Stages(bool(progress))
    started = time.perf_counter()
    g = loaded.geometry
    protocol = WindowProtocol(config.seq_len, config.windows, scoring="all")
    windows = make_windows(loaded.tokenizer, corpus.evaluation, protocol)
    say(
        f"compare: {loaded.name} on {corpus.name}; designs {', '.join(config.designs)}; budgets "
        f"{', '.join(map(budget_text, config.budgets))} bits; {windows.summary()}"
    )
    if windows.count < config.windows:
        say(f"  the evaluation split holds only {windows.count} windows of {config.seq_len} tokens; using them all")

    timings: dict = {}
    t = time.perf_counter()
    stats = collect_statistics(
        loaded, corpus, seq_len=config.calibration_seq_len, sequences=config.calibration_sequences, metric=config.metric
    )
    timings["capture"] = time.perf_counter() - t
    say(
        f"calibration capture: {stats.keys.shape[1]} sequence(s), {stats.token_count} tokens, metric {config.metric} "
        f"({timings['capture']:.1f} s)"
    )

    fitted = {}
    for design in config.designs:
        fitted[design] = fit_design(stats, get_quantizer(design), metric=config.metric, bitset=config.bitset)
        fit = fitted[design].fit
        say(
            f"{design}: distortion measured and fitted ({sum(fitted[design].seconds.values()):.1f} s): beta key "
            f"{fit.beta_key:.2f}, value {fit.beta_value:.2f}, R^2 {fit.r2_overall:.3f}"
        )
    sources = pick_mismatch_sources({name: f.fit for name, f in fitted.items()})

    t = time.perf_counter()
    bases = RankBases.fit(stats.keys, stats.values, stats.attention_mask)
    timings["rank_bases"] = time.perf_counter() - t
    calibration_tokens = int(stats.token_count)
    del stats

    t = time.perf_counter()
    skipped: list[Skipped] = []
    methods: list[Method] = []
    for design in config.designs:
        source = fitted[sources[design]] if sources[design] else None
        methods += quantized_methods(config, loaded, fitted[design], source, skipped)
    ranked, rank_info = rank_methods(config, loaded, bases)
    methods += ranked
    timings["allocation"] = time.perf_counter() - t
    say(
        f"allocations: {len(methods)} methods ({timings['allocation']:.1f} s); rank bases "
        f"({timings['rank_bases']:.1f} s); {len(skipped)} skipped"
    )
    timings["calibration"] = {
        "capture": timings["capture"],
        "per_design": {d: sum(fitted[d].seconds.values()) for d in config.designs},
        "rank_bases": timings["rank_bases"],
    }

    keys = [f"{i}:{m.label}" for i, m in enumerate(methods)]
    t = time.perf_counter()
    say(f"evaluation: {len(keys) + 1} passes per window over {windows.count} windows")
    scores = score_conditions(
        loaded.model, windows, dict(zip(keys, (m.condition for m in methods))), progress=say.enabled
    )["all"]
    timings["evaluation"] = time.perf_counter() - t
    evaluation = "main"

    itemsize = loaded.dtype.itemsize
    fp = Method(
        FULL_PRECISION,
        "full precision",
        None,
        None,
        8.0 * itemsize,
        None,
        None,
        float(g.num_components * g.head_dim * itemsize),
        None,
        {
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "fp16_kv_bytes_per_token": g.num_components * g.head_dim * 2,
        },
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
            scores={evaluation: scores[key]},
            primary=evaluation,
            details=m.details,
            bits=m.bits,
        )

    results_methods = (record(REFERENCE, fp), *(record(k, m) for k, m in zip(keys, methods)))
    timings["total"] = time.perf_counter() - started
    designs = {
        name: DesignResult(
            name=name,
            quantizer=get_quantizer(name).to_config(),
            fit=f.fit,
            measured=np.asarray(f.table.values[..., [f.table.bitset.index(b) for b in f.fit.bitset]]),
            mismatch_source=sources[name],
            seconds=f.seconds,
            min_bits=f.curves.min_bits,
        )
        for name, f in fitted.items()
    }
    results = CompareResults(
        config=config,
        model=loaded.describe(),
        corpus=corpus.describe(),
        evaluations={
            evaluation: {
                "corpus": corpus.name,
                "split": "evaluation",
                **windows.describe(),
                "calibration_tokens": calibration_tokens,
            }
        },
        primary=evaluation,
        designs=designs,
        methods=results_methods,
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
            "device": str(loaded.device),
        },
    )
    say(f"done in {timings['total']:.0f} s (evaluation {timings['evaluation']:.0f} s)")
    return results


__all__ = ["run_compare"]
