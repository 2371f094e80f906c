"""The long-context section of a comparison: retrieval through the real cache, the same prompts under every
condition, and how far each condition moves the answer's log-probability from full precision's.

For each task of ``config.long_context_tasks`` (passkey and the RULER-style tasks of
:data:`ratequant.evaluation.tasks.TASKS`) at ``config.long_context_tokens`` tokens, ``long_context_depths`` x
``long_context_trials`` seeded prompts run, prefilled ``prefill_chunk`` tokens at a time (default 512, as
``ratequant eval``), under:

* full precision (``DynamicCache``);
* at each budget of ``long_context_budgets``, for ``focus_design``: the best fixed scheme (the uniform width or K/V
  split with the least KL on the headline evaluation), RateQuant's allocation and the default plan (what
  ``calibrate`` returns), each in a :class:`~ratequant.cache.RateQuantCache`;
* the uniform 2-bit scheme of ``focus_design`` (for ``kivi``: KIVI-2), stored as the other conditions are (built
  for the study where 2 bits is not among the budgets);
* transformers' ``QuantizedCache`` with the HQQ backend at 2 bits (group 64, the config's residual window)
  where ``"hqq"`` is among the peers.

A method whose cache would equal one already listed (same design, widths, residual and sinks) runs once, under
every role it plays. A peer whose cache fails on a prompt gets a row that says so, and the others run on (HQQ's
2-bit packing, which refuses some sequence lengths with transformers 5.25 and hqq 0.2.8, is given tokens in
multiples of 4: :data:`HQQ_TOKEN_MULTIPLE`).
Accuracy comes with its Wilson interval; the answer's log-probability is compared with full precision's prompt by
prompt (mean paired change and its standard error), which separates conditions with far fewer prompts than
accuracy needs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
import torch

from ratequant.cache.prefill import DEFAULT_PREFILL_CHUNK
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import Condition, FullPrecision, PeerCache
from ratequant.evaluation.retrieval import wilson_interval
from ratequant.evaluation.tasks import Task, get_task
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.lab.config import FIXED_METHODS, FULL_PRECISION, CompareConfig, budget_text
from ratequant.lab.methods import Method, condition_for, uniform_label
from ratequant.progress import Stages

HQQ_BITS = 2
HQQ_GROUP = 64
"""The HQQ peer: 2-bit codes in groups of 64 along the head dimension, as transformers documents it."""
HQQ_TOKEN_MULTIPLE = 4
"""hqq 0.2.8 packs 2-bit codes four groups to a byte and fails on a tensor whose count of groups is not a multiple of
4 (with three kv heads of 64 channels: any sequence length not divisible by 4): the peer's layers pad what they
quantize to a multiple of this many tokens (:func:`pad_quantized_tokens`)."""


def study_tasks(config: CompareConfig) -> list[Task]:
    """The study's tasks with their settings (none when ``long_context_tokens`` is None). Called before any work
    too, so that bad settings or a peer whose package is missing are refused in one line at the start."""
    if config.long_context_tokens is None:
        return []
    if "hqq" in config.peers:
        try:
            import hqq  # noqa: F401
        except ImportError:
            raise RateQuantError(
                "the hqq peer needs the hqq package: pip install -e '.[bench]' (or drop hqq from --peers)"
            ) from None
    options = dict(
        context=config.long_context_tokens,
        depths=config.long_context_depths,
        trials=config.long_context_trials,
        prefill_chunk=config.prefill_chunk or DEFAULT_PREFILL_CHUNK,
    )
    return [get_task(name, **options) for name in config.long_context_tasks]


def hqq_cache_factory(loaded: LoadedModel, residual: int) -> Callable[[], object]:
    """A fresh transformers ``QuantizedCache`` (HQQ backend, 2 bits, group 64, ``residual`` tokens kept in full
    precision; at least one, which transformers requires) per call."""
    from transformers import QuantizedCache

    config = loaded.model.config

    def make() -> QuantizedCache:
        cache = QuantizedCache(
            "hqq",
            config,
            nbits=HQQ_BITS,
            axis_key=1,
            axis_value=1,
            q_group_size=HQQ_GROUP,
            residual_length=max(residual, 1),
        )
        for layer in cache.layers:
            pad_quantized_tokens(layer, HQQ_TOKEN_MULTIPLE)
        return cache

    return make


def pad_quantized_tokens(layer, multiple: int) -> None:
    """Let a transformers quantized cache ``layer`` quantize any number of tokens: what it quantizes (``[B, H, n,
    D]``) gets zero tokens appended up to a multiple of ``multiple``, and what it dequantizes is cut back to its
    ``n`` tokens. With groups along the head dimension that divide it, the padding fills groups of its own, so no
    real token's codes change."""
    quantize, dequantize = layer._quantize, layer._dequantize

    def padded(tensor, axis):
        n = tensor.shape[-2]
        return quantize(torch.nn.functional.pad(tensor, (0, 0, 0, -n % multiple)).contiguous(), axis), n

    def trimmed(stored):
        codes, n = stored
        return dequantize(codes)[..., :n, :]

    layer._quantize, layer._dequantize = padded, trimmed


