"""Attention straight from the packed cache: decode steps never decode the history, prefill pieces one block.

On the decode path every step decodes the whole stored history into a ``[B, H, n, D]`` tensor in the model's
dtype and hands it to SDPA, which reads it again (and, for grouped-query attention, repeats it per query
head). Reading the stores themselves, a step of at most :data:`MAX_QUERY` tokens instead computes, per layer
and kv head,

* scores from the packed keys: each stored row is read once and dotted with every query row that kv head
  serves (``G = num_heads / num_kv_heads`` heads times the query tokens); for per-channel keys the scale and
  zero are folded into the query, ``q . (s * c + z) = (q * s) . c + q . z``, so the dot products run on the
  codes;
* softmax over sinks, stored chunks and the full-precision tail (masks, soft-capping and sliding windows as
  the model's mask says);
* the output from the packed values, each row read once and accumulated with its weights (for per-token
  groups as ``(p * s) * c``, the ``p * z`` terms summed apart).

A step is one native call per layer (:func:`ratequant.kernels.native.attend_layer`: every bit group of both kinds,
sinks, tail, mask, soft-capping and softmax) for every design on the CPU: the min-max designs (``uniform``,
``kivi``) as stored, ``quarot`` and ``turbo`` in their rotated space (below); where that call declines its
arguments, the same step is composed op by op (:func:`scores` and :func:`weighted_values` dispatch per bit group
to the kernel's :meth:`~ratequant.kernels.native.PreparedDecode.attend`, with a decode-then-``matmul`` branch as a
safety net; a GPU kernel would be one more branch there).

Rotated designs attend in the rotated space, exactly as orthogonality allows (:meth:`KindStore.rotation`):
``quarot`` stores a Hadamard rotation ``H`` of each token in per-token min-max, ``turbo`` a random rotation in a
Lloyd-Max codebook that the kernel reads as its table of code values (``gain * levels[code]``). The query rows
are rotated once, ``q' = q R_k``, the full-precision sinks and tail once per step (``R`` is orthogonal, so
``q' . (k R_k) = q . k``), the kernel scores ``q'`` against the stored rotated codes and accumulates the rotated
values, and the output is rotated back once per step and kv head, ``o = o' R_v^T``. The history is never
decoded nor unrotated.

A cache layer hands its stores over only where the kernel serves them (:meth:`KindStore.reads_packed`): CUDA
tensors and a missing kernel keep the decode path, which is faster there. Longer forward passes (prefill pieces)
attend block by block on the CPU (:func:`attention_in_blocks`): each block of the history is decoded to float32
and attended with PyTorch's fused kernel, the blocks merged by their log-sum-exp, so a piece late in a long prompt
never holds the decoded history (two float32 copies of every key and value) nor a float mask over it. Attention
calls that do not come from a cache in this mode take the model's own attention.

How a pass gets here. ``RateQuantCache(spec, model=model)`` (and :meth:`~ratequant.cache.RateQuantCache.from_plan`)
routes the model's attention through :func:`cache_attention` (:func:`route_packed`), for every thread and for
good (:func:`restore_attention` undoes it): a plain ``model.generate(..., cache=cache)`` or forward loop then
reads the stores, and calls without packed handles (other caches, no cache) run the model's own implementation
bit for bit. The cache layer hands over handles only where the attention the call will reach reads them
(:func:`reads_handles`: not inside another interception such as simulated quantization in the same thread).
:func:`packed_attention` does the same for one cache inside a context, also for caches made without a model,
and there hands grouped keys of other passes to SDPA once per kv head instead of repeated per query head
(:func:`~ratequant.compat.grouped_attention`, the same result to float rounding).

Results equal the decode path to float32 rounding (the tests state the tolerance): the arithmetic is float32
whatever the model's dtype, where the decode path rounds the decoded history to the model's dtype first.

One module of this size because the decode step, the long passes in blocks and the routing between them read the
same packed views and share their masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ratequant.cache.storage import PackedView
from ratequant.compat import (
    attention_is_causal,
    attention_modules,
    boolean_attention_mask,
    current_attention,
    grouped_attention,
    intercept_attention,
    original_attention,
    route_attention,
    unroute_attention,
)
from ratequant.errors import RateQuantError, UnsupportedModelError
from ratequant.kernels import native

ATTENTION_PATHS = ("packed", "decode")
"""How a :class:`~ratequant.cache.RateQuantCache` made for a model attends: ``packed`` reads the stores
themselves (this module), ``decode`` decodes the history for the model's own attention on every step."""

