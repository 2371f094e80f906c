"""The optional native decode kernel and the one switch that chooses it.

``ratequant.kernels._native`` (C, built from ``_native.c`` when the package is installed with a C compiler) decodes
bit-packed min-max blocks in one pass: it reads each packed byte once, unpacks, scales, shifts and writes
the output dtype straight into the cache's (strided) output, where the PyTorch path needs four passes
(unpack, multiply, add, copy). Both paths give bit-identical results (``tests/kernels/test_native.py``). It also
computes attention straight from packed blocks: per block (:meth:`PreparedDecode.attend`) or a layer's whole
decode step in one call (:func:`attend_layer`), equal to decode-then-attend to float32 rounding
(``tests/cache/test_attention.py``).

The kernel is used for CPU tensors whenever it is built and not switched off; everything else (CUDA
tensors, layouts it does not cover) takes the PyTorch path. Switch it off with the environment variable
``RATEQUANT_NATIVE=0`` (read at import) or, in code, ``with native.disabled(): ...``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ratequant.kernels.packing import packed_size

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ABI = 4  # NATIVE_ABI in _native.c
TABLE_FLOATS = 16
"""A table of code values is padded to at least this many floats: the kernel reads it 8 at a time."""


def _load():
    if os.environ.get("RATEQUANT_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "switched off by RATEQUANT_NATIVE=0"
    try:
        from ratequant.kernels import _native
    except ImportError as exc:
        return None, (
            f"not built ({exc}); reinstall ratequant with a C compiler available (e.g. `pip install -e .` "
            "with gcc) to build it"
        )
    if getattr(_native, "ABI", None) != _ABI:
        return None, f"stale build at {_native.__file__} (ABI {getattr(_native, 'ABI', None)}, need {_ABI}); reinstall"
    return _native, None


_MODULE, _WHY_NOT = _load()
_local = threading.local()


def _switched_off_here() -> bool:
    return getattr(_local, "disabled", False)


def available() -> bool:
    """True when the native kernel is built, loaded and not switched off (in this thread)."""
    return _MODULE is not None and not _switched_off_here()


def describe() -> str:
    """One line for ``ratequant info``: which decode path CPU caches use, and why."""
    if _MODULE is None:
        return f"PyTorch (native kernel {_WHY_NOT})"
    if _switched_off_here():
        return "PyTorch (native kernel switched off in this thread)"
    return f"native kernel ({_MODULE.__file__})"


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block (this thread only), decode with the PyTorch path even when the kernel is built."""
    before = _switched_off_here()
    _local.disabled = True
    try:
        yield
    finally:
        _local.disabled = before


