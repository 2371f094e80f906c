"""Synthetic retrieval in the style of RULER, scored through a real KV cache: the tasks' text is
:mod:`ratequant.evaluation.needles`.

Scoring goes through a real KV cache, as passkey does: the prompt is prefilled (chunked after the cache's sinks,
:func:`ratequant.cache.prefill.prefill`), the canonical answer (" v1, v2, ...") is teacher-forced one token at a time
(its log-probability, which moves before accuracy does), and the greedy continuation is read: when every argmax
of the teacher-forced pass is the answer token, greedy decoding yields the answer; at the first miss the cache is
copied (prefilled again when it cannot be copied) and greedy decoding goes on from there, to the end of the
answer's line (leading blanks and punctuation skipped), EOS or a budget of tokens. Accuracy comes with a Wilson
score interval.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ratequant.cache.prefill import prefill
from ratequant.compat.placement import input_device
from ratequant.evaluation.needles import (
    FIRST,
    KINDS,
    RetrievalPrompt,
    answer_complete,
    answer_line,
    make_retrieval_prompt,
    score_answer,
)
from ratequant.evaluation.passkey import DEFAULT_DEPTHS
from ratequant.evaluation.trials import check_positions, last_logprobs, run_trials
from ratequant.validation import check_int

Z_95 = 1.959963984540054
"""The normal quantile of a two-sided 95% interval."""


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (Wilson, JASA 1927) of a proportion ``successes / trials``; 95% by default.

    ``(p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)``: unlike the normal interval it stays
    inside [0, 1] and is not empty at 0 or n successes (8 of 10: 0.490 .. 0.943).
    """
    trials = check_int(trials, "trials", lo=1)
    successes = check_int(successes, "successes", lo=0, hi=trials)
    p, z2 = successes / trials, z * z
    denominator = 1 + z2 / trials
    center = (p + z2 / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class RetrievalTrial:
    """One prompt's outcome: ``logprob`` is ``sum_i log p(answer_i | prompt, answer_<i)`` in nats."""

    depth: float
    seed: int
    answers: tuple[str, ...]
    greedy_text: str
    correct: bool
    recall: float
    logprob: float
    mean_token_logprob: float
    answer_tokens: int
    needle_positions: tuple[int, ...]
    context: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "depth": float(self.depth),
            "seed": int(self.seed),
            "answers": [str(a) for a in self.answers],
            "greedy_text": str(self.greedy_text),
            "correct": bool(self.correct),
            "recall": float(self.recall),
            "logprob": float(self.logprob),
            "mean_token_logprob": float(self.mean_token_logprob),
            "answer_tokens": int(self.answer_tokens),
            "needle_positions": [int(p) for p in self.needle_positions],
            "context": int(self.context),
            "seconds": float(self.seconds),
        }


def _summary(rows: Sequence[RetrievalTrial]) -> dict:
    n, right = len(rows), sum(t.correct for t in rows)
    low, high = wilson_interval(right, n)
    return {
        "accuracy": right / n,
        "accuracy_low": low,
        "accuracy_high": high,
        "recall": sum(t.recall for t in rows) / n,
        "mean_logprob": sum(t.logprob for t in rows) / n,
        "mean_token_logprob": sum(t.mean_token_logprob for t in rows) / n,
        "trials": n,
    }


