"""Conditions: the ways a model can be run over a window, each giving next-token log-probabilities.

* :class:`FullPrecision` -- the model as it is (the reference every other condition is scored against);
* :class:`Simulated` -- simulated quantization of a :class:`~ratequant.spec.KVQuantSpec` over the whole
  window in one pass (:mod:`ratequant.cache.simulate`): fast, and what the cache would give token by token;
* :class:`Streaming` -- the window fed through a real :class:`~ratequant.cache.RateQuantCache`, prefilled in
  pieces of ``prefill_chunk`` tokens after the sinks, with the attention generation uses
  (:func:`ratequant.cache.prefill.piece_attention`; bounded activation memory);
* :class:`Within` -- any context manager around one pass (e.g. rank reduction);
* :class:`PeerCache` -- another library's cache (e.g. transformers' ``QuantizedCache``), the window in one pass.

:meth:`Condition.log_probs` returns float32 log-probabilities ``[seq_len - first, vocab]`` of the tokens
``first .. seq_len - 1`` of a window ``ids [1, seq_len]`` (row ``i`` predicts token ``first + i``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ratequant.cache.prefill import piece_attention, piece_bounds
from ratequant.compat import cache_argument, logits_to_keep_argument
from ratequant.geometry import KINDS
from ratequant.spec import KVQuantSpec


def forward_log_probs(model: torch.nn.Module, ids: torch.Tensor, keep: int, **kwargs) -> torch.Tensor:
    """Log-probabilities ``[keep, vocab]`` (float32) from the last ``keep`` positions of ``model(ids)``."""
    logits = model(input_ids=ids, **logits_to_keep_argument(model, keep), **kwargs).logits[0, -keep:].float()
    return torch.log_softmax(logits, dim=-1)


class Condition(ABC):
    """One way of running the model; ``label`` names it in progress messages."""

    label: str = ""

    @abstractmethod
    def log_probs(self, model: torch.nn.Module, ids: torch.Tensor, first: int) -> torch.Tensor:
        """Log-probabilities ``[S - first, vocab]`` predicting tokens ``first .. S - 1`` of ``ids [1, S]``."""


@dataclass
class FullPrecision(Condition):
    label: str = "full precision"

    def log_probs(self, model, ids, first):
        return whole_window(model, ids, first)


@dataclass
class Within(Condition):
    """One pass inside the context manager that ``context()`` returns (e.g. a simulated rank reduction)."""

    context: Callable[[], contextlib.AbstractContextManager]
    label: str = ""

    def log_probs(self, model, ids, first):
        with self.context():
            return whole_window(model, ids, first)


@dataclass
class Simulated(Condition):
    """Simulated quantization of ``spec`` over the whole window (token-by-token semantics by default)."""

    spec: KVQuantSpec
    prefill_chunk: int = 1
    label: str = "simulated"

    def log_probs(self, model, ids, first):
        from ratequant.cache.simulate import simulated_quantization

        with simulated_quantization(model, self.spec, prefill_chunk=self.prefill_chunk):
            return whole_window(model, ids, first)


@dataclass
class Streaming(Condition):
    """The window through a real :class:`RateQuantCache` of ``spec``: the first piece holds the sink tokens and
    ``prefill_chunk`` more, every later piece ``prefill_chunk`` tokens. It equals
    ``Simulated(spec, prefill_chunk=piece)``; the default piece, the smaller of the two kinds' quantization chunks,
    reproduces token-by-token decoding exactly (the residual window's 128 tokens by default; one token when
    ``residual_length=0`` makes the value chunk a single token). ``last_cache`` keeps the last cache (to read its
    bytes)."""

    spec: KVQuantSpec
    prefill_chunk: int | None = None
    label: str = "streaming"
    last_cache: object | None = field(default=None, repr=False)

    @property
    def piece(self) -> int:
        return self.spec.policy.check_prefill_chunk(self.prefill_chunk or min(self.spec.chunks))

    def log_probs(self, model, ids, first):
        from ratequant.cache import RateQuantCache

        cache = RateQuantCache(self.spec, model=model)
        n = ids.shape[1]
        bounds = piece_bounds(n, self.piece, self.spec.sink_tokens)
        parts = []
        with piece_attention(model, cache):  # attention reads the stores as generate's prefill does
            for lo, hi in zip(bounds, bounds[1:]):
                # rows for the scored predictions in this piece; every token goes through the cache, the last
                # too, so the cache ends holding the whole window (its bytes are then exact)
                keep = max(hi - max(lo, first - 1), 1)
                kwargs = {**cache_argument(model, cache), "use_cache": True}
                log_probs = forward_log_probs(model, ids[:, lo:hi], keep, **kwargs)
                parts.append(log_probs[: max(0, min(hi, n - 1) - max(lo, first - 1))])
        self.last_cache = cache
        return torch.cat(parts)


@dataclass
class PeerCache(Condition):
    """Another library's cache, a fresh one from ``make_cache()`` per window (e.g. transformers' ``QuantizedCache``
    with the HQQ backend); the window goes through it in one pass, and the retrieval tasks decode with it."""

    make_cache: Callable[[], object]
    label: str = "peer cache"

    def log_probs(self, model, ids, first):
        cache = self.make_cache()
        kwargs = {**cache_argument(model, cache), "use_cache": True}
        return forward_log_probs(model, ids, ids.shape[1] - first + 1, **kwargs)[:-1]


def quantized_predictions(spec: KVQuantSpec, seq_len: int, first: int, prefill_chunk: int = 1) -> int:
    """How many of a window's scored predictions (of tokens ``first .. seq_len - 1``, made by the queries at
    positions ``first - 1 .. seq_len - 2``) read at least one key or value from quantized storage, by the token
    rule of :class:`~ratequant.spec.StoragePolicy` (sinks and the query's own chunk stay at full precision;
    ``prefill_chunk`` as :class:`Simulated` and :class:`Streaming` take it). 0 means the plan changed nothing."""
    queries = torch.arange(max(first - 1, 0), seq_len - 1)
    sinks = queries.clamp(max=spec.sink_tokens)
    seen = torch.zeros_like(queries, dtype=torch.bool)
    for kind in KINDS:
        seen |= spec.policy.quantized_end(kind, queries, prefill_chunk) > sinks
    return int(seen.sum())


def whole_window(model: torch.nn.Module, ids: torch.Tensor, first: int) -> torch.Tensor:
    """One pass over ``ids [1, S]`` without a cache: log-probabilities predicting tokens ``first .. S - 1``."""
    return forward_log_probs(model, ids, ids.shape[1] - first + 1, use_cache=False)[:-1]


__all__ = [
    "Condition",
    "FullPrecision",
    "PeerCache",
    "Simulated",
    "Streaming",
    "Within",
    "forward_log_probs",
    "quantized_predictions",
    "whole_window",
]
