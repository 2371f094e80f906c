"""Storage of one layer's keys or values: sink tokens, bit groups of packed chunks, and the residual window.

:class:`KindStore` lays out the tokens of one (layer, kind) by the token rule of :mod:`ratequant.spec`: the
first ``S`` sink tokens in the model's dtype, then aligned chunks of ``F`` tokens quantized once and kept
packed, then the residual window of the tokens waiting for their chunk. Within the packed part, heads of one
width are stored together (:class:`GroupStore`).

For each (layer, kind, bit group) the packed codes and metadata of every stored chunk live in a few tensors
of shape ``[chunks, batch, ...]`` (the quantizer's tensors, one block per chunk). Growth is exact by default
(``growth=0``): storing new chunks reallocates the group's tensors at their new size, a copy of the packed
store once every ``F`` tokens (amortised ``O(S / F)`` bytes per token, below the ``O(S)`` read of every decode
step), and ``nbytes()`` equals the data with no slack. ``growth > 0`` reserves that fraction of extra chunks
when growing (amortised ``O(1)`` appends, e.g. for ``residual_length=0``); the reserved capacity is real
memory and is counted. The residual window is a tensor holding exactly the tokens that wait for their chunk:
each update writes it anew from the output it returns anyway, a copy of at most ``F`` tokens.

One module of this size because the layout of one kind's tokens (sinks, packed groups, residual window) and
its growth change together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ratequant.errors import RateQuantError
from ratequant.kernels import native
from ratequant.quantizers.base import QuantizedTensor, Quantizer
from ratequant.spec import CacheBytes, StoragePolicy, bit_groups


def _progression(heads: tuple[int, ...]) -> slice | None:
    """``heads`` as a slice when they are evenly spaced (a strided view reaches them), else None."""
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if step > 0 and heads == tuple(range(heads[0], heads[-1] + 1, step)):
        return slice(heads[0], heads[-1] + 1, step)
    return None


def _storage_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.untyped_storage().nbytes()


def _is_code_tensor(t: torch.Tensor) -> bool:
    """Integer tensors are packed codes; floating tensors are metadata."""
    return not (t.is_floating_point() or t.is_complex())


class GroupStore:
    """Packed chunks of the heads that share one bit width, for one (layer, kind).

    ``tensors[name]`` has shape ``[capacity_chunks, batch, *rest]``: the quantizer's tensor for one chunk of
    one batch row is ``tensors[name][c, b]``. A chunk block is quantized as ``[batch, heads, F, head_dim]``;
    several chunks are folded into the batch axis (``[chunks * batch, ...]``), which requires every tensor
    the quantizer returns to be batch-major (true of every design in :mod:`ratequant.quantizers`).
    """

    def __init__(self, bits: int, heads: tuple[int, ...], kind: str, chunk: int, growth: float):
        self.bits, self.heads, self.kind, self.chunk, self.growth = bits, heads, kind, chunk, growth
        self.head_slice = _progression(heads)
        self._decoders: dict[tuple, tuple[Quantizer, Callable | object | None]] = {}
        self.tensors = {}
        self.num_chunks = 0
        self.reserved = 0  # chunks to allocate at the next growth (reserve), so a known length grows once
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
            set(new) != set(self.tensors) or any(new[k].shape[1:] != self.tensors[k].shape[1:] for k in new)
        ):
            raise RateQuantError(
                f"quantizer {quantizer.name!r} changed the layout of its stored tensors between chunks"
            )
        needed = self.num_chunks + m
        if needed > self.capacity():
            capacity = needed if self.growth <= 0 else max(needed, math.ceil(self.capacity() * (1 + self.growth)))
            self._reallocate(max(capacity, self.reserved), new)
        widest = None  # a block whose scales overflowed float16 is stored in float32: all metadata follows it
        for tensor in new.values():
            if tensor.is_floating_point():
                widest = tensor.dtype if widest is None else torch.promote_types(widest, tensor.dtype)
        for name, tensor in new.items():
            buf = self.tensors[name]
            dtype = torch.promote_types(buf.dtype, widest) if buf.is_floating_point() else buf.dtype
            if dtype != buf.dtype:
                buf = self.tensors[name] = buf.to(dtype)
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

    def attend_block(self, quantizer: Quantizer, first: int, last: int, dtype: torch.dtype):
        """Chunks ``first..last-1`` prepared for attention from their codes (:meth:`Quantizer.prepare_attend`;
        None where the design cannot), kept until the store changes."""
        prepared = self._decoders.get(("attend", first, last))
        if prepared is None or prepared[0] is not quantizer:
            prepared = (quantizer, quantizer.prepare_attend(self.block(first, last, dtype)))
            self._decoders[("attend", first, last)] = prepared
        return prepared[1]

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis (dim 1) of every stored tensor (beam reorder, selection, repeat)."""
        self.tensors = {k: fn(v[: self.num_chunks], 1) for k, v in self.tensors.items()}

    def truncate(self, num_chunks: int) -> None:
        """Drop chunks beyond ``num_chunks``; exact-size mode also releases their memory."""
        if num_chunks >= self.num_chunks:
            return
        self.num_chunks = num_chunks
        self.reserved = 0
        if self.growth <= 0 and self.tensors:
            self.tensors = {k: v[: self.num_chunks].clone() for k, v in self.tensors.items()}

    def nbytes(self) -> CacheBytes:
        codes = sum(_storage_bytes(t) for t in self.tensors.values() if _is_code_tensor(t))
        meta = sum(_storage_bytes(t) for t in self.tensors.values() if not _is_code_tensor(t))
        return CacheBytes(codes=codes, metadata=meta)


