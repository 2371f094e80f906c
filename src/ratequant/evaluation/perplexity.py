"""Perplexity over non-overlapping token windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ratequant.errors import RateQuantError


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll / tokens)``; ``tokens`` counts predicted tokens (``seq_len - 1`` per window)."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_windows(windows: torch.Tensor) -> None:
    """Token windows must be a LongTensor ``[n >= 1, seq_len >= 2]``."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise RateQuantError(f"windows must have shape [n >= 1, seq_len >= 2], got {shape}")


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (LongTensor ``[n, seq_len]``), each window evaluated on its own.

    The loss is summed in float64 over all predicted tokens, so the result does not depend on ``batch_size``
    beyond floating-point noise.
    """
    check_windows(windows)
    if batch_size < 1:
        raise RateQuantError(f"batch size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="window", disable=not progress or None, leave=False)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        total_nll += nll.double().sum().item()
        total_tokens += batch[:, 1:].numel()
        bar.update(batch.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    return PerplexityResult(
        ppl=math.exp(total_nll / total_tokens),
        nll=total_nll,
        tokens=total_tokens,
        windows=windows.shape[0],
        seq_len=windows.shape[1],
        seconds=seconds,
    )
