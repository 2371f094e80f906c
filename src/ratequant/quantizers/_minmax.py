"""Shared machinery of the packed designs: the encode/pack/decode skeleton and min-max arithmetic.

Every design here is written as two pure functions on float32 tensors:

* ``_encode(x [B, H, T, D]) -> (codes [B, H, T, D] holding integers 0..2**b-1, metadata)``
* ``_decode(codes, metadata) -> x_hat float32 [B, H, T, D]``

``quantize`` packs the codes (:mod:`ratequant.kernels.packing`) and stores the metadata; ``dequantize`` unpacks
and decodes; ``fake_quantize`` decodes the codes directly. The code values and metadata seen by
``_decode`` are identical on both paths (only the integer/float type of the codes may differ, and
``_decode`` converts it first), so ``fake_quantize(x) == dequantize(quantize(x))`` exactly.

Metadata precision. Scales and zeros are stored in the design's ``scale_dtype`` (float16 by default). The
codes are computed against the *stored* (rounded) values, with the zero rounded down and the step rounded
up, so the stored grid ``zero + k * step, k = 0..2**b-1`` always covers the group's ``[min, max]`` and the
error of every element is at most half a stored step (plus float32 rounding). A block whose metadata does
not fit ``scale_dtype`` (e.g. float16 values beyond 65504) is stored with float32 metadata instead;
``nbytes()`` reports the real size, and such blocks cost more than ``metadata_bits_per_token`` says.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ratequant.errors import RateQuantError
from ratequant.kernels import native
from ratequant.kernels.packing import pack, unpack
from ratequant.quantizers.base import QuantizedTensor, Quantizer
from ratequant.validation import show_value

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``scale_dtype`` name."""
    return _DTYPES[name]


def dtype_bits(name: str) -> int:
    """Bits of one stored metadata value of ``scale_dtype`` ``name``."""
    return torch.finfo(_DTYPES[name]).bits


def own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor that owns exactly its storage (no view into a bigger buffer)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def round_directed(v: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round float32 ``v`` to ``dtype`` towards +inf (``up``) or -inf; values must be in range."""
    if dtype == torch.float32:
        return v.clone()
    y = v.to(dtype)
    back = y.to(torch.float32)
    wrong = back < v if up else back > v
    target = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, target), y)


def minmax_meta(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, zero)`` for groups with range ``[lo, hi]`` (float32, same shape).

    ``zero = round_down(lo)``, ``scale = round_up((hi - zero) / (2**bits - 1))`` in ``dtype``, so the stored
    grid covers ``[lo, hi]``. Falls back to float32 for the whole block when a value would overflow ``dtype``.
    """
    levels = (1 << bits) - 1
    span = hi - lo
    if not torch.isfinite(span).all():
        raise RateQuantError("input range too large: max - min of a group overflows float32; scale the tensor down")
    zero, step = lo.clone(), span / levels
    if dtype != torch.float32:
        fmax = torch.finfo(dtype).max
        if bool(torch.maximum(lo.abs(), hi.abs()).amax() <= fmax):
            low = round_directed(lo, dtype, up=False)
            wide = (hi - low.to(torch.float32)) / levels
            if bool(wide.amax() <= fmax):
                zero, step = low, round_directed(wide, dtype, up=True)
    # float32 rounding (or underflow of a tiny span / levels) may leave the top of the grid a hair below
    # hi: widen those steps by one ulp of their dtype until the grid covers the group.
    for _ in range(4):
        short = zero.to(torch.float32) + step.to(torch.float32) * levels < hi
        if not bool(short.any()):
            break
        step = torch.where(short, torch.nextafter(step, torch.full_like(step, float("inf"))), step)
    return step, zero


def minmax_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float32) ``clamp(round((x - zero) / scale), 0, 2**bits - 1)``; broadcasting.

    A zero ``scale`` (constant group equal to its stored zero) gives code 0.
    """
    s = scale.to(torch.float32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = (x - zero.to(torch.float32)).div_(s).round_()
    return codes.clamp_(0, (1 << bits) - 1)


def minmax_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in float32 (two separately rounded operations on every path)."""
    return (codes.to(torch.float32) * scale.to(torch.float32)).add_(zero.to(torch.float32))