def _same_cache(a: Condition, b: Condition) -> bool:
    """Whether two conditions store the cache alike (same design, widths, residual window and sinks)."""
    sa, sb = getattr(a, "spec", None), getattr(b, "spec", None)
    return (
        sa is not None
        and sb is not None
        and sa.quantizer.name == sb.quantizer.name
        and sa.policy == sb.policy
        and np.array_equal(sa.bits, sb.bits)
    )


def study_methods(config: CompareConfig, methods: list[Method], kl: Mapping[Method, float]) -> list[tuple[str, Method]]:
    """``(role, method)`` in the order they run: per long-context budget the best fixed scheme (least ``kl``),
    RateQuant and the default plan of ``config.focus_design``."""
    design = [m for m in methods if m.design == config.focus_design]
    chosen: list[tuple[str, Method]] = []
    for budget in config.long_context_budgets:
        at = [m for m in design if m.budget == budget]
        fixed = [m for m in at if m.method in FIXED_METHODS]
        if fixed:
            chosen.append(("best fixed", min(fixed, key=lambda m: kl[m])))
        chosen += [(role, m) for m in at for role in ("ratequant", "default") if m.method == role]
    return chosen


def two_bit_condition(
    config: CompareConfig, methods: list[Method], chosen: list[tuple[str, Method]]
) -> tuple[str, Condition] | None:
    """``(label, condition)`` of ``config.focus_design``'s uniform 2-bit scheme: the comparison's own where 2 bits
    is a budget, else built with the storage (residual window, sinks) of the ``chosen`` conditions
    (:func:`study_methods`); None where there is neither."""
    label = study_label(uniform_label(2.0), 2.0)
    own = [m for m in methods if m.design == config.focus_design and m.method == "uniform" and m.budget == 2.0]
    if own:
        return label, own[0].condition
    spec = next((m.condition.spec for _, m in chosen if hasattr(m.condition, "spec")), None)
    if spec is None:
        return None
    return label, condition_for(replace(spec, bits=np.full_like(spec.bits, 2)), config, label)


def study_label(label: str, budget: float) -> str:
    """A condition's row label in the study: the method's label and its budget, e.g. ``"K3V2 (2.5 bits)"``."""
    return f"{label} ({budget_text(budget)} bits)"


def paired_change(trials: list[dict], reference: list[dict]) -> dict:
    """The answer log-probability's change from ``reference`` on the same prompts (matched by depth and seed):
    ``{"mean", "se", "prompts"}`` in nats (``se`` 0 for one prompt)."""
    base = {(t["depth"], t["seed"]): t["logprob"] for t in reference}
    diffs = [t["logprob"] - base[(t["depth"], t["seed"])] for t in trials if (t["depth"], t["seed"]) in base]
    n = len(diffs)
    if n == 0:
        return {"mean": math.nan, "se": math.nan, "prompts": 0}
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    return {"mean": mean, "se": se, "prompts": n}


