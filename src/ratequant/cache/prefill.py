"""Chunked prefill: a long prompt fed through a cache piece by piece, so activation memory is bounded by a piece.

A one-shot prefill of ``T`` tokens materialises ``T``-long activations in every layer (attention scores grow
as ``T^2`` on the eager path) while the cache itself may hold a few MiB; feeding ``P`` tokens at a time keeps
the peak at one piece's activations plus the cache. The first piece holds the sink tokens and ``P`` more, every
later piece ``P`` tokens, so that with a :class:`~ratequant.cache.RateQuantCache` each query sees exactly what
:meth:`ratequant.spec.StoragePolicy.quantized_end` says it sees with ``prefill_chunk=P``. A piece's attention
over the history (:func:`piece_attention`) must not undo that bound: through a RateQuantCache it reads the
history one block at a time (:func:`ratequant.cache.attention.attention_in_blocks`), through another cache it
hands grouped-query keys to SDPA once per kv head (:func:`ratequant.compat.grouped_attention`); otherwise the
decoded or repeated history would be the largest tensors of a late piece. (Importing this module does not
import torch, so the command line can show the default.)

A plain ``model.generate(..., cache=RateQuantCache(spec, model=model))`` runs the prompt in one pass instead. Its
attention still reads the history block by block (the cache routes the model's attention, see
:class:`~ratequant.cache.RateQuantCache`) and each layer's keys and values are quantized right after that layer's
update, so the float history of all layers never exists; but the pass holds ``T`` tokens of activations and one
layer's ``T`` keys and values. ``model.generate(..., prefill_chunk_size=P)`` (transformers' chunked prefill)
bounds those to ``P`` tokens; its pieces start at token 0 rather than after the sinks, so a query's view of the
prompt follows :meth:`~ratequant.spec.StoragePolicy.quantized_end` only without sink tokens and with ``P``
dividing, or a multiple of, the quantization chunks (what :func:`prefill` checks; its pieces start after the
sinks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import TYPE_CHECKING

from ratequant.validation import check_int

if TYPE_CHECKING:
    import torch

DEFAULT_PREFILL_CHUNK = 512


def piece_bounds(tokens: int, chunk: int, sink_tokens: int = 0) -> list[int]:
    """``[0, S + P, S + 2P, ..., tokens]``: the boundaries of the pieces of a ``tokens``-long prompt."""
    check_int(chunk, "prefill chunk", lo=1)
    first = min(tokens, sink_tokens + chunk)
    return [0, *range(first, tokens, chunk), tokens] if tokens else [0]


@contextmanager
def piece_attention(model, cache) -> Iterator[None]:
    """Inside the context, passes of ``model`` over a history use the least memory they can: with a
    :class:`~ratequant.cache.RateQuantCache`, attention reads its stores block by block
    (:func:`ratequant.cache.packed_attention`); with another cache, grouped-query keys go to SDPA once per kv
    head (:func:`ratequant.compat.grouped_attention`). A model whose attention cannot be intercepted runs
    unchanged."""
    from ratequant.cache import RateQuantCache, packed_attention
    from ratequant.cache.attention import attention_from_codes
    from ratequant.compat import intercept_attention
    from ratequant.errors import UnsupportedModelError

    with ExitStack() as stack:
        with suppress(UnsupportedModelError):
            if isinstance(cache, RateQuantCache):
                stack.enter_context(packed_attention(model, cache))
            else:
                stack.enter_context(intercept_attention(model, attention_from_codes))
        yield


def prefill(model, input_ids: torch.Tensor, cache, chunk: int | None) -> torch.Tensor:
    """Feed ``input_ids [B, T]`` (no padding) through ``cache`` in pieces of ``chunk`` tokens after the cache's
    sink tokens (one pass when None; with a :class:`~ratequant.cache.RateQuantCache` the chunk must divide, or be
    a multiple of, its quantization chunks), inside :func:`piece_attention`; returns the float32 logits of the
    last position ``[B, vocab]``."""
    import torch

    from ratequant.compat import cache_argument, logits_to_keep_argument
    from ratequant.errors import RateQuantError

    total = input_ids.shape[1]
    if total == 0:
        raise RateQuantError("nothing to prefill: the input holds no tokens")
    spec = getattr(cache, "spec", None)
    if spec is not None and chunk is not None:
        spec.policy.check_prefill_chunk(chunk)  # so that each query sees what quantized_end says
    bounds = [0, total] if chunk is None else piece_bounds(total, chunk, getattr(spec, "sink_tokens", 0))
    if hasattr(cache, "reserve"):  # a RateQuantCache allocates the prompt's stores once, not once per piece
        cache.reserve(cache.get_seq_length() + total)
    logits = None
    with torch.inference_mode(), piece_attention(model, cache):
        for lo, hi in zip(bounds, bounds[1:]):
            out = model(
                input_ids=input_ids[:, lo:hi],
                use_cache=True,
                **logits_to_keep_argument(model, 1),
                **cache_argument(model, cache),
            )
            logits = out.logits[:, -1].float()
            del out
    return logits


__all__ = ["DEFAULT_PREFILL_CHUNK", "piece_attention", "piece_bounds", "prefill"]
