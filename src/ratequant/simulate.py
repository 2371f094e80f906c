"""Simulated ("fake") KV quantization for fast whole-sequence evaluation under a bit allocation.

Inside :func:`simulated_quantization` every attention layer of the model sees, for each query, exactly the
keys and values it would see when decoding token by token through a :class:`ratequant.cache.RateQuantCache`
with the same bit widths, quantizer and ``residual_length``: key/value ``j`` is quantized-then-dequantized
for the query at cache position ``t`` iff ``j < floor(t / F) * F`` (``F`` per kind, see
:func:`ratequant.cache.chunk_sizes`), and full precision otherwise. One forward pass over a whole window
therefore gives the streaming perplexity, to floating-point tolerance, without a decode loop.

How. Each layer's keys and values are fake-quantized once per forward (per bit group of heads, the prefix of
whole chunks; quantized values depend only on their chunk, so this equals what the cache stores). The
model's own attention implementation (sdpa, eager; soft-capping, sinks and scaling included) is then run
once over the concatenation ``[quantized copy; full-precision copy]`` of the keys/values, with a mask that
lets each query use the copy its position calls for: every key appears exactly once in each query's softmax.
This costs up to twice the attention work (four times when keys and values use different chunk sizes,
``residual_length=0`` with a token-grouped key design), no loop over tokens. When one copy suffices for all
queries (short windows, or ``F = 1``) the original attention runs unchanged on it.

Positions are cache indices. Use the context on whole sequences (no cache), or with a cache that keeps the
whole history (``DynamicCache()`` without a config, or a ``RateQuantCache``): a sliding-window cache layer
that drops old tokens shifts the indices. Note that a multi-token forward through a ``RateQuantCache``
(prefill longer than one chunk) sees its own tokens at full precision; the simulation models token-by-token
(or chunk-aligned) decoding.

Only the reconstruction is simulated: nothing here saves memory (use the cache and its ``nbytes()`` for
that).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ratequant.cache import (
    DEFAULT_RESIDUAL_LENGTH,
    bit_groups,
    check_bits_array,
    chunk_sizes,
    quantized_length,
    resolve_plan,
)
from ratequant.compat import boolean_attention_mask, intercept_attention, model_geometry, original_attention
from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS
from ratequant.quantizers.base import Quantizer


def fake_quantize_prefix(
    x: torch.Tensor, groups: list[tuple[int, tuple[int, ...]]], kind: str, chunk: int, quantizer: Quantizer
) -> torch.Tensor:
    """``x`` ``[B, H, S, D]`` with its first ``floor(S / chunk) * chunk`` tokens quantized-then-dequantized.

    ``groups`` is :func:`ratequant.cache.bit_groups` of the layer's widths for ``kind``; each group's heads
    are quantized together at its width, as the cache stores them.
    """
    prefix = quantized_length(x.shape[2], chunk)
    if prefix == 0:
        return x
    out = x.clone()
    for bits, heads in groups:
        lo = heads[0]
        index = slice(lo, lo + len(heads)) if heads == tuple(range(lo, lo + len(heads))) else list(heads)
        out[:, index, :prefix] = quantizer.fake_quantize(x[:, index, :prefix], bits, kind)
    return out


def quantized_masks(q_len: int, kv_len: int, chunks: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[q_len, kv_len]`` masks: True where the query sees the key (resp. value) quantized.

    Queries are the last ``q_len`` of ``kv_len`` cache positions (as during a forward with a cache).
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    return tuple(k_pos[None, :] < quantized_length(q_pos, f)[:, None] for f in chunks)  # type: ignore[return-value]


def _as_mask_format(mask: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask in the format the original implementation expects (bool, or additive float like ``like``)."""
    if like is None or like.dtype == torch.bool:
        return mask
    zero = torch.zeros((), dtype=like.dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(like.dtype).min)


@contextmanager
def simulated_quantization(
    model: nn.Module,
    bits,
    quantizer: Quantizer,
    residual_length: int = DEFAULT_RESIDUAL_LENGTH,
) -> Iterator[nn.Module]:
    """Make every attention layer of ``model`` see fake-quantized keys/values inside the context.

    Args:
        model: a Hugging Face decoder (anything :func:`ratequant.compat.check_supported` accepts).
        bits: integer widths ``[2, num_layers, num_kv_heads]`` (kind 0 = key, 1 = value).
        quantizer: the design to simulate.
        residual_length: the cache's full-precision window (same meaning as in :class:`RateQuantCache`).

    Positions are cache indices, so batches with left padding and forwards that extend a cache are handled
    as the cache would handle them. Restores the model's attention on exit.
    """
    if not isinstance(quantizer, Quantizer):
        raise RateQuantError(f"quantizer must be a ratequant Quantizer, got {type(quantizer).__name__}")
    geometry = model_geometry(model)
    arr = check_bits_array(bits, geometry.num_layers, geometry.num_kv_heads)
    chunks = chunk_sizes(quantizer, residual_length)
    groups = [[bit_groups(arr[k, layer]) for layer in range(geometry.num_layers)] for k in range(2)]

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        t, s = query.shape[2], key.shape[2]
        k_hat = fake_quantize_prefix(key, groups[0][layer], KINDS[0], chunks[0], quantizer)
        v_hat = fake_quantize_prefix(value, groups[1][layer], KINDS[1], chunks[1], quantizer)
        qk, qv = quantized_masks(t, s, chunks, query.device)
        if chunks[0] == chunks[1]:
            copies = [(k_hat, v_hat, qk), (key, value, ~qk)]
        else:
            copies = [
                (k_hat, v_hat, qk & qv),
                (k_hat, value, qk & ~qv),
                (key, v_hat, ~qk & qv),
                (key, value, ~qk & ~qv),
            ]
        base = boolean_attention_mask(attention_mask, t, s, device=query.device)
        used = [(k, v, base & m) for k, v, m in copies]
        used = [(k, v, m) for k, v, m in used if bool(m.any())]
        if len(used) <= 1:  # one copy serves every query: run the original attention on it unchanged
            k, v = (used[0][0], used[0][1]) if used else (key, value)
            return original_attention(module, query, k, v, attention_mask, **kwargs)
        keys = torch.cat([k for k, _, _ in used], dim=2)
        values = torch.cat([v for _, v, _ in used], dim=2)
        mask = _as_mask_format(torch.cat([m for _, _, m in used], dim=-1), attention_mask)
        return original_attention(module, query, keys, values, mask, **kwargs)

    with intercept_attention(model, attention):
        yield model


@contextmanager
def simulated_quantization_from_plan(
    model: nn.Module,
    plan,
    quantizer: Quantizer | None = None,
    *,
    residual_length: int | None = None,
    allow_mismatch: bool = False,
) -> Iterator[nn.Module]:
    """:func:`simulated_quantization` with the widths, quantizer and residual window of ``plan``.

    The plan is checked against the model's geometry and the quantizer (``quantizer`` defaults to the
    plan's own; another one raises unless ``allow_mismatch``, for distortion-model-mismatch studies).
    """
    bits, quantizer, residual = resolve_plan(plan, model, quantizer, residual_length, allow_mismatch)
    with simulated_quantization(model, bits, quantizer, residual) as m:
        yield m


__all__ = ["fake_quantize_prefix", "quantized_masks", "simulated_quantization", "simulated_quantization_from_plan"]
