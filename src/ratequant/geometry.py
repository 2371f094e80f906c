"""The attention geometry that plans, caches and allocators agree on."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ratequant.errors import RateQuantError

KINDS = ("key", "value")
"""Tensor kinds of a component, in the order used by every ``[2, layers, heads]`` array."""


@dataclass(frozen=True)
class Geometry:
    """KV-cache geometry of a decoder model.

    A *component* is one (kind, layer, kv-head); a model has ``2 * num_layers * num_kv_heads`` of them,
    indexed everywhere as arrays of shape ``[2, num_layers, num_kv_heads]`` (kind 0 = key, 1 = value).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int | None = None  # query heads; None when unknown

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RateQuantError(f"geometry: {name} must be a positive integer, got {value!r}")
        if self.num_heads is not None and (
            isinstance(self.num_heads, bool)
            or not isinstance(self.num_heads, int)
            or self.num_heads < 1
            or self.num_heads % self.num_kv_heads
        ):
            raise RateQuantError(
                f"geometry: num_heads={self.num_heads!r} must be a positive multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def num_components(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of a per-component array: ``(2, num_layers, num_kv_heads)``."""
        return (2, self.num_layers, self.num_kv_heads)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes per token of a full-precision KV cache with ``itemsize``-byte values (keys and values of every
        kv head of every layer)."""
        return self.num_components * self.head_dim * int(itemsize)

    def to_dict(self) -> dict:
        return asdict(self)

    def against_full_precision(self, nbytes: float, dtype: str | None = None, itemsize: int | None = None) -> str:
        """``nbytes`` per token beside a full-precision cache's: ``"6,322 bytes per token (27.4% of float16's
        23,040)"``, and of the model's ``dtype`` (``itemsize`` bytes a value) too when that is not 2 bytes."""
        fp16 = self.kv_bytes_per_token(2)
        text = f"{nbytes:,.0f} bytes per token ({nbytes / fp16:.1%} of float16's {fp16:,}"
        if dtype is not None and itemsize is not None and itemsize != 2:
            full = self.kv_bytes_per_token(itemsize)
            text += f"; {nbytes / full:.1%} of the model's {dtype}, {full:,}"
        return text + ")"
