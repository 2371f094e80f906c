"""A mixed-precision, bit-packed KV cache for transformers' ``generate``.

:class:`RateQuantCache` is a ``transformers`` :class:`~transformers.Cache` made of one
:class:`RateQuantLayer` per decoder layer (the library's intended extension point: a new cache is a new layer
class). Every kv-head's keys and values have their own bit width; within a layer, the heads that share a
width (separately for keys and values) are quantized and stored together.

Residual policy (shared with :mod:`ratequant.simulate`, which reproduces it for whole sequences)
--------------------------------------------------------------------------------------------------
Positions are cache indices ``0, 1, ...`` (left padding included). They are quantized in aligned chunks of
``F`` tokens, ``F = residual_length`` (a positive multiple of the quantizer's ``token_group``), or, when
``residual_length == 0``, ``F = token_group(kind)`` (which may then differ between keys and values). Each
chunk ``[kF, (k+1)F)`` is quantized exactly once, right after the forward pass that delivered its last token,
and its stored codes are never touched again (Hugging Face's ``QuantizedCache`` instead re-quantizes the whole
cache whenever its residual fills, compounding error). Until then the chunk's tokens sit at full precision in
the residual window, so the residual holds at most ``F`` tokens. Consequences:

* Decoding one token at a time, the query at position ``t`` sees key/value ``j`` quantized iff
  ``j < floor(t / F) * F``: its own chunk at full precision, every earlier chunk as stored.
* A forward pass of several new tokens (prefill) sees the tokens stored before it as stored and its own
  new tokens at full precision (the convention of KIVI and of ``QuantizedCache``); it then stores
  ``floor(n / F) * F`` tokens and keeps the rest in the residual. Feeding a prompt in pieces aligned to
  ``F`` tokens gives exactly the token-by-token result above.
* The quantized value of a token depends only on its chunk, so it is deterministic: streaming and
  :func:`ratequant.simulate.simulated_quantization` agree to floating-point tolerance.

Padding. Left-padded positions hold the keys/values the model computed for the pad token (finite numbers,
masked out of attention). They are quantized like any token; with per-token designs they affect nothing
else, with token-grouped designs (KIVI keys) they share a group's range with real tokens of the same chunk.

Storage. For each (layer, kind, bit group) the packed codes and metadata of every stored chunk live in a
few tensors of shape ``[chunks, batch, ...]`` (the quantizer's tensors, one block per chunk). Growth is exact
by default (``growth=0``): storing new chunks reallocates the group's tensors at their new size, a copy of
the packed store once every ``F`` tokens (amortised ``O(S / F)`` bytes per token, below the ``O(S)`` read of
every decode step), and :meth:`RateQuantCache.nbytes` equals the data with no slack. ``growth > 0`` reserves
that fraction of extra chunks when growing (amortised ``O(1)`` appends, e.g. for ``residual_length=0``); the
reserved capacity is real memory and is counted. The residual window is a tensor per kind and layer in the
model's dtype holding exactly the tokens that wait for their chunk (``num_tokens mod F``; none at a multiple
of ``F``): each update writes it anew from the output it returns anyway, a copy of at most ``F`` tokens, so
a long cache carries no idle full-precision buffer.

Reads. Each update returns keys and values ``[batch, kv_heads, seq, head_dim]`` in head order and in the
model's dtype: all stored chunks decoded straight into that output by one prepared decoder per bit group
(:meth:`Quantizer.prepare_decode`: the native kernel of :mod:`ratequant.native` for min-max designs on the
CPU), then the residual. No dequantized copy is kept between steps unless ``buffer_bytes`` asks for one (it
costs full-precision memory).

Sliding-window layers (Mistral with ``sliding_window``, Gemma2/3) keep their whole history here and the
attention mask applies the window, which is correct; memory then grows like a full-attention layer (the
plan's byte formula counts every token, so it still matches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ratequant.compat import cache_base_classes
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import KINDS
from ratequant.quantizers.base import MAX_BITS, MIN_BITS, QuantizedTensor, Quantizer

Cache, CacheLayerMixin = cache_base_classes()

DEFAULT_RESIDUAL_LENGTH = 128
"""KIVI's full-precision residual window (Liu et al., ICML 2024), in tokens."""


# ----------------------------------------------------------------------------------------------------------
# policy helpers shared with ratequant.simulate
# ----------------------------------------------------------------------------------------------------------