def minmax_values_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> None:
    """Write :func:`minmax_values` (``codes * scale + zero``, broadcasting) into ``out``, bit-identically.

    ``out`` may be a strided view (e.g. a head slice of the cache's output). In float32 it is computed in
    place (two passes, the product and the sum rounded separately as in :func:`minmax_values`); in another
    dtype the float32 result is rounded into ``out``, as ``minmax_values(...).to(out.dtype)`` would be.
    """
    s32, z32 = scale.to(torch.float32), zero.to(torch.float32)
    if out.dtype == torch.float32:
        torch.mul(codes, s32, out=out)  # uint8 codes promote to float32 exactly
        out.add_(z32)
    else:
        out.copy_(torch.mul(codes, s32).add_(z32))


MAX_GROUP = 1 << 16
"""The largest group of elements or tokens sharing one scale and zero (far above any head or useful group)."""


def check_group_size(owner: str, value, allow_none: bool) -> None:
    """Validate a group-size parameter: an integer from 1 to :data:`MAX_GROUP` (or None where allowed)."""
    if value is None and allow_none:
        return
    what = "an integer from 1 to 65536 or None" if allow_none else "an integer from 1 to 65536"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GROUP:
        raise RateQuantError(f"{owner}: group_size must be {what}, got {show_value(value)}")


def group_along_dim(owner: str, group_size: int | None, head_dim: int) -> int:
    """Effective group size along head_dim: ``group_size`` (None = head_dim) that must divide it."""
    g = head_dim if group_size is None else group_size
    if head_dim % g:
        raise RateQuantError(
            f"{owner}: head_dim {head_dim} is not divisible by group_size {g}; "
            f"choose a group_size that divides {head_dim} (or None for one group per token)"
        )
    return g