def with_statistics(results: dict[str, dict]) -> dict[str, dict]:
    """Each task result of ``results`` (``{label: the task's JSON}``, full precision first; rows with an
    ``"error"`` kept as they are) with ``accuracy_low``/``accuracy_high`` (Wilson, 95%) and ``logprob_change``
    (:func:`paired_change` from full precision's prompts)."""
    reference = results.get("full precision", {}).get("trials_detail", [])
    out = {}
    for label, r in results.items():
        if "error" in r:
            out[label] = r
            continue
        low, high = wilson_interval(sum(t["correct"] for t in r["trials_detail"]), r["trials"])
        out[label] = {**r, "accuracy_low": low, "accuracy_high": high,
                      "logprob_change": paired_change(r["trials_detail"], reference)}  # fmt: skip
    return out


def long_context_study(
    loaded: LoadedModel,
    corpus: Corpus,
    config: CompareConfig,
    methods: list[Method],
    kl: Mapping[Method, float],
    say: Stages,
) -> dict:
    """Every task of ``config.long_context_tasks`` under the study's conditions (module docstring); ``kl`` is each
    method's KL on the headline evaluation (to find the best fixed scheme). JSON-ready:
    ``{"settings", "conditions": {label: meta}, "tasks": {task: {"settings", "results": {label: ...}}}, "seconds"}``
    where each result is the task's JSON plus ``accuracy_low``/``accuracy_high`` and ``logprob_change``."""
    conditions: dict[str, Condition] = {"full precision": FullPrecision()}
    meta: dict[str, dict] = {"full precision": {"roles": ["reference"], "method": FULL_PRECISION, "budget": None}}
    chosen = study_methods(config, methods, kl)
    rows = [(role, study_label(m.label, m.budget), m.condition, m.method, m.budget) for role, m in chosen]
    two_bit = two_bit_condition(config, methods, chosen)
    if two_bit is not None:
        rows.append(("2-bit", *two_bit, "uniform", 2.0))
    for role, label, condition, method, budget in rows:
        # a condition whose cache equals one already listed runs once, under every role it plays
        label = next((lb for lb, c in conditions.items() if c is condition or _same_cache(c, condition)), label)
        if label not in conditions:
            conditions[label] = condition
            meta[label] = {"roles": [], "method": method, "budget": budget, "design": config.focus_design}
        if role not in meta[label]["roles"]:
            meta[label]["roles"].append(role)
    if "hqq" in config.peers:
        label = f"HF QuantizedCache HQQ {HQQ_BITS}-bit"
        conditions[label] = PeerCache(hqq_cache_factory(loaded, config.calibration.residual_length), label=label)
        meta[label] = {"roles": ["peer"], "method": "hqq", "budget": float(HQQ_BITS), "group": HQQ_GROUP}
    start = time.perf_counter()
    tasks = {}
    for task in study_tasks(config):
        name, prompts = task.name, len(task.depths) * task.trials
        say(f"{name}: {len(conditions)} conditions x {prompts} prompts at {task.context} tokens")
        results, settings = {}, {}
        for label, condition in conditions.items():
            try:
                outcome = task.run(loaded, corpus, {label: condition}, progress=say.enabled)
            except Exception as exc:  # another library's cache may refuse an input; its row says why
                if not isinstance(condition, PeerCache):
                    raise
                results[label] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                say(f"{name}: {label} failed: {results[label]['error']}")
                continue
            settings, results[label] = outcome.settings, outcome.results[label]
        tasks[name] = {"settings": settings, "results": with_statistics(results)}
    return {
        "settings": {
            "context": config.long_context_tokens,
            "depths": list(config.long_context_depths),
            "trials_per_depth": config.long_context_trials,
            "prefill_chunk": config.prefill_chunk or DEFAULT_PREFILL_CHUNK,
            "focus_design": config.focus_design,
        },
        "conditions": meta,
        "tasks": tasks,
        "seconds": time.perf_counter() - start,
    }


__all__ = [
    "HQQ_TOKEN_MULTIPLE",
    "hqq_cache_factory",
    "long_context_study",
    "pad_quantized_tokens",
    "paired_change",
    "study_label",
    "study_methods",
    "study_tasks",
    "two_bit_condition",
    "with_statistics",
]