def chunk_sizes(quantizer: Quantizer, residual_length: int) -> tuple[int, int]:
    """Quantization chunk ``F`` for (keys, values) under ``residual_length``; see the module docstring.

    ``residual_length`` must be 0 or a positive multiple of ``quantizer.token_group(kind)`` for both kinds.
    """
    if isinstance(residual_length, bool) or not isinstance(residual_length, (int, np.integer)) or residual_length < 0:
        raise RateQuantError(f"residual_length must be a non-negative integer, got {residual_length!r}")
    residual_length = int(residual_length)
    out = []
    for kind in KINDS:
        group = int(quantizer.token_group(kind))
        if group < 1:
            raise RateQuantError(f"quantizer {quantizer.name!r} reports token_group({kind!r}) = {group}")
        if residual_length == 0:
            out.append(group)
        elif residual_length % group:
            raise RateQuantError(
                f"residual_length={residual_length} is not a multiple of the {quantizer.name!r} quantizer's "
                f"{kind} token group ({group}); use a multiple of {group} (e.g. {math.lcm(group, 128)}) or 0"
            )
        else:
            out.append(residual_length)
    return out[0], out[1]


def quantized_length(query_positions: torch.Tensor | int, chunk: int) -> torch.Tensor | int:
    """How many leading keys a query at cache position ``t`` sees quantized: ``floor(t / F) * F``."""
    return (query_positions // chunk) * chunk


def check_bits_array(bits, num_layers: int | None = None, num_kv_heads: int | None = None) -> np.ndarray:
    """Validate a ``[2, layers, kv_heads]`` array of integer bit widths in 1..8; returns it as int64."""
    arr = np.asarray(bits)
    if arr.ndim != 3 or arr.shape[0] != 2 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise RateQuantError(
            f"bits must have shape [2, num_layers, num_kv_heads] (kind 0 = key, 1 = value), got {arr.shape}"
        )
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise RateQuantError("bits must hold integer bit widths")
    arr = arr.astype(np.int64)
    if arr.min() < MIN_BITS or arr.max() > MAX_BITS:
        raise RateQuantError(f"bit widths must be from {MIN_BITS} to {MAX_BITS}, got {arr.min()}..{arr.max()}")
    wrong_layers = num_layers is not None and arr.shape[1] != num_layers
    if wrong_layers or num_kv_heads is not None and arr.shape[2] != num_kv_heads:
        raise PlanError(
            f"bits have shape {arr.shape} but the model has {num_layers} layers with {num_kv_heads} kv-heads; "
            "use a plan made for this model"
        )
    return arr


def bit_groups(widths: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """Heads grouped by width: ``[(bits, (head, ...)), ...]`` in increasing width."""
    widths = [int(b) for b in widths]
    return [(b, tuple(h for h, w in enumerate(widths) if w == b)) for b in sorted(set(widths))]


def resolve_plan(plan, model, quantizer: Quantizer | None, residual_length: int | None, allow_mismatch: bool):
    """Check ``plan`` against ``model`` (and ``quantizer`` when given); returns ``(bits, quantizer, residual)``.

    ``plan`` is a :class:`ratequant.plan.Plan` (or anything with ``bits_array()``, ``quantizer``,
    ``residual_length``, ``check_matches(geometry)`` and ``check_quantizer(quantizer, allow_mismatch=)``).
    """
    from ratequant.compat import model_geometry
    from ratequant.quantizers import from_config

    geometry = model_geometry(model)
    plan.check_matches(geometry)
    if quantizer is None:
        quantizer = from_config(plan.quantizer)
    plan.check_quantizer(quantizer, allow_mismatch=allow_mismatch)
    residual = plan.residual_length if residual_length is None else residual_length
    bits = check_bits_array(plan.bits_array(), geometry.num_layers, geometry.num_kv_heads)
    return bits, quantizer, residual


# ----------------------------------------------------------------------------------------------------------
# byte accounting
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheBytes:
    """Allocated bytes of a cache: packed ``codes``, ``metadata`` (scales, zeros, norms), ``residual`` window,
    and the optional dequantized working ``buffer`` (0 unless the cache was given ``buffer_bytes``)."""

    codes: int = 0
    metadata: int = 0
    residual: int = 0
    buffer: int = 0

    def __post_init__(self) -> None:
        for name in ("codes", "metadata", "residual", "buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise RateQuantError(f"CacheBytes.{name} must be a non-negative integer, got {value!r}")

    @property
    def total(self) -> int:
        return int(self.codes + self.metadata + self.residual + self.buffer)

    def __add__(self, other: CacheBytes) -> CacheBytes:
        return CacheBytes(
            self.codes + other.codes,
            self.metadata + other.metadata,
            self.residual + other.residual,
            self.buffer + other.buffer,
        )

    def to_dict(self) -> dict:
        return {**{k: int(v) for k, v in asdict(self).items()}, "total": self.total}


def _progression(heads: tuple[int, ...]) -> slice | None:
    """``heads`` as a slice when they are evenly spaced (a strided view reaches them), else None."""
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if step > 0 and heads == tuple(range(heads[0], heads[-1] + 1, step)):
        return slice(heads[0], heads[-1] + 1, step)
    return None


def _check_buffer_bytes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise RateQuantError(f"buffer_bytes must be a non-negative integer (0 = no working buffer), got {value!r}")
    return int(value)


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _is_code_tensor(t: torch.Tensor) -> bool:
    """Integer tensors are packed codes; floating tensors are metadata."""
    return not (t.is_floating_point() or t.is_complex())


def expected_nbytes(
    bits,
    quantizer: Quantizer,
    head_dim: int,
    num_tokens: int,
    *,
    batch_size: int = 1,
    residual_length: int = DEFAULT_RESIDUAL_LENGTH,
    dtype: torch.dtype = torch.float16,
) -> CacheBytes:
    """Bytes a :class:`RateQuantCache` should hold after ``num_tokens`` tokens, from the plan formula.

    Stored tokens per kind: ``floor(num_tokens / F) * F``, each costing ``quantizer.bits_per_token`` / 8
    bytes per head (codes ``head_dim * bits``, the rest metadata); plus the ``num_tokens mod F`` tokens of
    each (layer, kind)'s residual window in ``dtype``. Row padding of packed codes and metadata rounding make
    the real cache differ slightly (tested to stay within 1% of the stored part).
    """
    arr = check_bits_array(bits)
    _, num_layers, num_heads = arr.shape
    chunks = chunk_sizes(quantizer, residual_length)
    codes = metadata = residual = 0.0
    elem = torch.empty((), dtype=dtype).element_size()
    for k, kind in enumerate(KINDS):
        quantized = quantized_length(int(num_tokens), chunks[k])
        stored = quantized * batch_size
        for b in arr[k].ravel():
            codes += stored * head_dim * int(b) / 8
            metadata += stored * quantizer.metadata_bits_per_token(head_dim, int(b), kind) / 8
        residual += num_layers * batch_size * num_heads * (int(num_tokens) - quantized) * head_dim * elem
    return CacheBytes(int(round(codes)), int(round(metadata)), int(residual))


# ----------------------------------------------------------------------------------------------------------
# storage of one (layer, kind, bit group)
# ----------------------------------------------------------------------------------------------------------


class _GroupStore:
    """Packed chunks of the heads that share one bit width, for one (layer, kind).

    ``tensors[name]`` has shape ``[capacity_chunks, batch, *rest]``: the quantizer's tensor for one chunk of
    one batch row is ``tensors[name][c, b]``. A chunk block is quantized as ``[batch, heads, F, head_dim]``;
    several chunks are folded into the batch axis (``[chunks * batch, ...]``), which requires every tensor
    the quantizer returns to be batch-major (true of every design in :mod:`ratequant.quantizers`).
    """

    def __init__(self, bits: int, heads: tuple[int, ...], kind: str, chunk: int, growth: float):
        self.bits, self.heads, self.kind, self.chunk, self.growth = bits, heads, kind, chunk, growth
        self.head_slice = _progression(heads)
        self._decoders: dict[tuple[int, int], tuple[Quantizer, Callable]] = {}
        self.tensors = {}
        self.num_chunks = 0
        self.head_dim = 0  # set when the layer initialises

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self._tensors

    @tensors.setter
    def tensors(self, value: dict[str, torch.Tensor]) -> None:
        self._tensors = value
        self._decoders.clear()  # prepared decoders point into the old tensors

    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def select_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.head_slice] if self.head_slice is not None else x[:, list(self.heads)]

    def append(self, x: torch.Tensor, quantizer: Quantizer) -> None:
        """Quantize and store ``x`` ``[B, Hg, m * F, D]`` (``m`` whole chunks of this group's heads)."""
        b, h, t, d = x.shape
        m = t // self.chunk
        folded = x.reshape(b, h, m, self.chunk, d).permute(2, 0, 1, 3, 4).reshape(m * b, h, self.chunk, d)
        q = quantizer.quantize(folded, self.bits, self.kind)
        new = {}
        for name, tensor in q.tensors.items():
            if tensor.dim() == 0 or tensor.shape[0] != m * b:
                raise RateQuantError(
                    f"quantizer {quantizer.name!r} returned tensor {name!r} of shape {tuple(tensor.shape)} for a "
                    f"block of batch {m * b}; the cache needs batch-major tensors (first dimension = batch)"
                )
            new[name] = tensor.reshape(m, b, *tensor.shape[1:])
        if self.tensors and (
            set(new) != set(self.tensors)
            or any(new[k].shape[1:] != self.tensors[k].shape[1:] for k in new)
        ):
            raise RateQuantError(
                f"quantizer {quantizer.name!r} changed the layout of its stored tensors between chunks"
            )
        needed = self.num_chunks + m
        if needed > self.capacity():
            capacity = needed if self.growth <= 0 else max(needed, math.ceil(self.capacity() * (1 + self.growth)))
            self._reallocate(capacity, new)
        for name, tensor in new.items():
            buf = self.tensors[name]
            if tensor.dtype != buf.dtype:  # e.g. a block whose scales overflowed float16 is stored in float32
                buf = self.tensors[name] = buf.to(torch.promote_types(buf.dtype, tensor.dtype))
            buf[self.num_chunks : needed].copy_(tensor)
        self.num_chunks = needed
        self._decoders.clear()

    def _reallocate(self, capacity: int, like: dict[str, torch.Tensor]) -> None:
        out = {}
        for name, tensor in like.items():
            old = self.tensors.get(name)
            dtype = tensor.dtype if old is None else torch.promote_types(old.dtype, tensor.dtype)
            buf = torch.empty((capacity, *tensor.shape[1:]), dtype=dtype, device=tensor.device)
            if old is not None and self.num_chunks:
                buf[: self.num_chunks].copy_(old[: self.num_chunks])
            out[name] = buf
        self.tensors = out

    def block(self, first: int, last: int, dtype: torch.dtype) -> QuantizedTensor:
        """Chunks ``first..last-1`` as one quantized block of batch ``(last - first) * B`` (views, no copy)."""
        n = last - first
        b = next(iter(self.tensors.values())).shape[1]
        tensors = {k: v[first:last].reshape(n * b, *v.shape[2:]) for k, v in self.tensors.items()}
        shape = (n * b, len(self.heads), self.chunk, self.head_dim)
        return QuantizedTensor(tensors=tensors, shape=shape, bits=self.bits, kind=self.kind, dtype=dtype)

    def dequantize_into(self, quantizer: Quantizer, out: torch.Tensor, first: int, last: int) -> None:
        """Write chunks ``first..last-1`` into ``out`` ``[B, Hg, (last - first) * F, D]`` (may be strided).

        The decoder of each range is prepared once (:meth:`Quantizer.prepare_decode`) and reused until the
        store changes, so a decode step costs one kernel call per bit group.
        """
        view = out.unflatten(2, (last - first, self.chunk)).permute(2, 0, 1, 3, 4)  # [n, B, Hg, F, D]
        prepared = self._decoders.get((first, last))
        if prepared is None or prepared[0] is not quantizer:
            prepared = (quantizer, quantizer.prepare_decode(self.block(first, last, out.dtype)))
            self._decoders[(first, last)] = prepared
        prepared[1](view)

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis (dim 1) of every stored tensor (beam reorder, selection, repeat)."""
        self.tensors = {k: fn(v[: self.num_chunks], 1) for k, v in self.tensors.items()}

    def truncate(self, num_chunks: int) -> None:
        """Drop chunks beyond ``num_chunks``; exact-size mode also releases their memory."""
        if num_chunks >= self.num_chunks:
            return
        self.num_chunks = num_chunks
        if self.growth <= 0 and self.tensors:
            self.tensors = {k: v[: self.num_chunks].clone() for k, v in self.tensors.items()}

    def nbytes(self) -> CacheBytes:
        codes = sum(_storage_bytes(t) for t in self.tensors.values() if _is_code_tensor(t))
        meta = sum(_storage_bytes(t) for t in self.tensors.values() if not _is_code_tensor(t))
        return CacheBytes(codes=codes, metadata=meta)


class _KindStore:
    """Keys or values of one layer: bit groups of packed chunks + a full-precision residual window."""

    def __init__(self, widths: Sequence[int], kind: str, chunk: int, growth: float, buffer_bytes: int = 0):
        self.kind, self.chunk, self.growth = kind, chunk, growth
        self.groups = [_GroupStore(b, heads, kind, chunk, growth) for b, heads in bit_groups(widths)]
        self.num_heads = len(widths)
        self.residual: torch.Tensor | None = None  # [B, H, residual_len, D]: exactly the waiting tokens
        # optional working buffer: the dequantized values of the first `buffered` stored chunks
        self.buffer_bytes = buffer_bytes
        self.buffer_limit = 0  # chunks the byte limit allows; set by initialise
        self.buffer: torch.Tensor | None = None  # [B, H, capacity * F, D] in the model's dtype
        self.buffered = 0

    @property
    def num_chunks(self) -> int:
        return self.groups[0].num_chunks

    @property
    def residual_len(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def stored_len(self) -> int:
        return self.num_chunks * self.chunk

    def initialise(self, batch: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.residual = torch.empty(batch, self.num_heads, 0, head_dim, dtype=dtype, device=device)
        for g in self.groups:
            g.head_dim = head_dim
        self._set_buffer_limit()

    def _set_buffer_limit(self) -> None:
        b, h, _, d = self.residual.shape
        self.buffer_limit = self.buffer_bytes // (b * h * self.chunk * d * self.residual.element_size())

    def update(self, x: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        """Append ``x`` ``[B, H, T, D]``; return all ``[B, H, S, D]``: stored (dequantized), residual, ``x``.

        Whole chunks are then quantized from the full-precision residual + new tokens.
        """
        b, h, t, d = x.shape
        p, r = self.stored_len, self.residual_len
        out = torch.empty(b, h, p + r + t, d, dtype=self.residual.dtype, device=self.residual.device)
        self.read_stored(out, quantizer)
        out[:, :, p : p + r] = self.residual
        out[:, :, p + r :] = x
        m = (r + t) // self.chunk
        if m:
            fresh = out[:, :, p : p + m * self.chunk]
            for g in self.groups:
                g.append(g.select_heads(fresh), quantizer)
            self._fill_buffer(quantizer)
        self.residual = out[:, :, p + m * self.chunk :].clone()  # exactly the waiting tokens, owning its storage
        return out

    def _fill_buffer(self, quantizer: Quantizer) -> None:
        """Dequantize newly stored chunks once into the working buffer, as far as its byte limit allows."""
        want = min(self.num_chunks, self.buffer_limit)
        if want <= self.buffered:
            return
        b, h, _, d = self.residual.shape
        f = self.chunk
        have = 0 if self.buffer is None else self.buffer.shape[2] // f
        if want > have:
            cap = want if self.growth <= 0 else min(self.buffer_limit, max(want, math.ceil(have * (1 + self.growth))))
            grown = torch.empty(b, h, cap * f, d, dtype=self.residual.dtype, device=self.residual.device)
            if self.buffered:
                grown[:, :, : self.buffered * f] = self.buffer[:, :, : self.buffered * f]
            self.buffer = grown
        self._dequantize_chunks(self.buffer[:, :, self.buffered * f : want * f], quantizer, self.buffered, want)
        self.buffered = want

    def _dequantize_chunks(self, out: torch.Tensor, quantizer: Quantizer, first: int, last: int) -> None:
        """Write stored chunks ``first..last-1`` (all heads) into ``out`` ``[B, H, (last - first) * F, D]``."""
        for g in self.groups:
            if g.head_slice is not None:
                g.dequantize_into(quantizer, out[:, g.head_slice], first, last)
            else:  # heads not evenly spaced: decode the group, then scatter its heads
                part = out.new_empty(out.shape[0], len(g.heads), *out.shape[2:])
                g.dequantize_into(quantizer, part, first, last)
                out[:, list(g.heads)] = part

    def read_stored(self, out: torch.Tensor, quantizer: Quantizer) -> None:
        """Write the dequantized stored chunks into ``out[:, :, :stored_len]`` in head order.

        Chunks held in the working buffer are copied from it; the others are decoded from their codes.
        """
        n = self.num_chunks
        if n == 0:
            return
        f, k = self.chunk, min(self.buffered, n)
        if k:
            out[:, :, : k * f] = self.buffer[:, :, : k * f]
        if n > k:
            self._dequantize_chunks(out[:, :, k * f : n * f], quantizer, k, n)

    def read(self, quantizer: Quantizer) -> torch.Tensor:
        b, h, _, d = self.residual.shape
        p, r = self.stored_len, self.residual_len
        out = torch.empty(b, h, p + r, d, dtype=self.residual.dtype, device=self.residual.device)
        self.read_stored(out, quantizer)
        out[:, :, p:] = self.residual
        return out

    def map_batch(self, fn) -> None:
        for g in self.groups:
            g.map_batch(fn)
        self.residual = fn(self.residual, 0)
        if self.buffer is not None:
            self.buffer = fn(self.buffer[:, :, : self.buffered * self.chunk], 0)
        self._set_buffer_limit()  # the batch size may have changed

    def crop(self, length: int, quantizer: Quantizer) -> bool:
        """Keep the first ``length`` tokens; returns True when stored codes had to be cut (lossy)."""
        p, r = self.stored_len, self.residual_len
        if length >= p:
            self.residual = self.residual[:, :, : min(r, length - p)].clone()
            return False
        keep = length // self.chunk
        partial = length - keep * self.chunk
        if partial:  # the surviving head of a stored chunk returns to the residual as its dequantized values
            b, h, _, d = self.residual.shape
            part = torch.empty(b, h, self.chunk, d, dtype=self.residual.dtype, device=self.residual.device)
            self._dequantize_chunks(part, quantizer, keep, keep + 1)
        self.residual = part[:, :, :partial].clone() if partial else self.residual[:, :, :0].clone()
        for g in self.groups:
            g.truncate(keep)
        if self.buffered > keep:
            self.buffered = keep
            if self.growth <= 0:  # exact size: release the dropped chunks
                self.buffer = self.buffer[:, :, : keep * self.chunk].clone() if keep else None
        return partial > 0

    def tensors(self) -> Iterator[torch.Tensor]:
        if self.residual is not None:
            yield self.residual
        if self.buffer is not None:
            yield self.buffer
        for g in self.groups:
            yield from g.tensors.values()

    def nbytes(self) -> CacheBytes:
        total = CacheBytes(
            residual=_storage_bytes(self.residual) if self.residual is not None else 0,
            buffer=_storage_bytes(self.buffer) if self.buffer is not None else 0,
        )
        for g in self.groups:
            total = total + g.nbytes()
        return total

    def to(self, device) -> None:
        if self.residual is not None:
            self.residual = self.residual.to(device, non_blocking=True)
        if self.buffer is not None:
            self.buffer = self.buffer.to(device, non_blocking=True)
        for g in self.groups:
            g.tensors = {k: v.to(device, non_blocking=True) for k, v in g.tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# transformers cache layer and cache
# ----------------------------------------------------------------------------------------------------------


class RateQuantLayer(CacheLayerMixin):
    """One decoder layer's mixed-precision KV cache.

    Args:
        key_bits, value_bits: bit width (1..8) of each kv-head's keys / values, length ``num_kv_heads``.
        quantizer: the :class:`~ratequant.quantizers.Quantizer` design that stores them.
        residual_length: full-precision residual window ``F`` in tokens (0: quantize each token group as soon
            as it is complete); see the module docstring for the exact policy.
        growth: extra capacity reserved when a packed store grows (0 = exact size).
        buffer_bytes: byte limit of this layer's optional working buffer of dequantized stored chunks
            (default 0: none). Half goes to keys, half to values; each holds the dequantized values of its
            first stored chunks, as many as fit, so those are copied instead of decoded on every step. It is
            full-precision memory, reported as :attr:`CacheBytes.buffer`.

    ``update`` returns keys/values ``[batch, kv_heads, seq, head_dim]`` in head order and the model's dtype.
    All tensors live on the device of the first ``update`` (so models spread with ``device_map`` work).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False  # crop into a stored chunk cannot restore the tokens' full-precision values

    def __init__(
        self,
        key_bits: Sequence[int],
        value_bits: Sequence[int],
        quantizer: Quantizer,
        residual_length: int = DEFAULT_RESIDUAL_LENGTH,
        *,
        growth: float = 0.0,
        buffer_bytes: int = 0,
    ):
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise RateQuantError(f"quantizer must be a ratequant Quantizer, got {type(quantizer).__name__}")
        if len(key_bits) != len(value_bits) or len(key_bits) == 0:
            raise RateQuantError(
                f"key_bits and value_bits must give one width per kv-head, got {len(key_bits)} and {len(value_bits)}"
            )
        if not isinstance(growth, (int, float)) or isinstance(growth, bool) or not 0 <= growth <= 4:
            raise RateQuantError(f"growth must be a number in [0, 4], got {growth!r}")
        self.buffer_bytes = _check_buffer_bytes(buffer_bytes)
        check_bits_array([[list(key_bits)], [list(value_bits)]])
        self.quantizer = quantizer
        self.residual_length = int(residual_length)
        self.growth = float(growth)
        self.key_bits = tuple(int(b) for b in key_bits)
        self.value_bits = tuple(int(b) for b in value_bits)
        self.chunks = chunk_sizes(quantizer, residual_length)
        self.cumulative_length = 0
        self.lossy_crop = False
        self._make_stores()

    def _make_stores(self) -> None:
        self._stores = (
            _KindStore(self.key_bits, "key", self.chunks[0], self.growth, self.buffer_bytes // 2),
            _KindStore(self.value_bits, "value", self.chunks[1], self.growth, self.buffer_bytes // 2),
        )

    def __repr__(self) -> str:
        return (
            f"RateQuantLayer(key_bits={list(self.key_bits)}, value_bits={list(self.value_bits)}, "
            f"quantizer={self.quantizer.name!r}, residual_length={self.residual_length}, "
            f"seq_len={self.cumulative_length})"
        )

    # -- transformers CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise RateQuantError(
                f"expected keys and values of equal shape [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        b, h, _, d = key_states.shape
        if h != len(self.key_bits):
            raise PlanError(
                f"the model gives {h} kv-heads for this layer but the bit widths name {len(self.key_bits)}; "
                "use a plan made for this model"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.head_dim = b, d
        for store in self._stores:
            store.initialise(b, d, self.dtype, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, T, D]`` keys/values; return all keys/values ``[B, H, S, D]`` for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        expected = (self.batch_size, len(self.key_bits), self.head_dim)
        if (b, h, d) != expected or value_states.shape != key_states.shape:
            raise RateQuantError(
                f"update of shape {tuple(key_states.shape)} / {tuple(value_states.shape)} does not fit this cache "
                f"layer (batch {self.batch_size}, {len(self.key_bits)} kv-heads, head_dim {self.head_dim}); "
                "call reset() before reusing the cache for another batch"
            )
        if not (bool(torch.isfinite(key_states).all()) and bool(torch.isfinite(value_states).all())):
            raise RateQuantError(
                "keys or values hold NaN or Inf; KV tensors must be finite to quantize (this update was refused "
                "and the cache is unchanged; a float16 model may overflow: try bfloat16 or float32)"
            )
        keys = self._stores[0].update(key_states.to(self.dtype), self.quantizer)
        values = self._stores[1].update(value_states.to(self.dtype), self.quantizer)
        self.cumulative_length += t
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop all stored data (memory released); the layer re-initialises on the next update."""
        self.cumulative_length = 0
        self.lossy_crop = False
        self.is_initialized = False
        self._make_stores()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as transformers passes it).

        Cropping inside the residual window is exact. Cropping into a stored chunk puts the chunk's
        surviving tokens back in the residual as their dequantized values (what attention saw); they are
        quantized again when the chunk refills, and :attr:`lossy_crop` becomes True.
        """
        if tokens_to_remove > 0:
            raise RateQuantError(
                f"crop takes a negative count of tokens to remove, got {tokens_to_remove}; "
                "use crop(-n) to drop the last n tokens"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = max(0, self.cumulative_length + tokens_to_remove)
        for store in self._stores:
            self.lossy_crop |= store.crop(length, self.quantizer)
        self.cumulative_length = length

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            for store in self._stores:
                store.map_batch(fn)
            self.batch_size = self._stores[0].residual.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows of every stored tensor (lossless: codes move, no re-quantizing)."""
        idx = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._map_batch(lambda t, dim: t.index_select(dim, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows ``indices`` (integer indices or a boolean mask)."""
        if not self.is_initialized:
            return
        idx = torch.as_tensor(indices, device=self.device)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long().flatten()
        self._map_batch(lambda t, dim: t.index_select(dim, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def offload(self) -> None:
        if self.is_initialized:
            for store in self._stores:
                store.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            for store in self._stores:
                store.to(self.device)

    # -- ratequant ---------------------------------------------------------------------------------------
    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values attention would see now ``[B, H, S, D]`` (without adding tokens)."""
        if not self.is_initialized:
            raise RateQuantError("the cache layer is empty")
        return self._stores[0].read(self.quantizer), self._stores[1].read(self.quantizer)

    def stored_lengths(self) -> tuple[int, int]:
        """Tokens held quantized for (keys, values); the rest are in the residual window."""
        return self._stores[0].stored_len, self._stores[1].stored_len

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (residual buffers, packed codes, metadata)."""
        return [t for store in self._stores for t in store.tensors()]

    def nbytes(self) -> CacheBytes:
        """Real allocated bytes of this layer, split into codes, metadata and residual."""
        return self._stores[0].nbytes() + self._stores[1].nbytes()


class RateQuantCache(Cache):
    """Mixed-precision bit-packed KV cache: one :class:`RateQuantLayer` per layer.

    Args:
        bits: integer array ``[2, num_layers, num_kv_heads]`` (kind 0 = key, 1 = value), widths 1..8.
        quantizer: the design that stores every head (e.g. ``get_quantizer("kivi")``).
        residual_length: full-precision window in tokens (default 128, as KIVI); see the module docstring.
        growth: extra capacity reserved when a packed store grows (default 0: exact size).
        buffer_bytes: byte limit of an optional working buffer of dequantized chunks, split evenly over the
            layers (default 0: none, the packed store is decoded on every step). A buffer trades memory for
            decode speed and is counted in :meth:`nbytes` as ``buffer``.

    Use ``model.generate(..., cache=RateQuantCache(...))`` (``past_key_values=`` before transformers 5.24) or
    :meth:`from_plan`. Works with greedy and sampled decoding, beam search, batches with padding, ``crop``
    and ``reset``.
    """

    def __init__(
        self,
        bits,
        quantizer: Quantizer,
        residual_length: int = DEFAULT_RESIDUAL_LENGTH,
        *,
        growth: float = 0.0,
        buffer_bytes: int = 0,
    ):
        arr = check_bits_array(bits)
        per_layer = _check_buffer_bytes(buffer_bytes) // arr.shape[1]
        layers = [
            RateQuantLayer(arr[0, i], arr[1, i], quantizer, residual_length, growth=growth, buffer_bytes=per_layer)
            for i in range(arr.shape[1])
        ]
        super().__init__(layers=layers)
        self.bits = arr
        self.quantizer = quantizer
        self.residual_length = int(residual_length)

    @classmethod
    def from_plan(
        cls,
        plan,
        model,
        quantizer: Quantizer | None = None,
        *,
        residual_length: int | None = None,
        allow_mismatch: bool = False,
        growth: float = 0.0,
        buffer_bytes: int = 0,
    ) -> RateQuantCache:
        """A cache for ``model`` following ``plan`` (a :class:`ratequant.plan.Plan`).

        Checks the plan's geometry against the model and the quantizer against the one the plan was made
        for (``quantizer`` defaults to the plan's own; a different one raises unless ``allow_mismatch``).
        ``residual_length`` defaults to the plan's.
        """
        bits, quantizer, residual = resolve_plan(plan, model, quantizer, residual_length, allow_mismatch)
        return cls(bits, quantizer, residual, growth=growth, buffer_bytes=buffer_bytes)

    def __repr__(self) -> str:
        return (
            f"RateQuantCache(layers={len(self.layers)}, quantizer={self.quantizer.name!r}, "
            f"mean_bits={self.bits.mean():.3f}, residual_length={self.residual_length}, "
            f"seq_len={self.get_seq_length()})"
        )

    def nbytes(self) -> CacheBytes:
        """Real allocated bytes of the whole cache, split into codes, metadata and residual."""
        total = CacheBytes()
        for layer in self.layers:
            total = total + layer.nbytes()
        return total

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds."""
        return [t for layer in self.layers for t in layer.tensors()]

    @property
    def lossy_crop(self) -> bool:
        """True when a ``crop`` cut into stored chunks since the last ``reset``."""
        return any(layer.lossy_crop for layer in self.layers)


__all__ = [
    "DEFAULT_RESIDUAL_LENGTH",
    "CacheBytes",
    "RateQuantCache",
    "RateQuantLayer",
    "bit_groups",
    "check_bits_array",
    "chunk_sizes",
    "expected_nbytes",
    "quantized_length",
    "resolve_plan",
]
