"""The interface every KV quantizer design implements, and the registry of designs.

A design maps a block of keys or values ``x`` of shape ``[batch, heads, tokens, head_dim]`` and an integer
bit width ``bits`` in 1..8 to a :class:`QuantizedTensor` (bit-packed codes plus metadata) and back. All
heads of one call share one bit width; the cache groups heads by width before calling.

Keys and values may be treated differently (KIVI quantizes keys per channel and values per token), so
``quantize`` takes the tensor ``kind`` ("key" or "value").

The rules a design must follow (checked for every registered design by ``tests/quantizers/test_conformance.py``;
``docs/quantizers.md`` has the same checklist):

1. It is a frozen dataclass whose fields are its parameters (JSON values: plans store them), validated in
   ``__post_init__`` with bounded ranges, registered with ``@register`` under a unique ``name``.
2. Batch-major tensors: every tensor of a :class:`QuantizedTensor` has the block's batch as its first
   dimension, so the cache can stack chunks along it.
3. Each ``(batch, head)`` block is quantized independently: quantizing a sub-block gives the same codes.
4. Token groups: tokens are quantized together in groups of ``token_group(kind)`` at most (1 for per-token
   designs); a block of whole groups never depends on tokens outside it.
5. ``fake_quantize(x) == dequantize(quantize(x))`` exactly (same dtype and values).
6. ``nbytes()`` is the real storage, and ``bits_per_token`` equals it per stored token (metadata included).
7. ``dequantize_into`` / ``prepare_decode`` write exactly ``dequantize`` into a (possibly strided) output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import ClassVar

import torch

from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS
from ratequant.registry import Registry
from ratequant.validation import MAX_BITS, MIN_BITS


@dataclass
class QuantizedTensor:
    """Packed storage of one quantized block.

    ``tensors`` holds every tensor the block keeps (packed ``uint8`` codes, scales, zeros, norms, ...);
    nothing else is stored, so :meth:`nbytes` is the real allocated size. ``shape`` is the logical
    ``[batch, heads, tokens, head_dim]`` shape of the input, ``dtype`` its floating dtype.
    """

    tensors: dict[str, torch.Tensor]
    shape: tuple[int, int, int, int]
    bits: int
    kind: str
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Bytes of storage held by this block's tensors (codes + metadata)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors.values())


@dataclass(frozen=True)
class Quantizer(ABC):
    """A quantizer design: subclasses are frozen dataclasses whose fields are their parameters.

    Subclasses set ``name`` and implement ``quantize``, ``dequantize`` and ``metadata_bits_per_token``.
    ``fake_quantize`` (quantize then dequantize without keeping packed codes) may be overridden with a
    faster path but must give exactly ``dequantize(quantize(x))``.
    """

    name: ClassVar[str]
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise RateQuantError(
                f"{self.name}: scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}"
            )

    # -- the interface ---------------------------------------------------------------------------------
    def token_group(self, kind: str) -> int:
        """Tokens that must be quantized together for ``kind`` (1 for per-token designs).

        The cache only quantizes whole multiples of this many tokens; its residual window holds the rest.
        """
        return 1

    @abstractmethod
    def quantize(self, x: torch.Tensor, bits: int, kind: str) -> QuantizedTensor:
        """Quantize ``x`` ``[batch, heads, tokens, head_dim]`` at ``bits`` (1..8)."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """Reconstruct ``x_hat`` with ``q.shape`` and ``q.dtype``."""

    @abstractmethod
    def metadata_bits_per_token(self, head_dim: int, bits: int, kind: str) -> float:
        """Bits of metadata (scales, zeros, norms) stored per token per head, amortised over groups."""

    def fake_quantize(self, x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        """``dequantize(quantize(x, bits, kind))``: what attention sees under this design."""
        return self.dequantize(self.quantize(x, bits, kind))

    def dequantize_into(self, q: QuantizedTensor, out: torch.Tensor) -> None:
        """Write ``dequantize(q)`` into ``out`` ``[*lead, heads, tokens, head_dim]`` (leading dims multiplying
        to ``q``'s batch, any strides). This default decodes then copies; designs override it."""
        out.copy_(self.dequantize(q).to(out.dtype).view(out.shape))

    def prepare_decode(self, q: QuantizedTensor) -> Callable[[torch.Tensor], None]:
        """A function ``out -> None`` doing :meth:`dequantize_into` for ``q``, for repeated decodes of one
        block (the cache's stored chunks, on every step); designs may do ``q``'s checks once here."""
        return partial(self.dequantize_into, q)

    def prepare_attend(self, q: QuantizedTensor):
        """A :class:`ratequant.kernels.native.PreparedDecode` that computes attention straight from ``q``'s packed rows
        (:meth:`~ratequant.kernels.native.PreparedDecode.attend`), or None where the design's decode is not a plain
        ``codes * scale + zero`` or the native kernel is missing (then attention decodes the block first). The rows
        it serves may be rotated (``dequantize(q) == rows @ R.T`` with ``R`` from :meth:`attend_rotation`)."""
        return None

    def attend_rotation(self, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The orthogonal ``R [head_dim, head_dim]`` of the rows :meth:`prepare_attend` serves (attention rotates the
        queries by ``R`` and its output back by ``R.T``), or None when they are not rotated."""
        return None

    # -- derived ---------------------------------------------------------------------------------------
    def bits_per_token(self, head_dim: int, bits: int, kind: str) -> float:
        """Total stored bits per token per head: ``head_dim * bits`` codes plus metadata."""
        return head_dim * bits + self.metadata_bits_per_token(head_dim, bits, kind)

    def bits_per_element(self, head_dim: int, bits: int, kind: str) -> float:
        """Stored bits per element including metadata (e.g. 4.5 for 4-bit codes with fp16 scale/zero per 64)."""
        return self.bits_per_token(head_dim, bits, kind) / head_dim

    def params(self) -> dict:
        """The design's parameters, JSON-serialisable (used in plan files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_config(self) -> dict:
        return {"name": self.name, "params": self.params()}

    # -- validation helpers for subclasses ------------------------------------------------------------
    @staticmethod
    def check_bits(bits: int) -> int:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise RateQuantError(f"bit width must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        return bits

    @staticmethod
    def check_kind(kind: str) -> str:
        if kind not in KINDS:
            raise RateQuantError(f"tensor kind must be 'key' or 'value', got {kind!r}")
        return kind

    @staticmethod
    def check_input(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RateQuantError(f"expected a tensor [batch, heads, tokens, head_dim], got {shape}")
        if not x.is_floating_point():
            raise RateQuantError(f"expected a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise RateQuantError("input holds NaN or Inf values; KV tensors must be finite to quantize")
        return x


DESIGNS: Registry[type[Quantizer]] = Registry("quantizer")
register = DESIGNS.register
"""Class decorator: make a design available by its ``name``."""


def available() -> list[str]:
    return sorted(DESIGNS)


def get_quantizer(name: str, **params) -> Quantizer:
    """Build a design by name with keyword parameters; errors name the valid choices."""
    if name not in DESIGNS:
        raise RateQuantError(f"unknown quantizer {name!r}; choose one of: {', '.join(available())}")
    cls = DESIGNS.get(name)
    known = {f.name for f in fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise RateQuantError(
            f"quantizer {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
            f"its parameters are: {', '.join(sorted(known))}"
        )
    return cls(**params)


def from_config(config: dict) -> Quantizer:
    """Inverse of :meth:`Quantizer.to_config`."""
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise RateQuantError(f"quantizer config must be {{'name': str, 'params': {{...}}}}, got {config!r}")
    params = config.get("params", {})
    if not isinstance(params, dict):
        raise RateQuantError(f"quantizer params must be an object, got {type(params).__name__}")
    return get_quantizer(config["name"], **params)


__all__ = [
    "DESIGNS",
    "MAX_BITS",
    "MIN_BITS",
    "QuantizedTensor",
    "Quantizer",
    "available",
    "from_config",
    "get_quantizer",
    "register",
]