MAX_QUERY = 16
"""Forward passes of at most this many new tokens attend from the packed codes; longer ones in blocks."""
BLOCK_TOKENS = 1024
"""Keys per block of :func:`attention_in_blocks` (rounded up to a multiple of the quantization chunks)."""
VIEW = "_ratequant_packed_view"
"""The attribute by which a cache layer hands its :class:`PackedView` to :func:`attention_from_codes`."""


def packed_handle(view: PackedView, like: torch.Tensor) -> torch.Tensor:
    """An empty tensor carrying ``view``: what a cache layer returns as keys or values in this mode."""
    out = like.new_empty(0)
    setattr(out, VIEW, view)
    return out


def _heads(group) -> slice | list[int]:
    return group.head_slice if group.head_slice is not None else list(group.heads)


def _rotated(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Tokens ``x`` ``[B, H, n, D]`` in the space of the stored rows: ``x @ R`` float32, or ``x`` itself (its
    dtype kept) without a rotation (:meth:`KindStore.rotation`)."""
    return x if rotation is None else x.float() @ rotation


def scores(view: PackedView, queries: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """``queries`` ``[B, H, R, D]`` float32 (R query rows per kv head, scaled) against every key of ``view``:
    ``[B, H, R, n]`` float32 in token order (sinks, stored chunks, tail). With ``rotation`` (the keys'
    :meth:`KindStore.rotation` ``R``) the queries are already rotated (``q R``) and the keys are read rotated."""
    store = view.store
    s, p = store.sink_len, view.chunks * store.chunk
    b, h, r, _ = queries.shape
    out = queries.new_empty(b, h, r, view.length)
    out[..., :s] = queries @ _rotated(store.sink, rotation).float().transpose(-1, -2)
    out[..., s + p :] = queries @ _rotated(view.tail, rotation).float().transpose(-1, -2)
    for group in store.groups if p else ():
        heads = _heads(group)
        q = queries[:, heads].contiguous()
        part = q.new_empty(b, q.shape[1], r, p)
        prepared = group.attend_block(store.quantizer, 0, view.chunks, store.residual.dtype)
        if prepared is None or not prepared.attend(b, q, part, weighted=False):
            part = q @ _decoded(store, group, view.chunks, rotation).transpose(-1, -2)
        out[:, heads, :, s : s + p] = part
    return out


def weighted_values(view: PackedView, weights: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """``weights`` ``[B, H, R, n]`` float32 over the values of ``view``: ``[B, H, R, D]`` float32 (with
    ``rotation``, the values' :meth:`KindStore.rotation` ``R``: in the rotated space, to be multiplied by ``R.T``)."""
    store = view.store
    s, p = store.sink_len, view.chunks * store.chunk
    out = weights[..., :s] @ _rotated(store.sink, rotation).float()
    out += weights[..., s + p :] @ _rotated(view.tail, rotation).float()
    for group in store.groups if p else ():
        heads = _heads(group)
        w = weights[:, heads, :, s : s + p].contiguous()
        part = torch.zeros_like(out[:, heads])
        prepared = group.attend_block(store.quantizer, 0, view.chunks, store.residual.dtype)
        if prepared is None or not prepared.attend(w.shape[0], w, part, weighted=True):
            part = w @ _decoded(store, group, view.chunks, rotation)
        out[:, heads] += part
    return out


def _decoded(store, group, chunks: int, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """The group's first ``chunks`` stored chunks decoded, ``[B, Hg, chunks * F, D]`` float32 (times ``rotation``
    when given: the space the kernel reads them in)."""
    b, _, _, d = store.residual.shape
    out = torch.empty(b, len(group.heads), chunks * store.chunk, d, dtype=torch.float32, device=store.residual.device)
    group.dequantize_into(store.quantizer, out, 0, chunks)
    return _rotated(out, rotation)


def _mask(attention_mask, batch: int, queries: int, keys: int, device, is_causal: bool) -> torch.Tensor:
    """The mask an attention call received as booleans ``[B or 1, 1, queries, keys]``, its shape checked."""
    mask = boolean_attention_mask(attention_mask, queries, keys, device=device, is_causal=is_causal)
    if mask.dim() != 4 or tuple(mask.shape[1:]) != (1, queries, keys) or mask.shape[0] not in (1, batch):
        raise RateQuantError(
            f"packed attention got a mask of shape {tuple(mask.shape)} for {queries} queries and {keys} keys"
        )
    return mask


def _flash_attention():
    """PyTorch's fused CPU attention that also returns each row's log-sum-exp (None where this build lacks it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def reads_in_blocks(device: torch.device) -> bool:
    """True when long passes over tensors on ``device`` can attend block by block (:func:`attention_in_blocks`)."""
    return device.type == "cpu" and _flash_attention() is not None


def _block_bounds(kv: PackedView, vv: PackedView) -> list[int]:
    """Token bounds of the blocks :func:`attention_in_blocks` reads: the sinks, then :data:`BLOCK_TOKENS` (a
    multiple of both kinds' quantization chunks) at a time."""
    s, n = kv.store.sink_len, kv.length
    step = math.lcm(kv.store.chunk, vv.store.chunk)
    step *= -(-BLOCK_TOKENS // step)
    return sorted({0, *range(s, n, step), n})


def _bands(mask: torch.Tensor | None, causal: bool, t: int, n: int, lo: int, hi: int, device) -> list[tuple]:
    """The bands of query rows that see keys ``lo..hi-1`` as ``(first row, end row, seen)``, ``seen`` the boolean
    mask ``[B or 1, 1, rows, hi - lo]`` over the block or None where every row of the band sees all of it.

    With a mask, one band: the rows that see any key of the block (causal and sliding masks make them a band).
    Without one (a causal pass, keys aligned to the end), the masked band is at most a block's width of rows on
    the diagonal, the rows after it see the whole block: no mask over the pass is ever built."""
    if mask is not None:
        rows = mask[..., lo:hi].any(-1).flatten(0, 1).any(0).nonzero()
        if rows.numel() == 0:
            return []
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        return [(r0, r1, mask[..., r0:r1, lo:hi])]
    if not causal:
        return [(0, t, None)]
    offset = n - t  # query row i sits at key position offset + i and sees the keys up to it
    first = min(t, max(0, lo - offset))
    full = min(t, max(first, hi - 1 - offset))
    bands = []
    if full > first:
        keys = torch.arange(lo, hi, device=device)[None, :]
        seen = keys <= torch.arange(first + offset, full + offset, device=device)[:, None]
        bands.append((first, full, seen[None, None]))
    if t > full:
        bands.append((full, t, None))
    return bands


def attention_in_blocks(module, query, kv: PackedView, vv: PackedView, attention_mask, **kwargs):
    """Attention of a long pass (``query [B, Hq, T, D]``) over the views, :data:`BLOCK_TOKENS` keys at a time:
    each block's stored chunks are decoded to float32, attended with PyTorch's fused CPU kernel (grouped-query
    heads served without repeating keys), and the blocks' outputs merged by their log-sum-exp, so the decoded
    history, its per-head copies and the float mask over it never exist whole. Each block is attended only by
    the band of query rows the mask lets see it (causal passes skip the blocks after a row, sliding windows
    those before its window); a causal pass without a mask (a whole prompt in one pass) builds a mask only over
    the block's diagonal rows. Returns ``(output [B, T, Hq, D], None)`` in the query's dtype."""
    b, hq, t, d = query.shape
    n = kv.length
    causal = attention_is_causal(module, kwargs)
    mask = None if attention_mask is None else _mask(attention_mask, b, t, n, query.device, causal)
    q = query.float()
    flash = _flash_attention()
    out = torch.zeros(b, hq, t, d, dtype=torch.float32, device=query.device)
    total = torch.full((b, hq, t), float("-inf"), dtype=torch.float32, device=query.device)  # log-sum-exp so far
    bounds = _block_bounds(kv, vv)
    for lo, hi in zip(bounds, bounds[1:]):
        bands = _bands(mask, causal, t, n, lo, hi, query.device)
        if not bands:
            continue
        keys, values = kv.read(lo, hi), vv.read(lo, hi)
        for r0, r1, seen in bands:  # seen: [B or 1, 1, r1 - r0, hi - lo] or None (all of the block)
            bias = None
            if seen is not None:
                bias = torch.zeros(seen.shape, dtype=torch.float32, device=query.device)
                bias.masked_fill_(~seen, float("-inf"))
            part, lse = flash(q[:, :, r0:r1], keys, values, 0.0, False, attn_mask=bias, scale=kwargs.get("scaling"))
            if seen is not None:
                lse = lse.masked_fill(~seen.any(-1), float("-inf"))  # the kernel reports 0 for rows seeing nothing
            before = total[:, :, r0:r1]
            merged = torch.logaddexp(before, lse)
            keep = torch.exp(before - merged).nan_to_num_(0.0)  # NaN only where neither side saw anything
            add = torch.exp(lse - merged).nan_to_num_(0.0)
            out[:, :, r0:r1].mul_(keep[..., None]).add_(part.mul_(add[..., None]))  # in place: no band-sized copies
            total[:, :, r0:r1] = merged
    return out.transpose(1, 2).to(query.dtype), None


def attention_from_codes(module, query, key, value, attention_mask, **kwargs):
    """An attention function (transformers' interface) that reads keys and values from :class:`PackedView`
    handles; plain tensors (longer passes) go to the model's own attention, with keys not repeated per query
    head (:func:`~ratequant.compat.grouped_attention`). Returns ``(output [B, T, Hq, D], None)``."""
    kv, vv = getattr(key, VIEW, None), getattr(value, VIEW, None)
    if kv is None or vv is None:
        if kv is not None or vv is not None or key.numel() == 0:  # a handle copied by the model loses its view
            raise RateQuantError("attention received packed keys without packed values, or an empty copy of them")
        return grouped_attention(module, query, key, value, attention_mask, **kwargs)
    b, hq, t, d = query.shape
    unsupported = kwargs.get("s_aux") is not None or (kwargs.get("dropout") and module.training)
    if unsupported or (t > MAX_QUERY and (kwargs.get("softcap") or kwargs.get("position_bias") is not None)):
        return original_attention(module, query, kv.materialize(), vv.materialize(), attention_mask, **kwargs)
    if t > MAX_QUERY:
        return attention_in_blocks(module, query, kv, vv, attention_mask, **kwargs)
    hk = kv.store.num_heads
    if hq % hk:
        raise RateQuantError(f"packed attention got {hq} query heads for {hk} kv heads (not a multiple)")
    g = hq // hk
    scaling = kwargs.get("scaling")
    scale = d**-0.5 if scaling is None else scaling
    rows = (query.float() * scale).reshape(b, hk, g * t, d)  # query head j of kv head h is head h * g + j
    softcap = kwargs.get("softcap")
    n = kv.length
    # one query after every key sees them all (transformers' sdpa rule): no mask
    mask = None if attention_mask is None and t == 1 else _mask(attention_mask, b, t, n, query.device, True)
    rk, rv = kv.store.rotation(), vv.store.rotation()  # rotated designs attend in the rotated space
    if rk is not None:
        rows = rows @ rk
    keys, values = _layer_kind(kv, rk), _layer_kind(vv, rv)
    out = None
    if keys is not None and values is not None:
        out = native.attend_layer(rows, t, keys, values, None if mask is None else mask[:, 0].contiguous(), softcap)
    if out is None:
        out = _attend_step(kv, vv, rows, mask, softcap, rk, rv)
    if rv is not None:
        out = out @ rv.T  # back from the values' rotated space, once per step and kv head
    out = out.view(b, hk, g, t, d).reshape(b, hq, t, d)
    return out.transpose(1, 2).to(query.dtype), None


def _layer_kind(view: PackedView, rotation: torch.Tensor | None = None) -> native.LayerKind | None:
    """A view as :func:`ratequant.kernels.native.attend_layer` reads it (sinks, prepared bit groups, tail; the sinks and
    tail rotated into the stored rows' space by ``rotation`` when given), or None when a group has no kernel."""
    store = view.store
    groups = []
    for group in store.groups if view.chunks else ():
        prepared = group.attend_block(store.quantizer, 0, view.chunks, store.residual.dtype)
        if prepared is None:
            return None
        groups.append((prepared, group.heads))
    return _rotated(store.sink, rotation), groups, _rotated(view.tail, rotation)


def _attend_step(
    kv: PackedView,
    vv: PackedView,
    rows: torch.Tensor,
    mask: torch.Tensor | None,
    softcap,
    key_rotation: torch.Tensor | None = None,
    value_rotation: torch.Tensor | None = None,
):
    """The step :func:`ratequant.kernels.native.attend_layer` computes in one call, composed op by op (per bit group:
    the kernel's scores or weighted values, else decode-then-matmul): ``rows [B, H, R, D]`` scaled float32
    (rotated by ``key_rotation`` when given) -> ``[B, H, R, D]`` float32 (in ``value_rotation``'s space)."""
    logits = scores(kv, rows, key_rotation)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is None:
        weights = torch.softmax(logits, dim=-1)
    else:
        b, h, r, n = logits.shape
        t = mask.shape[2]
        logits = logits.view(b, h, r // t, t, n).masked_fill(~mask[:, :, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num_(0.0).view(b, h, r, n)  # rows seeing nothing: 0
    return weighted_values(vv, weights, value_rotation)


def cache_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention of a model a :class:`~ratequant.cache.RateQuantCache` was made for (:func:`route_packed`):
    calls given packed handles go to :func:`attention_from_codes`; every other call (another cache, no cache,
    the decode path) runs the model's own implementation unchanged, bit for bit. Returns ``(output [B, T, Hq, D],
    attention weights or None)``."""
    if getattr(key, VIEW, None) is None and getattr(value, VIEW, None) is None:
        return original_attention(module, query, key, value, attention_mask, **kwargs)
    return attention_from_codes(module, query, key, value, attention_mask, **kwargs)


def reads_handles(module: torch.nn.Module) -> bool:
    """Whether the attention ``module`` runs now, in the calling thread, reads packed handles: inside
    :func:`packed_attention` or on a model :func:`route_packed` routed, unless another interception (say
    :func:`ratequant.cache.simulate.simulated_quantization`) covers it in this thread."""
    return current_attention(module) in (attention_from_codes, cache_attention)


def route_packed(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """Make every later forward of ``model`` (``model.generate`` included, any thread) read the stores of a
    RateQuantCache it is given, with no context manager: the model's attention goes through
    :func:`cache_attention` (:func:`ratequant.compat.route_attention`), which leaves calls without packed handles
    to the model's own implementation, so other caches give exactly the results they gave before. What
    ``RateQuantCache(spec, model=model)`` does; :func:`restore_attention` undoes it. Returns the attention
    modules by layer, or None where the model's attention cannot be routed (its caches then decode)."""
    try:
        return route_attention(model, cache_attention)
    except UnsupportedModelError:
        return None


def restore_attention(model: torch.nn.Module) -> None:
    """Undo :func:`route_packed`: ``model`` gets its own attention implementation name back, and the caches made
    for it decode the history on every step (their results agree to float32 rounding)."""
    unroute_attention(model)


@contextmanager
def packed_attention(model: torch.nn.Module, cache) -> Iterator[torch.nn.Module]:
    """Inside the context, passes of ``model`` with ``cache`` (a :class:`~ratequant.cache.RateQuantCache`) in the
    calling thread read the cache's stores themselves: decode steps straight from the packed codes, longer
    passes block by block (:func:`attention_in_blocks`); other passes of the thread keep grouped keys unrepeated
    (:func:`~ratequant.compat.grouped_attention`). A cache made with ``model=`` does the former without it
    (:func:`route_packed`); this context also serves caches made without a model or with ``attention="decode"``.
    Restores the model and the cache on exit."""
    layers = list(cache.layers)
    before = [(layer.attend_packed, layer.attention_module) for layer in layers]
    with intercept_attention(model, attention_from_codes):
        for layer, module in zip(layers, attention_modules(model)):
            layer.attend_packed = True
            layer.bind(module)
        try:
            yield model
        finally:
            for layer, (packed, module) in zip(layers, before):
                layer.attend_packed = packed
                layer.bind(module)


__all__ = [
    "ATTENTION_PATHS",
    "BLOCK_TOKENS",
    "MAX_QUERY",
    "attention_from_codes",
    "attention_in_blocks",
    "cache_attention",
    "packed_attention",
    "packed_handle",
    "reads_handles",
    "reads_in_blocks",
    "restore_attention",
    "route_packed",
    "scores",
    "weighted_values",
]
