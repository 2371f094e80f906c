"""Simulated ("fake") KV quantization for fast whole-sequence evaluation under a :class:`KVQuantSpec`.

Inside :func:`simulated_quantization` every attention layer of the model sees, for each query, exactly the
keys and values it would see when decoding through a :class:`ratequant.cache.RateQuantCache` with the same
spec: key/value ``j`` is quantized-then-dequantized for the query at cache position ``t`` iff
``S <= j < s1(t)`` (the token rule of :mod:`ratequant.spec`: sink tokens and the query's own chunk stay at full
precision), and full precision otherwise. One forward pass over a whole window therefore gives the streaming
result, to floating-point tolerance, without a decode loop. ``prefill_chunk`` models a cache fed that many
tokens per forward pass after the sinks (a query then sees its whole pass at full precision); the default 1
is token-by-token decoding, which a prefill in pieces of the quantization chunk reproduces exactly.

How. Each layer's keys and values are fake-quantized once per forward (per bit group of heads, the whole
chunks after the sinks; quantized values depend only on their chunk, so this equals what the cache stores).
The model's own attention implementation (sdpa, eager; soft-capping, sinks and scaling included) then runs once
per run of consecutive queries that see the same quantized ranges (:func:`query_runs`: one per chunk), over the
keys/values mixed from the two copies as those queries see them and only up to the run's last query: about the
work of causal attention, in a few calls. Where the runs would be many (a short chunk and no residual window), it
runs once over the concatenation ``[quantized copy; full-precision copy]`` instead, with a mask that lets each
query use the copy its position calls for (every key exactly once in each query's softmax; twice the attention
work, four times when keys and values use different chunk sizes). When one copy suffices for all queries (short
windows, or ``F = 1``) the original attention runs unchanged on it.

Positions are cache indices. Use the context on whole sequences (no cache), or with a cache that keeps the
whole history (``DynamicCache()`` without a config, or a ``RateQuantCache``): a sliding-window cache layer
that drops old tokens shifts the indices.

Only the reconstruction is simulated: nothing here saves memory (use the cache and its ``nbytes()`` for that).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ratequant.compat import boolean_attention_mask, intercept_attention, original_attention
from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS
from ratequant.spec import KVQuantSpec, StoragePolicy


def fake_quantize_range(
    x: torch.Tensor, groups: list[tuple[int, tuple[int, ...]]], kind: str, policy: StoragePolicy, prefill_chunk: int = 1
) -> torch.Tensor:
    """``x`` ``[B, H, S, D]`` with its quantized range ``[s0, s1(S))`` quantized-then-dequantized, as stored.

    ``groups`` is :meth:`KVQuantSpec.groups` of the layer's ``kind``; each group's heads are quantized together
    at its width, as the cache stores them.
    """
    start = min(policy.sink_tokens, x.shape[2])
    end = policy.quantized_end(kind, x.shape[2], prefill_chunk)
    if end <= start:
        return x
    out = x.clone()
    for bits, heads in groups:
        lo = heads[0]
        index = slice(lo, lo + len(heads)) if heads == tuple(range(lo, lo + len(heads))) else list(heads)
        out[:, index, start:end] = policy.quantizer.fake_quantize(x[:, index, start:end], bits, kind)
    return out


def quantized_masks(
    q_len: int, kv_len: int, policy: StoragePolicy, device, prefill_chunk: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[q_len, kv_len]`` masks: True where the query sees the key (resp. value) quantized.

    Queries are the last ``q_len`` of ``kv_len`` cache positions (as during a forward with a cache).
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    after_sinks = k_pos[None, :] >= policy.sink_tokens
    return tuple(  # type: ignore[return-value]
        after_sinks & (k_pos[None, :] < policy.quantized_end(kind, q_pos, prefill_chunk)[:, None]) for kind in KINDS
    )


@contextmanager
def simulated_quantization(model: nn.Module, spec: KVQuantSpec, *, prefill_chunk: int = 1) -> Iterator[nn.Module]:
    """Make every attention layer of ``model`` see the keys/values of ``spec``'s cache inside the context.

    ``model`` is a Hugging Face decoder (anything :func:`ratequant.compat.check_supported` accepts); ``spec``
    must cover its layers and kv heads. Positions are cache indices, so batches with left padding and forwards
    that extend a cache are handled as the cache would handle them. Restores the model's attention on exit.
    """
    if not isinstance(spec, KVQuantSpec):
        raise RateQuantError(f"simulated_quantization needs a KVQuantSpec, got {type(spec).__name__}")
    spec.check_model(model)
    policy = spec.policy
    prefill_chunk = policy.check_prefill_chunk(prefill_chunk)
    groups = [[spec.groups(kind, layer) for layer in range(spec.num_layers)] for kind in KINDS]
    key_chunk, value_chunk = (max(f, prefill_chunk) for f in policy.chunks)

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        t, s = query.shape[2], key.shape[2]
        k_hat = fake_quantize_range(key, groups[0][layer], KINDS[0], policy, prefill_chunk)
        v_hat = fake_quantize_range(value, groups[1][layer], KINDS[1], policy, prefill_chunk)
        qk, qv = quantized_masks(t, s, policy, query.device, prefill_chunk)
        if key_chunk == value_chunk:
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
        runs = query_runs(policy, t, s, prefill_chunk)
        if len(runs) <= MAX_RUNS:
            return _attend_in_runs(
                module, query, (key, k_hat), (value, v_hat), base, attention_mask, runs, policy.sink_tokens, **kwargs
            )
        keys = torch.cat([k for k, _, _ in used], dim=2)
        values = torch.cat([v for _, v, _ in used], dim=2)
        mask = _as_mask_format(torch.cat([m for _, _, m in used], dim=-1), attention_mask)
        return original_attention(module, query, keys, values, mask, **kwargs)

    with intercept_attention(model, attention):
        yield model


MAX_RUNS = 64
"""Most runs of queries (consecutive queries that see the same quantized ranges) attended one run at a time; with
more (a short chunk and no residual window), one pass over both copies of the keys is cheaper."""


def query_runs(
    policy: StoragePolicy, q_len: int, kv_len: int, prefill_chunk: int = 1
) -> list[tuple[int, int, int, int]]:
    """``[(a, b, key_end, value_end)]``: the last ``q_len`` of ``kv_len`` cache positions cut into runs of queries
    ``[a, b)`` (indices among the queries) that see keys (values) quantized on ``[sinks, key_end)``
    (``[sinks, value_end)``) and at full precision elsewhere."""
    q_pos = torch.arange(kv_len - q_len, kv_len)
    ends = torch.stack([policy.quantized_end(kind, q_pos, prefill_chunk) for kind in KINDS])
    cuts = [0, *(torch.nonzero((ends[:, 1:] != ends[:, :-1]).any(dim=0)).flatten() + 1).tolist(), q_len]
    return [(a, b, int(ends[0, a]), int(ends[1, a])) for a, b in zip(cuts[:-1], cuts[1:])]


def _mixed(full: torch.Tensor, quantized: torch.Tensor, sinks: int, end: int, stop: int) -> torch.Tensor:
    """``[B, H, stop, D]``: positions ``[sinks, end)`` from ``quantized``, the others from ``full``."""
    end = min(end, stop)
    if end <= sinks:
        return full[:, :, :stop]
    return torch.cat([full[:, :, :sinks], quantized[:, :, sinks:end], full[:, :, end:stop]], dim=2)


def _attend_in_runs(module, query, keys, values, base, like, runs, sinks: int, **kwargs):
    """The original attention run by run of queries (:func:`query_runs`), each over one mix of the full-precision
    and quantized ``keys``/``values`` (``(full, quantized)`` pairs, ``[B, H, S, D]``) and only the keys up to its
    last query where the mask ``base`` allows: about the causal half of the work of one pass over both copies.
    Returns ``(output [B, T, H, D], weights [B, H, T, S] or None)`` as the original does."""
    t, s = query.shape[2], keys[0].shape[2]
    sinks = min(sinks, s)
    outputs, weights = [], []
    for a, b, key_end, value_end in runs:
        stop = s - t + b
        if bool(base[..., a:b, stop:].any()):  # not a causal mask: every key
            stop = s
        k = _mixed(*keys, sinks, key_end, stop)
        v = _mixed(*values, sinks, value_end, stop)
        out, w = original_attention(
            module, query[:, :, a:b], k, v, _as_mask_format(base[..., a:b, :stop], like), **kwargs
        )
        outputs.append(out)
        weights.append(None if w is None else torch.nn.functional.pad(w, (0, s - stop)))
    return torch.cat(outputs, dim=1), None if any(w is None for w in weights) else torch.cat(weights, dim=2)


def _as_mask_format(mask: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask in the format the original implementation expects (bool, or additive float like ``like``)."""
    if like is None or like.dtype == torch.bool:
        return mask
    zero = torch.zeros((), dtype=like.dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(like.dtype).min)


__all__ = ["fake_quantize_range", "quantized_masks", "simulated_quantization"]
