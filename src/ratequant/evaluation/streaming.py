"""Perplexity through a real KV cache, one token at a time (what generation sees)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ratequant.compat import cache_argument
from ratequant.evaluation.perplexity import PerplexityResult, check_windows


@torch.inference_mode()
def streaming_perplexity(
    model: torch.nn.Module, windows: torch.Tensor, make_cache: Callable[[], object], *, progress: bool = True
) -> tuple[PerplexityResult, list]:
    """Perplexity of ``model`` on ``windows [n, seq_len]``, feeding each window token by token through a new
    cache from ``make_cache()`` (e.g. a :class:`ratequant.cache.RateQuantCache`).

    Returns the result and, per window, the cache after the window's last token (holding all ``seq_len``
    tokens, to read its bytes).
    """
    check_windows(windows)
    device = next(model.parameters()).device
    steps = windows.shape[0] * (windows.shape[1] - 1)
    bar = tqdm(total=steps, desc="streaming", unit="tok", disable=not progress or None, leave=False)
    total_nll, caches = 0.0, []
    start = time.perf_counter()
    for window in windows:
        ids = window.unsqueeze(0).to(device)
        cache = make_cache()
        for t in range(ids.shape[1]):  # the last token is fed too, so the cache ends holding the whole window
            logits = model(input_ids=ids[:, t : t + 1], **cache_argument(model, cache), use_cache=True).logits[0, -1]
            if t + 1 < ids.shape[1]:
                total_nll += F.cross_entropy(logits.float()[None], ids[0, t + 1 : t + 2]).item()
                bar.update()
        caches.append(cache)
    bar.close()
    result = PerplexityResult(
        ppl=math.exp(total_nll / steps),
        nll=total_nll,
        tokens=steps,
        windows=windows.shape[0],
        seq_len=windows.shape[1],
        seconds=time.perf_counter() - start,
    )
    return result, caches
