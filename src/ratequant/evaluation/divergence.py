"""Perplexity and KL divergence of several quantized conditions against full precision, window by window.

For each window the full-precision model runs once; its next-token log-probabilities are the reference
for every condition (a context manager under which the model runs quantized), so all conditions are
compared on the same tokens in the same process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ratequant.evaluation.perplexity import check_windows

Condition = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class ConditionResult:
    """``ppl`` and mean per-token ``kl`` = KL(p_full || p_condition) in nats, over ``tokens`` predictions."""

    ppl: float
    kl: float
    nll: float
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def evaluate_conditions(
    model: torch.nn.Module,
    windows: torch.Tensor,
    conditions: dict[str, Condition],
    *,
    progress: bool = True,
) -> dict[str, ConditionResult]:
    """Score ``conditions`` on ``windows`` (LongTensor ``[n, seq_len]``) against the unmodified model.

    ``conditions`` maps a name to a zero-argument callable returning a context manager (e.g. a simulated
    quantization); the result holds ``"full-precision"`` (KL 0) plus one entry per condition.
    """
    check_windows(windows)
    names = ["full-precision", *conditions]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    seconds = dict.fromkeys(names, 0.0)
    device = next(model.parameters()).device
    bar = tqdm(total=windows.shape[0] * len(names), desc="evaluating", unit="pass", disable=not progress or None, leave=False)
    for window in windows:
        ids = window.unsqueeze(0).to(device)
        targets = ids[0, 1:]
        start = time.perf_counter()
        reference = _log_probs(model, ids)
        seconds["full-precision"] += time.perf_counter() - start
        nll["full-precision"] += -reference.gather(1, targets[:, None]).double().sum().item()
        bar.update()
        for name, condition in conditions.items():
            start = time.perf_counter()
            with condition():
                log_probs = _log_probs(model, ids)
            seconds[name] += time.perf_counter() - start
            nll[name] += -log_probs.gather(1, targets[:, None]).double().sum().item()
            kl[name] += F.kl_div(log_probs, reference, log_target=True, reduction="sum").double().item()
            bar.update()
    bar.close()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {
        name: ConditionResult(
            ppl=math.exp(nll[name] / tokens), kl=kl[name] / tokens, nll=nll[name], tokens=tokens, seconds=seconds[name]
        )
        for name in names
    }


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[seq_len - 1, vocab]`` (float32) for one window ``ids [1, seq_len]``."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)
