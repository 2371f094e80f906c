"""The optional native decode kernel and the one switch that chooses it.

``ratequant._native`` (C, built from ``_native.c`` when the package is installed with a C compiler) decodes
bit-packed min-max blocks in one pass: it reads each packed byte once, unpacks, scales, shifts and writes
the output dtype straight into the cache's (strided) output, where the PyTorch path needs four passes
(unpack, multiply, add, copy). Both paths give bit-identical results (``tests/test_native.py``).

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

from ratequant.packing import packed_size

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ABI = 2  # NATIVE_ABI in _native.c


def _load():
    if os.environ.get("RATEQUANT_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "switched off by RATEQUANT_NATIVE=0"
    try:
        from ratequant import _native
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

    __slots__ = ("_head", "_meta", "_shape", "_tensors")

    def __init__(self, codes, bits, scale, zero, meta_rows, meta_cols, meta_group):
        n, h, t, _ = codes.shape
        self._tensors = (codes, scale, zero)
        self._shape = (n, h, t, meta_cols * meta_group)
        self._head = (codes.data_ptr(), bits, self._shape[3])
        self._meta = (scale.data_ptr(), zero.data_ptr(), _DTYPE_CODES[scale.dtype], meta_rows, meta_cols, meta_group)

    def decode(self, out: torch.Tensor) -> bool:
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


def prepare_minmax_decode(
    codes: torch.Tensor,
    bits: int,
    d: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    meta_rows: int,
    meta_group: int,
) -> PreparedDecode | None:
    """Check a packed min-max block once for the kernel; None when the kernel cannot decode it.

    The block decodes to ``codes * scale + zero`` (float32 arithmetic, rounded to the output dtype).

    Args:
        codes: packed ``uint8 [N, H, T, ceil(D * bits / 8)]``, contiguous (:mod:`ratequant.packing`).
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
    if scale.dtype not in _DTYPE_CODES or zero.dtype != scale.dtype or meta_rows < 1 or meta_group < 1:
        return None
    n, h, t, row_bytes = codes.shape
    if d < 1 or d % meta_group or t % meta_rows or packed_size(d, bits) != row_bytes:
        return None
    meta_cols = d // meta_group
    if scale.numel() != n * h * t // meta_rows * meta_cols or zero.numel() != scale.numel():
        return None
    return PreparedDecode(codes, bits, scale, zero, meta_rows, meta_cols, meta_group)


__all__ = ["PreparedDecode", "available", "describe", "disabled", "prepare_minmax_decode"]