class KindStore:
    """Keys or values of one layer: sink tokens + bit groups of packed chunks + the residual window.

    ``out`` tensors of :meth:`update` and :meth:`read` are ``[B, H, S, D]`` in head order and the model's dtype:
    the sink tokens, the stored chunks decoded, the residual window (and the new tokens).
    """

    def __init__(self, widths: Sequence[int], kind: str, policy: StoragePolicy, growth: float, buffer_bytes: int = 0):
        self.kind, self.policy, self.growth = kind, policy, growth
        self.chunk, self.sink_tokens = policy.chunk(kind), policy.sink_tokens
        self.groups = [GroupStore(b, heads, kind, self.chunk, growth) for b, heads in bit_groups(widths)]
        self.num_heads = len(widths)
        self.sink: torch.Tensor | None = None  # [B, H, min(S, n), D]
        self.residual: torch.Tensor | None = None  # [B, H, residual_len, D]: exactly the waiting tokens
        # optional working buffer: the dequantized values of the first `buffered` stored chunks
        self.buffer_bytes = buffer_bytes
        self.buffer_limit = 0  # chunks the byte limit allows; set by initialise
        self.buffer: torch.Tensor | None = None  # [B, H, capacity * F, D] in the model's dtype
        self.buffered = 0

    @property
    def quantizer(self) -> Quantizer:
        return self.policy.quantizer

    @property
    def num_chunks(self) -> int:
        return self.groups[0].num_chunks

    @property
    def sink_len(self) -> int:
        return 0 if self.sink is None else self.sink.shape[2]

    @property
    def residual_len(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def stored_len(self) -> int:
        return self.num_chunks * self.chunk

    @property
    def length(self) -> int:
        return self.sink_len + self.stored_len + self.residual_len

    def initialise(self, batch: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.sink = torch.empty(batch, self.num_heads, 0, head_dim, dtype=dtype, device=device)
        self.residual = self.sink.clone()
        for g in self.groups:
            g.head_dim = head_dim
        self._set_buffer_limit()

    def _set_buffer_limit(self) -> None:
        b, h, _, d = self.residual.shape
        self.buffer_limit = self.buffer_bytes // (b * h * self.chunk * d * self.residual.element_size())

    def _empty(self, tokens: int) -> torch.Tensor:
        b, h, _, d = self.residual.shape
        return torch.empty(b, h, tokens, d, dtype=self.residual.dtype, device=self.residual.device)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Append ``x`` ``[B, H, T, D]``; return all ``[B, H, n, D]``: sinks, stored (decoded), residual, ``x``.

        New tokens fill the sink first; then whole chunks are quantized from the residual + new tokens.
        """
        s, p, r, t = self.sink_len, self.stored_len, self.residual_len, x.shape[2]
        out = self._empty(s + p + r + t)
        out[:, :, :s] = self.sink
        self.read_stored(out[:, :, s : s + p])
        out[:, :, s + p : s + p + r] = self.residual
        out[:, :, s + p + r :] = x
        sink = min(self.sink_tokens, s + p + r + t)
        if sink > s:  # only while nothing is stored or waiting yet
            self.sink = out[:, :, :sink].clone()
        start = sink + p
        m = (out.shape[2] - start) // self.chunk
        if m:
            fresh = out[:, :, start : start + m * self.chunk]
            for g in self.groups:
                g.append(g.select_heads(fresh), self.quantizer)
            self._fill_buffer()
        self.residual = out[:, :, start + m * self.chunk :].clone()  # exactly the waiting tokens, owning its storage
        return out

    def append(self, x: torch.Tensor) -> PackedView:
        """Append ``x`` ``[B, H, T, D]`` as :meth:`update` does, without decoding the stored chunks; returns
        what attention from the packed codes reads: the chunks stored before this update (the tokens after
        them, a chunk this update completes included, are seen at full precision, as :meth:`update` shows them)."""
        s, t = self.sink_len, x.shape[2]
        if s < self.sink_tokens:  # the sinks fill first: nothing is stored or waiting yet
            take = min(self.sink_tokens - s, t)
            self.sink = torch.cat([self.sink, x[:, :, :take]], dim=2)
            x = x[:, :, take:]
        chunks = self.num_chunks
        tail = torch.cat([self.residual, x], dim=2)
        m = tail.shape[2] // self.chunk
        if m:
            fresh = tail[:, :, : m * self.chunk]
            for g in self.groups:
                g.append(g.select_heads(fresh), self.quantizer)
        self.residual = tail[:, :, m * self.chunk :].clone()
        return PackedView(self, chunks, tail)

    def reserve(self, tokens: int) -> None:
        """Let the stored chunks of a sequence of ``tokens`` tokens in all be allocated at once when the store
        next grows (instead of once per growth): for a prompt about to be prefilled in pieces."""
        chunks = max(0, tokens - self.sink_tokens) // self.chunk
        for g in self.groups:
            g.reserved = max(g.reserved, chunks)

    def reads_packed(self) -> bool:
        """True when attention can read every stored chunk straight from its codes with the native kernel (CPU
        tensors; a min-max design, or rows after a rotation as ``quarot``'s and ``turbo``'s: :meth:`rotation`);
        otherwise the decode path is the faster one."""
        if self.residual is None or self.residual.device.type != "cpu" or not native.available():
            return False
        n, dtype = self.num_chunks, self.residual.dtype
        return n == 0 or all(g.attend_block(self.quantizer, 0, n, dtype) is not None for g in self.groups)

    def rotation(self) -> torch.Tensor | None:
        """``R`` ``[D, D]`` float32 when the rows :meth:`GroupStore.attend_block` serves are the stored tokens
        rotated (``decoded == rows @ R.T``; the design's ``attend_rotation``, e.g. ``quarot``'s Hadamard), else
        None (the rows are the decoded tokens themselves)."""
        if self.residual is None:
            return None
        return self.quantizer.attend_rotation(self.residual.shape[-1], self.residual.device)

    def _fill_buffer(self) -> None:
        """Dequantize newly stored chunks once into the working buffer, as far as its byte limit allows."""
        want = min(self.num_chunks, self.buffer_limit)
        if want <= self.buffered:
            return
        f = self.chunk
        have = 0 if self.buffer is None else self.buffer.shape[2] // f
        if want > have:
            cap = want if self.growth <= 0 else min(self.buffer_limit, max(want, math.ceil(have * (1 + self.growth))))
            grown = self._empty(cap * f)
            if self.buffered:
                grown[:, :, : self.buffered * f] = self.buffer[:, :, : self.buffered * f]
            self.buffer = grown
        self._dequantize_chunks(self.buffer[:, :, self.buffered * f : want * f], self.buffered, want)
        self.buffered = want

    def _dequantize_chunks(self, out: torch.Tensor, first: int, last: int) -> None:
        """Write stored chunks ``first..last-1`` (all heads) into ``out`` ``[B, H, (last - first) * F, D]``."""
        for g in self.groups:
            if g.head_slice is not None:
                g.dequantize_into(self.quantizer, out[:, g.head_slice], first, last)
            else:  # heads not evenly spaced: decode the group, then scatter its heads
                part = out.new_empty(out.shape[0], len(g.heads), *out.shape[2:])
                g.dequantize_into(self.quantizer, part, first, last)
                out[:, list(g.heads)] = part

    def read_stored(self, out: torch.Tensor) -> None:
        """Write the dequantized stored chunks into ``out`` ``[B, H, stored_len, D]`` in head order.

        Chunks held in the working buffer are copied from it; the others are decoded from their codes.
        """
        n = self.num_chunks
        if n == 0:
            return
        f, k = self.chunk, min(self.buffered, n)
        if k:
            out[:, :, : k * f] = self.buffer[:, :, : k * f]
        if n > k:
            self._dequantize_chunks(out[:, :, k * f : n * f], k, n)

    def read(self) -> torch.Tensor:
        """Every token as attention sees it, ``[B, H, n, D]``."""
        s, p = self.sink_len, self.stored_len
        out = self._empty(self.length)
        out[:, :, :s] = self.sink
        self.read_stored(out[:, :, s : s + p])
        out[:, :, s + p :] = self.residual
        return out

    def map_batch(self, fn) -> None:
        for g in self.groups:
            g.map_batch(fn)
        self.sink = fn(self.sink, 0)
        self.residual = fn(self.residual, 0)
        if self.buffer is not None:
            self.buffer = fn(self.buffer[:, :, : self.buffered * self.chunk], 0)
        self._set_buffer_limit()  # the batch size may have changed

    def crop(self, length: int) -> bool:
        """Keep the first ``length`` tokens; returns True when stored codes had to be cut (lossy)."""
        s = self.sink_len
        if length < s:
            self.sink = self.sink[:, :, :length].clone()
        length = max(0, length - s)
        p, r = self.stored_len, self.residual_len
        if length >= p:
            self.residual = self.residual[:, :, : min(r, length - p)].clone()
            return False
        keep = length // self.chunk
        partial = length - keep * self.chunk
        if partial:  # the surviving head of a stored chunk returns to the residual as its dequantized values
            part = self._empty(self.chunk)
            self._dequantize_chunks(part, keep, keep + 1)
            self.residual = part[:, :, :partial].clone()
        else:
            self.residual = self.residual[:, :, :0].clone()
        for g in self.groups:
            g.truncate(keep)
        if self.buffered > keep:
            self.buffered = keep
            if self.growth <= 0:  # exact size: release the dropped chunks
                self.buffer = self.buffer[:, :, : keep * self.chunk].clone() if keep else None
        return partial > 0

    def tensors(self) -> Iterator[torch.Tensor]:
        for t in (self.sink, self.residual, self.buffer):
            if t is not None:
                yield t
        for g in self.groups:
            yield from g.tensors.values()

    def nbytes(self) -> CacheBytes:
        total = CacheBytes(
            residual=_storage_bytes(self.residual), sink=_storage_bytes(self.sink), buffer=_storage_bytes(self.buffer)
        )
        for g in self.groups:
            total = total + g.nbytes()
        return total

    def to(self, device) -> None:
        for name in ("sink", "residual", "buffer"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))
        for g in self.groups:
            g.tensors = {k: v.to(device, non_blocking=True) for k, v in g.tensors.items()}


@dataclass(frozen=True, eq=False)
class PackedView:
    """What one attention step reads of a :class:`KindStore`: its sink tokens, its first ``chunks`` stored
    chunks (packed) and ``tail`` ``[B, H, T, D]``, the tokens after them at full precision, in that order."""

    store: KindStore
    chunks: int
    tail: torch.Tensor

    @property
    def length(self) -> int:
        return self.store.sink_len + self.chunks * self.store.chunk + self.tail.shape[2]

    def materialize(self) -> torch.Tensor:
        """Every token as attention sees it, ``[B, H, length, D]`` in the model's dtype (the decode path)."""
        s, p = self.store.sink_len, self.chunks * self.store.chunk
        out = self.store._empty(self.length)
        out[:, :, :s] = self.store.sink
        if p:
            self.store._dequantize_chunks(out[:, :, s : s + p], 0, self.chunks)
        out[:, :, s + p :] = self.tail
        return out

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Tokens ``lo..hi-1`` of the view as attention sees them, ``[B, H, hi - lo, D]`` float32: the stored
        chunks that cover them are decoded, nothing else."""
        store, f = self.store, self.store.chunk
        s, p = store.sink_len, self.chunks * f
        parts = []
        if lo < s:
            parts.append(store.sink[:, :, lo : min(hi, s)].float())
        first, last = max(lo, s) - s, min(hi, s + p) - s  # within the stored chunks
        if last > first:
            c0, c1 = first // f, -(-last // f)
            b, h, _, d = store.residual.shape
            decoded = torch.empty(b, h, (c1 - c0) * f, d, dtype=torch.float32, device=store.residual.device)
            store._dequantize_chunks(decoded, c0, c1)
            parts.append(decoded[:, :, first - c0 * f : last - c0 * f])
        if hi > s + p:
            parts.append(self.tail[:, :, max(lo, s + p) - s - p : hi - s - p].float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


__all__ = ["GroupStore", "KindStore", "PackedView"]
