"""``uniform``: per-token asymmetric min-max quantization, groups along head_dim (the plain INT-b baseline).

The round-to-nearest integer quantizer with a per-group scale and zero point, as used for KV caches by e.g.
FlexGen (Sheng et al., "FlexGen: High-throughput generative inference of large language models with a
single GPU", ICML 2023) and as the "INT-b" baseline of KIVI (Liu et al., ICML 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ratequant.quantizers._common import (
    PerTokenGroups,
    check_group_size,
    group_along_dim,
    minmax_codes,
    minmax_meta,
    minmax_values,
    minmax_values_into,
)
from ratequant.quantizers.base import register


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
    minmax_values_into(
        codes.unflatten(-1, split), scale.unsqueeze(-1), zero.unsqueeze(-1), out.unflatten(-1, split)
    )


def decode_token_groups(codes: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`encode_token_groups`: float32 ``[B, H, T, D]``."""
    b, h, t, d = codes.shape
    scale, zero = meta["scale"], meta["zero"]
    ng = scale.shape[-1]
    out = minmax_values(codes.reshape(b, h, t, ng, d // ng), scale.unsqueeze(-1), zero.unsqueeze(-1))
    return out.reshape(b, h, t, d)


@register
@dataclass(frozen=True)
class Uniform(PerTokenGroups):
    """Per-token asymmetric min-max, ``group_size`` elements along head_dim per (scale, zero) pair.

    ``group_size=None`` uses one group per token (the whole head_dim). Keys and values are treated alike.

    Storage per token per head: ``head_dim * bits`` code bits + ``2 * (head_dim / group_size)`` metadata
    values of ``scale_dtype``. Bound: ``|x - x_hat| <= step / 2`` elementwise, with ``step`` the stored
    (rounded-up) scale of the element's group, up to float32 rounding.
    """

    name = "uniform"
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_size(self.name, self.group_size, allow_none=True)

    def _encode(self, x, bits, kind):
        g = group_along_dim(self.name, self.group_size, x.shape[-1])
        return encode_token_groups(x, bits, g, self._meta_dtype())

    def _decode(self, codes, meta, bits, kind):
        return decode_token_groups(codes, meta)

    def _decode_into(self, codes, meta, bits, kind, out):
        decode_token_groups_into(codes, meta, out)

    def _minmax_layout(self, q):
        return 1, group_along_dim(self.name, self.group_size, q.shape[-1])