class PreparedDecode:
    """A packed min-max block checked once, ready to decode into any number of outputs.

    ``decode(out)`` writes the block into ``out`` (see :func:`prepare_minmax_decode`) and returns True, or
    returns False, writing nothing, when the kernel is unavailable in this thread or ``out`` does not fit
    (then the caller takes the PyTorch path). The object keeps its tensors alive.
    """

    __slots__ = ("_args", "_head", "_meta", "_shape", "_tensors")

    def __init__(self, codes, bits, scale, zero, meta_rows, meta_cols, meta_group, levels=None):
        n, h, t, _ = codes.shape
        self._tensors = (codes, scale, zero, levels)
        self._shape = (n, h, t, meta_cols * meta_group)
        self._head = (codes.data_ptr(), bits, self._shape[3])
        dtype, address = _DTYPE_CODES[scale.dtype], 0 if levels is None else levels.data_ptr()
        self._meta = (scale.data_ptr(), zero.data_ptr(), dtype, meta_rows, meta_cols, meta_group, address)
        self._args = {}

    def decode(self, out: torch.Tensor) -> bool:
        """Write the block into ``out`` (see :func:`prepare_minmax_decode`); False, writing nothing, when the
        kernel is unavailable in this thread or ``out`` does not fit."""
        if not available() or out.dtype not in _DTYPE_CODES or out.device.type != "cpu" or out.stride(-1) != 1:
            return False
        n, h, t, d = self._shape
        if out.dim() == 4 and tuple(out.shape) == self._shape:
            blocks, batch, s_n, s_b = n, 1, out.stride(0), 0
        elif out.dim() == 5 and tuple(out.shape[2:]) == (h, t, d) and out.shape[0] * out.shape[1] == n:
            blocks, batch, s_n, s_b = out.shape[0], out.shape[1], out.stride(0), out.stride(1)
        else:
            return False
        _MODULE.decode_minmax(
            *self._head,
            (blocks, batch, h, t),
            *self._meta,
            out.data_ptr(),
            _DTYPE_CODES[out.dtype],
            (s_n, s_b, out.stride(-3), out.stride(-2)),
        )
        return True

    def attend(self, batch: int, inputs: torch.Tensor, out: torch.Tensor, *, weighted: bool) -> bool:
        """Attention straight from the packed rows, for blocks laid out as the cache's ``[chunks * batch, H, T,
        D]`` (block row ``c * batch + b``): with ``weighted=False`` the scores ``out[b, h, g, c * T + t] =
        inputs[b, h, g] . k[c, b, h, t]`` (``inputs``: queries ``[batch, H, G, D]``); with ``weighted=True``
        ``out[b, h, g] += sum over tokens of inputs[b, h, g, c * T + t] * v[c, b, h, t]`` (``inputs``: the
        attention weights ``[batch, H, G, chunks * T]``, ``out`` ``[batch, H, G, D]``). Everything float32,
        contiguous, on the CPU. Returns False, touching nothing, when the kernel or the layout does not fit."""
        n, h, t, d = self._shape
        if not available() or batch < 1 or n % batch:
            return False
        tensors = (inputs, out)
        if any(x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() for x in tensors):
            return False
        g = inputs.shape[2] if inputs.dim() == 4 else 0
        width = (n // batch) * t
        want_in, want_out = (
            ((batch, h, g, width), (batch, h, g, d)) if weighted else ((batch, h, g, d), (batch, h, g, width))
        )
        if g < 1 or tuple(inputs.shape) != want_in or tuple(out.shape) != want_out:
            return False
        _MODULE.attend_minmax(
            *self._head, (n // batch, batch, h, t), *self._meta, int(weighted), g, inputs.data_ptr(), out.data_ptr()
        )
        return True

    def block_args(self, batch: int, heads: tuple[int, ...]) -> tuple | None:
        """The block as one bit group of :func:`attend_layer` (``heads``: the kv heads it holds, in order), or
        None when it does not fit ``batch``."""
        key = (batch, heads)
        if key not in self._args:
            n, h, t, _ = self._shape
            fits = batch >= 1 and n % batch == 0 and len(heads) == h <= _MODULE.MAX_GROUP_HEADS
            self._args[key] = (self._head[0], self._head[1], n // batch, t, *self._meta, heads) if fits else None
        return self._args[key]


LayerKind = tuple  # (sink [B, H, s, D], [(PreparedDecode, heads)], tail [B, H, m, D]): see attend_layer


def _dense_args(x: torch.Tensor, batch: int, heads: int, d: int) -> tuple | None:
    if x.device.type != "cpu" or x.dim() != 4 or tuple(x.shape[:2]) != (batch, heads) or x.shape[3] != d:
        return None
    if x.shape[2] and x.stride(3) != 1:
        return None
    return (x.data_ptr(), x.shape[2], x.stride(0), x.stride(1), x.stride(2))


def _kind_args(kind: LayerKind, batch: int, heads: int, d: int) -> tuple | None:
    sink, groups, tail = kind
    if sink.dtype not in _DTYPE_CODES or tail.dtype != sink.dtype:
        return None
    dense = (_dense_args(sink, batch, heads, d), _dense_args(tail, batch, heads, d))
    blocks = tuple(prepared.block_args(batch, tuple(group_heads)) for prepared, group_heads in groups)
    if None in dense or None in blocks or sum(len(b[-1]) for b in blocks) not in (0, heads):
        return None
    stored = {blk[2] * blk[3] for blk in blocks} or {0}  # chunks * T: the same for every group
    if len(stored) != 1:
        return None
    return (_DTYPE_CODES[sink.dtype], *dense, blocks), sink.shape[2] + stored.pop() + tail.shape[2]


def attend_layer(
    queries: torch.Tensor,
    tokens: int,
    keys: LayerKind,
    values: LayerKind,
    mask: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor | None:
    """One layer's attention step in one native call: scores over the sink tokens, every bit group of the
    stored chunks and the full-precision tail, soft-capping, the mask, softmax, and the weighted values.

    Args:
        queries: ``[B, H, R, D]`` float32, contiguous, already scaled; ``R`` rows per kv head, row ``r`` of query
            token ``r % tokens``.
        keys, values: ``(sink, groups, tail)`` with ``sink [B, H, s, D]`` and ``tail [B, H, m, D]`` in one
            float dtype (the last dimension contiguous) and ``groups`` the stored chunks' bit groups as
            ``(PreparedDecode of [chunks * B, Hg, T, D] blocks, the Hg kv heads it holds)``, together every head
            once (or none). Both kinds span the same ``n`` tokens: ``s + chunks * T + m``.
        mask: boolean ``[B or 1, tokens, n]``, True where a query row sees the key; None: every row sees all.
        softcap: ``tanh(x / c) * c`` on the scores when given.

    Returns ``[B, H, R, D]`` float32 (a row that sees nothing gives zeros), or None, touching nothing, when the
    kernel is unavailable or the arguments do not fit it (then the caller composes the step itself).
    """
    if not available() or queries.dtype != torch.float32 or queries.device.type != "cpu" or queries.dim() != 4:
        return None
    if not queries.is_contiguous() or tokens < 1 or queries.shape[2] % tokens:
        return None
    b, h, r, d = queries.shape
    key_args, value_args = _kind_args(keys, b, h, d), _kind_args(values, b, h, d)
    if key_args is None or value_args is None or key_args[1] != value_args[1] or keys[0].shape[2] != values[0].shape[2]:
        return None
    (key_args, n), (value_args, _) = key_args, value_args
    mask_ptr, mask_stride = 0, 0
    if mask is not None:
        if mask.dtype != torch.bool or not mask.is_contiguous() or mask.dim() != 3:
            return None
        if mask.shape[0] not in (1, b) or tuple(mask.shape[1:]) != (tokens, n):
            return None
        mask_ptr, mask_stride = mask.data_ptr(), (tokens * n if mask.shape[0] > 1 else 0)
    out = queries.new_empty(b, h, r, d)
    _MODULE.attend_layer(
        queries.data_ptr(),
        out.data_ptr(),
        (b, h, r, d, tokens, n),
        key_args,
        value_args,
        mask_ptr,
        mask_stride,
        float(softcap or 0.0),
    )
    return out


def prepare_minmax_decode(
    codes: torch.Tensor,
    bits: int,
    d: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    meta_rows: int,
    meta_group: int,
    levels: torch.Tensor | None = None,
) -> PreparedDecode | None:
    """Check a packed min-max block once for the kernel; None when the kernel cannot decode it.

    The block decodes to ``codes * scale + zero`` (float32 arithmetic, rounded to the output dtype), or with
    ``levels`` (a codebook: float32 ``[2**bits]``, contiguous, on the CPU) to ``levels[codes] * scale + zero``.

    Args:
        codes: packed ``uint8 [N, H, T, ceil(D * bits / 8)]``, contiguous (:mod:`ratequant.kernels.packing`).
        d: head_dim ``D``, the codes per row.
        scale, zero: contiguous metadata, one pair per ``meta_rows`` consecutive tokens (rows ordered
            ``(N, H, T)``) and per ``meta_group`` consecutive elements along D: per-token groups of ``g``
            are ``meta_rows=1, meta_group=g`` (shape ``[N, H, T, D / g]``); KIVI keys, per channel over
            ``G`` tokens, are ``meta_rows=G, meta_group=1`` (shape ``[N, H, T / G, D]``).

    The output given to :meth:`PreparedDecode.decode` is ``[N, H, T, D]`` or ``[n, B, H, T, D]`` with
    ``n * B == N`` (the cache's chunk view), any strides with the last dimension contiguous, in float32,
    float16 or bfloat16.
    """
    if _MODULE is None or codes.dim() != 4 or codes.dtype != torch.uint8 or not 1 <= bits <= 8:
        return None
    tensors = (codes, scale, zero)
    if any(x.device.type != "cpu" or not x.is_contiguous() for x in tensors):
        return None
    if levels is not None and (
        levels.dtype != torch.float32 or levels.device.type != "cpu" or not levels.is_contiguous()
        or tuple(levels.shape) != (1 << bits,)
    ):  # fmt: skip
        return None
    if scale.dtype not in _DTYPE_CODES or zero.dtype != scale.dtype or meta_rows < 1 or meta_group < 1:
        return None
    n, h, t, row_bytes = codes.shape
    if d < 1 or d % meta_group or t % meta_rows or packed_size(d, bits) != row_bytes:
        return None
    meta_cols = d // meta_group
    if scale.numel() != n * h * t // meta_rows * meta_cols or zero.numel() != scale.numel():
        return None
    if levels is not None and levels.numel() < TABLE_FLOATS:  # the kernel reads whole registers of the table
        levels = torch.nn.functional.pad(levels, (0, TABLE_FLOATS - levels.numel()))
    return PreparedDecode(codes, bits, scale, zero, meta_rows, meta_cols, meta_group, levels)


__all__ = ["PreparedDecode", "attend_layer", "available", "describe", "disabled", "prepare_minmax_decode"]