@dataclass(frozen=True)
class PackedDesign(Quantizer):
    """A design expressed as ``_encode``/``_decode`` on float32; see the module docstring."""

    def _meta_dtype(self) -> torch.dtype:
        return storage_dtype(self.scale_dtype)

    def _meta_bits(self) -> int:
        return dtype_bits(self.scale_dtype)

    @abstractmethod
    def _encode(self, x: torch.Tensor, bits: int, kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` float32 ``[B, H, T, D]`` -> (integer-valued codes ``[B, H, T, D]`` contiguous, metadata).

        Codes may be float32 or an integer dtype; ``quantize`` casts them to uint8 for packing."""

    @abstractmethod
    def _decode(self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int, kind: str) -> torch.Tensor:
        """codes ``[B, H, T, D]`` (uint8 from ``dequantize``, or what ``_encode`` returned) + metadata ->
        reconstruction float32 ``[B, H, T, D]``; must convert the codes' dtype before any arithmetic."""

    def _check_shape(self, shape: tuple[int, int, int, int], kind: str) -> None:
        """Design-specific shape validation (e.g. group sizes that must divide head_dim)."""

    def _prepare(self, x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        self.check_bits(bits)
        self.check_kind(kind)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            self.check_input(x)  # raises the interface's message
        if x.numel() == 0:
            raise RateQuantError(f"{self.name}: cannot quantize an empty tensor of shape {tuple(x.shape)}")
        self._check_shape(tuple(x.shape), kind)
        x32 = x.to(torch.float32)
        # A finite sum proves every element finite (NaN and Inf propagate) in one cheap reduction; only
        # when it is not (a NaN/Inf, or an overflowing sum) run the elementwise check.
        if not bool(torch.isfinite(x32.sum())):
            self.check_input(x)
        return x32

    def quantize(self, x: torch.Tensor, bits: int, kind: str) -> QuantizedTensor:
        x32 = self._prepare(x, bits, kind)
        codes, meta = self._encode(x32, bits, kind)
        tensors = {"codes": pack(codes.to(torch.uint8), bits, check=False)}
        tensors.update({k: own(v) for k, v in meta.items()})
        return QuantizedTensor(tensors=tensors, shape=tuple(x.shape), bits=bits, kind=kind, dtype=x.dtype)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if not isinstance(q, QuantizedTensor) or "codes" not in q.tensors:
            raise RateQuantError(f"{self.name}: dequantize expects a QuantizedTensor made by quantize()")
        self.check_bits(q.bits)
        self.check_kind(q.kind)
        b, h, t, d = q.shape
        if self._minmax_layout(q) is not None:  # one fused pass into the output (native kernel when built)
            out = torch.empty(q.shape, dtype=q.dtype, device=q.tensors["codes"].device)
            self.prepare_decode(q)(out)
            return out
        codes = unpack(q.tensors["codes"], q.bits, d).reshape(b, h, t, d)
        meta = {k: v for k, v in q.tensors.items() if k != "codes"}
        return self._decode(codes, meta, q.bits, q.kind).to(q.dtype)

    def dequantize_into(self, q: QuantizedTensor, out: torch.Tensor) -> None:
        """Write ``dequantize(q)`` into ``out``, bit-identically, without the intermediate copy.

        ``out`` has ``q``'s elements as ``[*lead, heads, tokens, head_dim]`` where the leading dims multiply
        to ``q``'s batch (e.g. the cache's ``[chunks, batch, ...]`` view of its output); it may be strided.
        Min-max designs decode with the native kernel when it is built (:mod:`ratequant.kernels.native`); designs
        with a fused PyTorch decode override :meth:`_decode_into`; the others decode then copy.
        """
        if not isinstance(q, QuantizedTensor) or "codes" not in q.tensors:
            raise RateQuantError(f"{self.name}: dequantize expects a QuantizedTensor made by quantize()")
        b, h, t, d = q.shape
        if out.shape[-3:] != (h, t, d) or out.numel() != b * h * t * d:
            raise RateQuantError(
                f"{self.name}: dequantize_into needs an output of {b * h * t * d} elements ending in "
                f"({h}, {t}, {d}), got {tuple(out.shape)}"
            )
        self.prepare_decode(q)(out)

    def _dequantize_into_torch(self, q: QuantizedTensor, out: torch.Tensor) -> None:
        b, h, t, d = q.shape
        codes = unpack(q.tensors["codes"], q.bits, d).view(*out.shape)
        lead = out.shape[:-3]
        meta = {k: v.view(*lead, *v.shape[1:]) for k, v in q.tensors.items() if k != "codes"}
        self._decode_into(codes, meta, q.bits, q.kind, out)

    def _minmax_layout(self, q: QuantizedTensor) -> tuple[int, int] | None:
        """``(meta_rows, meta_group)`` when ``q`` decodes as plain ``codes * scale + zero`` (see
        :func:`ratequant.kernels.native.prepare_minmax_decode`), else None (the default: a decode that does more)."""
        return None

    def prepare_attend(self, q: QuantizedTensor):
        layout = self._minmax_layout(q)
        if layout is None or not {"scale", "zero"} <= q.tensors.keys():
            return None
        b, h, t, d = q.shape
        codes = q.tensors["codes"].view(b, h, t, -1)
        return native.prepare_minmax_decode(codes, q.bits, d, q.tensors["scale"], q.tensors["zero"], *layout)

    def prepare_decode(self, q: QuantizedTensor) -> Callable[[torch.Tensor], None]:
        """:meth:`dequantize_into` bound to ``q``, with ``q``'s checks done once (the cache decodes the same
        stored block on every step): the native kernel where it applies, else the PyTorch path."""
        self.check_bits(q.bits)
        self.check_kind(q.kind)
        layout = self._minmax_layout(q)
        if layout is not None and {"scale", "zero"} <= q.tensors.keys():
            b, h, t, d = q.shape
            codes = q.tensors["codes"].view(b, h, t, -1)
            fast = native.prepare_minmax_decode(codes, q.bits, d, q.tensors["scale"], q.tensors["zero"], *layout)
            if fast is not None:
                return lambda out: fast.decode(out) or self._dequantize_into_torch(q, out)
        return partial(self._dequantize_into_torch, q)

    def _decode_into(
        self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int, kind: str, out: torch.Tensor
    ) -> None:
        """``out.copy_(_decode(codes, meta).to(out.dtype))`` for codes/metadata/out with leading dims
        ``[*lead]`` in place of the batch; fused designs override it with a bit-identical direct write."""
        lead = out.shape[:-3]
        flat = {k: v.reshape(-1, *v.shape[len(lead) :]) for k, v in meta.items()}
        dec = self._decode(codes.reshape(-1, *codes.shape[len(lead) :]), flat, bits, kind)
        out.copy_(dec.to(out.dtype).view(out.shape))

    def fake_quantize(self, x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        x32 = self._prepare(x, bits, kind)
        codes, meta = self._encode(x32, bits, kind)
        return self._decode(codes, meta, bits, kind).to(x.dtype)


def encode_token_groups(
    x: torch.Tensor, bits: int, g: int, dtype: torch.dtype, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Min-max codes for ``x`` ``[B, H, T, D]`` in groups of ``g`` along D.

    Returns codes float32 ``[B, H, T, D]`` and ``{"scale", "zero"}`` of shape ``[B, H, T, D // g]``. With
    ``clip_ratio < 1`` each group's range is shrunk around its midpoint by that factor before quantizing.
    """
    b, h, t, d = x.shape
    xg = x.reshape(b, h, t, d // g, g)
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)  # (faster than aminmax on CPU)
    if clip_ratio != 1.0:
        mid, half = (hi + lo) * 0.5, (hi - lo) * (0.5 * clip_ratio)
        lo, hi = mid - half, mid + half
    scale, zero = minmax_meta(lo, hi, bits, dtype)
    codes = minmax_codes(xg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return codes.reshape(b, h, t, d), {"scale": scale, "zero": zero}


def decode_token_groups_into(codes: torch.Tensor, meta: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """:func:`decode_token_groups` written into ``out`` ``[..., T, D]`` (bit-identical; leading dims free)."""
    scale, zero = meta["scale"], meta["zero"]
    ng, d = scale.shape[-1], codes.shape[-1]
    split = (ng, d // ng)
    minmax_values_into(codes.unflatten(-1, split), scale.unsqueeze(-1), zero.unsqueeze(-1), out.unflatten(-1, split))


def decode_token_groups(codes: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`encode_token_groups`: float32 ``[B, H, T, D]``."""
    b, h, t, d = codes.shape
    scale, zero = meta["scale"], meta["zero"]
    ng = scale.shape[-1]
    out = minmax_values(codes.reshape(b, h, t, ng, d // ng), scale.unsqueeze(-1), zero.unsqueeze(-1))
    return out.reshape(b, h, t, d)


class PerTokenGroups(PackedDesign):
    """A design storing, per token, a scale and a zero for each group of ``group_size`` elements along
    head_dim (``None``: one group for the whole head); subclasses declare the ``group_size`` field."""

    group_size: int | None

    def _check_shape(self, shape, kind) -> None:
        group_along_dim(self.name, self.group_size, shape[-1])

    def metadata_bits_per_token(self, head_dim: int, bits: int, kind: str) -> float:
        self.check_bits(bits)
        self.check_kind(kind)
        g = group_along_dim(self.name, self.group_size, head_dim)
        return 2 * (head_dim // g) * self._meta_bits()