@dataclass(frozen=True)
class RetrievalResult:
    """A retrieval task over depths and trials: accuracy with its 95% Wilson interval, recall (the share of
    expected items found), the answer's log-probability (summed, and per token), overall and ``per_depth``."""

    task: str
    context: int
    trials: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    recall: float
    mean_logprob: float
    mean_token_logprob: float
    per_depth: dict[float, dict[str, float]]
    trials_detail: list[RetrievalTrial] = field(repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-safe (floats, ints, strs, bools, lists and dicts with str keys)."""
        return {
            "task": self.task,
            "context": int(self.context),
            "trials": int(self.trials),
            "accuracy": float(self.accuracy),
            "accuracy_low": float(self.accuracy_low),
            "accuracy_high": float(self.accuracy_high),
            "recall": float(self.recall),
            "mean_logprob": float(self.mean_logprob),
            "mean_token_logprob": float(self.mean_token_logprob),
            "per_depth": {
                repr(float(d)): {k: (int(v) if k == "trials" else float(v)) for k, v in stats.items()}
                for d, stats in self.per_depth.items()
            },
            "trials_detail": [t.to_dict() for t in self.trials_detail],
            "seconds": float(self.seconds),
        }


def generation_budget(prompt: RetrievalPrompt) -> int:
    """Greedy tokens read at most: the answer's and 4 more for one item, twice the answer's and 8 for several."""
    n = len(prompt.answer_ids)
    return n + 4 if prompt.match == FIRST else 2 * n + 8


def _fork(cache):
    """A copy of ``cache`` that decodes on independently (the state at the first token greedy decoding departs
    from the answer); None when the cache cannot be copied (the caller then prefills again)."""
    try:
        return copy.deepcopy(cache)
    except (TypeError, RuntimeError, copy.Error):
        return None


def _stops(tokenizer, generated: list[int], eos: int | None) -> bool:
    if eos is not None and generated and generated[-1] == eos:
        return True
    if tokenizer is None:
        return False
    return answer_complete(tokenizer.decode(generated))


def score_retrieval(
    model: torch.nn.Module,
    prompt: RetrievalPrompt,
    make_cache: Callable[[], object] | None = None,
    *,
    prefill_chunk: int | None = None,
    tokenizer=None,
    max_new_tokens: int | None = None,
) -> RetrievalTrial:
    """Score one prompt through a fresh cache from ``make_cache()`` (default ``transformers.DynamicCache()``).

    The prompt ``[1, n]`` is prefilled in pieces of ``prefill_chunk`` tokens after the cache's sinks (None: one
    pass); the answer is teacher-forced one token at a time through the same cache (``logprob``). Greedy decoding
    agrees with the answer up to the first token whose argmax is not the answer's; there the cache is copied (or
    prefilled again when it cannot be) and greedy decoding continues to a newline, EOS or ``max_new_tokens``
    tokens in all (default :func:`generation_budget`); :func:`score_answer` judges the greedy text.
    """
    if prefill_chunk is not None:
        check_int(prefill_chunk, "prefill_chunk", lo=1)
    budget = generation_budget(prompt) if max_new_tokens is None else check_int(max_new_tokens, "max_new_tokens", lo=1)
    answer = list(prompt.answer_ids)
    check_positions(model, prompt.context + max(len(answer), budget) - 1)
    if make_cache is None:
        from transformers import DynamicCache

        make_cache = DynamicCache
    device = input_device(model)
    ids = prompt.input_ids.to(device)
    eos = getattr(tokenizer, "eos_token_id", None)
    start = time.perf_counter()

    def step(cache, token: int) -> torch.Tensor:
        return last_logprobs(model, torch.tensor([[token]], device=device), cache)

    with torch.inference_mode():
        cache = make_cache()
        logprobs = torch.log_softmax(prefill(model, ids, cache, prefill_chunk)[0], dim=-1)
        rows, greedy, fork = [], None, None
        for i, token in enumerate(answer):
            if i:
                logprobs = step(cache, answer[i - 1])
            rows.append(float(logprobs[token]))
            top = int(logprobs.argmax())
            if greedy is None and top != token:  # greedy decoding departs here: go on from a copy
                greedy, fork = [*answer[:i], top], _fork(cache)
                if fork is None:
                    fork = make_cache()
                    prefill(model, ids, fork, prefill_chunk)
                    for earlier in answer[:i]:
                        step(fork, earlier)
        if greedy is None:
            greedy = answer
        else:
            while len(greedy) < budget and not _stops(tokenizer, greedy, eos):
                greedy.append(int(step(fork, greedy[-1]).argmax()))
    seconds = time.perf_counter() - start
    if tokenizer is not None:
        text = answer_line(tokenizer.decode([t for t in greedy if t != eos]))
    else:
        text = " ".join(map(str, greedy))
    correct, recall = score_answer(prompt.answers, text, prompt.match)
    total = sum(rows)
    return RetrievalTrial(
        depth=prompt.depth,
        seed=prompt.seed,
        answers=prompt.answers,
        greedy_text=text,
        correct=correct,
        recall=recall,
        logprob=total,
        mean_token_logprob=total / len(answer),
        answer_tokens=len(answer),
        needle_positions=prompt.needle_positions,
        context=prompt.context,
        seconds=seconds,
    )


def run_retrieval(
    model: torch.nn.Module,
    tokenizer,
    corpus_text: str,
    *,
    kind: str,
    context: int,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 2,
    seed: int = 0,
    make_cache: Callable[[], object] | None = None,
    prefill_chunk: int | None = None,
    progress: bool = False,
) -> RetrievalResult:
    """Accuracy, recall and answer log-probability of ``model`` on task ``kind`` at ``context`` tokens over
    ``depths`` x ``trials``, each prompt built by :func:`make_retrieval_prompt` from :func:`trial_seed` with its
    haystack from ``corpus_text`` and scored by :func:`score_retrieval` through a fresh cache from ``make_cache``."""
    KINDS.get(kind)

    def trial(depth: float, prompt_seed: int) -> RetrievalTrial:
        prompt = make_retrieval_prompt(tokenizer, corpus_text, kind, context, depth, prompt_seed)
        return score_retrieval(model, prompt, make_cache, prefill_chunk=prefill_chunk, tokenizer=tokenizer)

    detail, depths, seconds = run_trials(
        model, kind, trial, context=context, depths=depths, trials=trials, seed=seed, progress=progress
    )
    overall = _summary(detail)
    return RetrievalResult(
        task=kind,
        context=context,
        trials=len(detail),
        accuracy=overall["accuracy"],
        accuracy_low=overall["accuracy_low"],
        accuracy_high=overall["accuracy_high"],
        recall=overall["recall"],
        mean_logprob=overall["mean_logprob"],
        mean_token_logprob=overall["mean_token_logprob"],
        per_depth={d: _summary([t for t in detail if t.depth == d]) for d in depths},
        trials_detail=detail,
        seconds=seconds,
    )


__all__ = [
    "RetrievalResult",
    "RetrievalTrial",
    "generation_budget",
    "run_retrieval",
    "score_retrieval",
    "wilson_interval",
]
