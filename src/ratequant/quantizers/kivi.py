"""``kivi``: keys per channel over groups of tokens, values per token (KIVI).

Liu et al., "KIVI: A tuning-free asymmetric 2bit quantization for KV cache", ICML 2024. Keys have a few
outlier *channels*, so each key channel gets its own (scale, zero) over ``group_size`` consecutive tokens;
values are quantized per token in groups of ``group_size`` along head_dim. KIVI's full-precision residual
window of recent tokens is the cache's business, not the quantizer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ratequant.quantizers._minmax import (
    PackedDesign,
    check_group_size,
    decode_token_groups,
    decode_token_groups_into,
    encode_token_groups,
    group_along_dim,
    minmax_codes,
    minmax_meta,
    minmax_values,
    minmax_values_into,
)
from ratequant.quantizers.base import register


@register
@dataclass(frozen=True)
class Kivi(PackedDesign):
    """KIVI min-max quantization with groups of ``group_size`` (G).

    * keys: per channel, over G consecutive tokens; ``scale`` and ``zero`` are ``[B, H, ceil(T / G), D]``.
      ``token_group("key") == G``. When T is not a multiple of G, the last ``T mod G`` tokens form a
      partial group quantized on their own (the cache normally quantizes whole groups only).
    * values: per token, groups of ``min(G, head_dim)`` along head_dim (must divide head_dim);
      ``scale`` and ``zero`` are ``[B, H, T, head_dim / g]``.

    Storage per token per head: ``head_dim * bits`` code bits + ``2 * head_dim / G`` (keys) or
    ``2 * head_dim / g`` (values) metadata values of ``scale_dtype``. Bound: ``|x - x_hat| <= step / 2``
    elementwise, with ``step`` the stored scale of the element's group, up to float32 rounding.
    """

    name = "kivi"
    group_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_size(self.name, self.group_size, allow_none=False)

    def token_group(self, kind: str) -> int:
        return self.group_size if self.check_kind(kind) == "key" else 1

    def _value_group(self, head_dim: int) -> int:
        return group_along_dim(self.name, min(self.group_size, head_dim), head_dim)

    def _check_shape(self, shape, kind) -> None:
        if kind == "value":
            self._value_group(shape[-1])

    def metadata_bits_per_token(self, head_dim: int, bits: int, kind: str) -> float:
        self.check_bits(bits)
        if self.check_kind(kind) == "key":
            return 2 * head_dim * self._meta_bits() / self.group_size
        return 2 * (head_dim // self._value_group(head_dim)) * self._meta_bits()

    def _encode(self, x, bits, kind):
        if kind == "value":
            return encode_token_groups(x, bits, self._value_group(x.shape[-1]), self._meta_dtype())
        b, h, t, d = x.shape
        g = self.group_size
        full = t // g * g  # whole groups; the last t - full tokens (if any) form a group of their own
        parts = [x[:, :, :full].reshape(b, h, full // g, g, d)] if full else []
        if full < t:
            parts.append(x[:, :, full:].unsqueeze(2))  # [b, h, 1, t - full, d]: no padding is materialised
        lo = torch.cat([p.amin(dim=3) for p in parts], dim=2)
        hi = torch.cat([p.amax(dim=3) for p in parts], dim=2)
        scale, zero = minmax_meta(lo, hi, bits, self._meta_dtype())
        codes, start = [], 0
        for p in parts:
            n = p.shape[2]
            s_, z_ = scale[:, :, start : start + n].unsqueeze(3), zero[:, :, start : start + n].unsqueeze(3)
            codes.append(minmax_codes(p, s_, z_, bits).reshape(b, h, -1, d))
            start += n
        return (codes[0] if len(codes) == 1 else torch.cat(codes, dim=2)), {"scale": scale, "zero": zero}

    def _decode(self, codes, meta, bits, kind):
        if kind == "value":
            return decode_token_groups(codes, meta)
        b, h, t, d = codes.shape
        scale, zero = meta["scale"], meta["zero"]
        g = self.group_size
        full = t // g * g
        out = []
        if full:
            n = full // g
            out.append(
                minmax_values(codes[:, :, :full].reshape(b, h, n, g, d), scale[:, :, :n, None], zero[:, :, :n, None])
            )
        if full < t:
            out.append(minmax_values(codes[:, :, full:], scale[:, :, -1:], zero[:, :, -1:]))
        out = [o.reshape(b, h, -1, d) for o in out]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def _minmax_layout(self, q):
        if q.kind == "value":
            return 1, self._value_group(q.shape[-1])
        return (self.group_size, 1) if q.shape[2] % self.group_size == 0 else None

    def _decode_into(self, codes, meta, bits, kind, out):
        if kind == "value":
            return decode_token_groups_into(codes, meta, out)
        scale, zero = meta["scale"], meta["zero"]  # [..., ng, D]
        t, ng = codes.shape[-2], scale.shape[-2]
        if ng * self.group_size != t:  # a partial trailing group: the general path
            return super()._decode_into(codes, meta, bits, kind, out)
        split = (ng, self.group_size)
        minmax_values_into(
            codes.unflatten(-2, split), scale.unsqueeze(-2), zero.unsqueeze(-2), out.unflatten(-2, split)
        )
