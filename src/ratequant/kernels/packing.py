"""Bit-packing of b-bit codes (b = 1..8) into ``uint8`` storage, along the last dimension.

One rule, one table. Codes are taken ``codes_per_word`` at a time; code ``j`` of a word occupies bits
``[b*j, b*(j+1))`` of a little-endian word of ``bytes_per_word`` bytes (LSB-first). :data:`LAYOUTS` gives
the word shape for every width: the smallest word that holds a whole number of codes, i.e.
``lcm(b, 8)`` bits. Widths 1, 2, 4 and 8 pack ``8 / b`` codes into one byte; 3, 5 and 7 pack 8 codes into
``b`` bytes; 6 packs 4 codes into 3 bytes. No bit is wasted inside a word.

A row of ``n`` codes is zero-padded to a whole number of words, packed, and then the trailing bytes that
hold only padding are dropped, so a packed row has exactly ``ceil(n * b / 8)`` bytes. ``unpack`` needs
``n`` back (the caller records the logical shape).

Worked example, ``b = 3``, codes ``[5, 1, 7, 0, 2, 6, 3, 4]`` (one word of 8 codes in 3 bytes)::

    word = 5 | 1<<3 | 7<<6 | 0<<9 | 2<<12 | 6<<15 | 3<<18 | 4<<21 = 0x8F21CD
    bytes (little-endian) = [0xCD, 0x21, 0x8F]

See ``docs/quantizers.md`` for the full table. Everything is plain torch, so it runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ratequant.errors import RateQuantError


@dataclass(frozen=True)
class PackLayout:
    """How ``bits``-wide codes sit in a word: ``codes_per_word`` codes in ``bytes_per_word`` bytes."""

    bits: int
    codes_per_word: int
    bytes_per_word: int

    def __post_init__(self) -> None:
        if self.codes_per_word * self.bits != 8 * self.bytes_per_word:
            raise RateQuantError(f"packing layout for {self.bits} bits does not fill its word exactly")

    def packed_size(self, n: int) -> int:
        """Bytes of one packed row of ``n`` codes: ``ceil(n * bits / 8)``."""
        return -(-n * self.bits // 8)


def _layout(bits: int) -> PackLayout:
    word_bits = math.lcm(bits, 8)
    return PackLayout(bits=bits, codes_per_word=word_bits // bits, bytes_per_word=word_bits // 8)


LAYOUTS: dict[int, PackLayout] = {b: _layout(b) for b in range(1, 9)}
"""The one table: bit width -> layout (1:8/1, 2:4/1, 3:8/3, 4:2/1, 5:8/5, 6:4/3, 7:8/7, 8:1/1)."""


def layout(bits: int) -> PackLayout:
    """The packing layout for ``bits``; raises :class:`RateQuantError` for widths outside 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LAYOUTS:
        raise RateQuantError(f"packing: bit width must be an integer from 1 to 8, got {bits!r}")
    return LAYOUTS[bits]


def packed_size(n: int, bits: int) -> int:
    """Bytes of a packed row of ``n`` codes at ``bits``: ``ceil(n * bits / 8)``."""
    return layout(bits).packed_size(n)


def _word_dtype(lay: PackLayout) -> torch.dtype:
    # A word of up to 56 bits; int32 is enough (and faster) up to 24 bits.
    return torch.int32 if lay.bytes_per_word <= 3 else torch.int64


def pack(codes: torch.Tensor, bits: int, *, check: bool = True) -> torch.Tensor:
    """Pack ``codes`` ``uint8 [..., n]`` (each < 2**bits) into ``uint8 [..., ceil(n*bits/8)]``.

    With ``check`` (default) out-of-range codes raise :class:`RateQuantError` (one reduction; callers
    that produce codes in range by construction pass ``check=False``). The result is a new contiguous
    tensor on the same device that owns its storage.
    """
    lay = layout(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() < 1:
        raise RateQuantError(
            f"packing: codes must be a uint8 tensor with at least one dimension, got "
            f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}"
        )
    n = codes.shape[-1]
    out_bytes = lay.packed_size(n)
    if bits == 8:
        return codes.clone(memory_format=torch.contiguous_format)
    if check and codes.numel() and int(codes.max()) >= 1 << bits:
        raise RateQuantError(f"packing: a code exceeds {(1 << bits) - 1}, the largest {bits}-bit code")
    cpw, bpw = lay.codes_per_word, lay.bytes_per_word
    lead = codes.shape[:-1]
    words = -(-n // cpw)
    pad = words * cpw - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*lead, words, cpw)
    if bpw == 1:
        # One byte per word: shift and OR in uint8 directly.
        word = grouped[..., 0].clone()
        for j in range(1, cpw):
            word |= grouped[..., j] << (bits * j)
        return word.contiguous()
    wdt = _word_dtype(lay)
    g = grouped.to(wdt)
    word = g[..., 0].clone()
    for j in range(1, cpw):
        word |= g[..., j] << (bits * j)
    out = torch.empty(*lead, words, bpw, dtype=torch.uint8, device=codes.device)
    for k in range(bpw):
        out[..., k] = ((word >> (8 * k)) & 0xFF).to(torch.uint8)
    out = out.reshape(*lead, words * bpw)
    if out.shape[-1] != out_bytes:
        out = out[..., :out_bytes].clone(memory_format=torch.contiguous_format)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., ceil(n*bits/8)]`` -> codes ``uint8 [..., n]``."""
    lay = layout(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() < 1:
        raise RateQuantError("packing: packed data must be a uint8 tensor with at least one dimension")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RateQuantError(f"packing: n must be a non-negative integer, got {n!r}")
    if packed.shape[-1] != lay.packed_size(n):
        raise RateQuantError(
            f"packing: {n} codes at {bits} bits take {lay.packed_size(n)} bytes, got {packed.shape[-1]}"
        )
    if bits == 8:
        return packed.clone(memory_format=torch.contiguous_format)
    cpw, bpw = lay.codes_per_word, lay.bytes_per_word
    lead = packed.shape[:-1]
    words = -(-n // cpw)
    pad = words * bpw - packed.shape[-1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    mask = (1 << bits) - 1
    grouped = packed.reshape(*lead, words, bpw)
    if bpw == 1:
        out = torch.empty(*lead, words, cpw, dtype=torch.uint8, device=packed.device)
        word = grouped[..., 0]
        for j in range(cpw):
            out[..., j] = (word >> (bits * j)) & mask
    else:
        # Assemble each little-endian word, then extract all its codes with one broadcast shift: the
        # result [..., words, cpw] is already in code order (fewer, larger passes than one per code).
        wdt = _word_dtype(lay)
        word = grouped[..., 0].to(wdt)
        for k in range(1, bpw):
            word |= grouped[..., k].to(wdt) << (8 * k)
        out = (word.unsqueeze(-1) >> _shifts(bits, cpw, wdt, packed.device)).bitwise_and_(mask).to(torch.uint8)
    out = out.reshape(*lead, words * cpw)
    if out.shape[-1] != n:
        out = out[..., :n].clone(memory_format=torch.contiguous_format)
    return out


_SHIFTS: dict[tuple, torch.Tensor] = {}


def _shifts(bits: int, cpw: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[0, bits, 2 * bits, ...]`` (``cpw`` values) in ``dtype`` on ``device``, cached."""
    key = (bits, cpw, dtype, str(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, bits * cpw, bits, dtype=dtype, device=device)
    return _SHIFTS[key]


__all__ = ["LAYOUTS", "PackLayout", "layout", "pack", "packed_size", "unpack"]
