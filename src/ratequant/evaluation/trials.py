"""What every needle-in-a-haystack task shares (passkey and the RULER-style retrieval tasks): the checks of a run's
context, depths and positions, one decode step through a cache, the seed of each trial, and the trial loop."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from ratequant.compat import cache_argument, max_positions
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import forward_log_probs
from ratequant.progress import progress_bar
from ratequant.validation import check_int

T = TypeVar("T")


def check_context(context: int) -> int:
    """``context`` if it is a positive number of tokens."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise RateQuantError(f"passkey context must be a positive number of tokens, got {context!r}")
    return context


def check_depth(depth: float) -> float:
    """``depth`` as a float if it lies in ``[0, 1]`` (the needle's place in the context)."""
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not math.isfinite(depth):
        raise RateQuantError(f"passkey depth must be a number in [0, 1], got {depth!r}")
    if not 0.0 <= depth <= 1.0:
        raise RateQuantError(f"passkey depth must be in [0, 1] (the needle's place in the context), got {depth}")
    return float(depth)


def check_depths(depths: Sequence[float], task: str) -> list[float]:
    """``depths`` as a list of distinct depths in ``[0, 1]``, at least one; errors name ``task``."""
    out = [check_depth(d) for d in depths]
    if not out:
        raise RateQuantError(f"{task} needs at least one depth")
    if len(set(out)) != len(out):
        raise RateQuantError(f"{task} depths must be distinct, got {out}")
    return out


def check_positions(model, positions: int) -> None:
    """Refuse a run that needs more ``positions`` than the model has."""
    limit = max_positions(model)
    if limit is not None and positions > limit:
        raise RateQuantError(
            f"passkey context needs {positions} positions but the model's max_position_embeddings is {limit}; "
            f"use a context of at most {limit} tokens minus the key's length"
        )


def last_logprobs(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run ``ids`` ``[1, t]`` through ``cache``; log-softmax of the last position's logits, ``[vocab]`` float32."""
    return forward_log_probs(model, ids, 1, **cache_argument(model, cache), use_cache=True)[0]


def trial_seed(task: str, seed: int, depth_index: int, trial_index: int) -> int:
    """The prompt seed of trial ``trial_index`` at depth ``depth_index`` of ``task`` in a run seeded ``seed``."""
    return random.Random(f"{task}:{seed}:{depth_index}:{trial_index}").getrandbits(62)


def run_trials(
    model: torch.nn.Module,
    task: str,
    trial: Callable[[float, int], T],
    *,
    context: int,
    depths: Sequence[float],
    trials: int,
    seed: int,
    progress: bool,
) -> tuple[list[T], list[float], float]:
    """The trial loop of passkey and every retrieval task: check ``context``, ``depths`` and ``trials`` against
    ``model``, then call ``trial(depth, prompt_seed)`` for every depth x trial in that order, each seed from
    :func:`trial_seed`. Returns the trials' results, the checked depths and the seconds the loop took."""
    check_positions(model, check_context(context))
    trials = check_int(trials, f"{task} trials", lo=1, hi=10_000)
    depths = check_depths(depths, task)
    start = time.perf_counter()
    detail: list[T] = []
    with progress_bar(total=len(depths) * trials, desc=task, unit="trial", enabled=progress) as bar:
        for i, depth in enumerate(depths):
            for j in range(trials):
                detail.append(trial(depth, trial_seed(task, seed, i, j)))
                bar.update(1)
    return detail, depths, time.perf_counter() - start


__all__ = [
    "check_context",
    "check_depth",
    "check_depths",
    "check_positions",
    "last_logprobs",
    "run_trials",
    "trial_seed",
]
