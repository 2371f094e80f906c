"""``uniform``: per-token asymmetric min-max quantization, groups along head_dim (the plain INT-b baseline).

The round-to-nearest integer quantizer with a per-group scale and zero point, as used for KV caches by e.g.
FlexGen (Sheng et al., "FlexGen: High-throughput generative inference of large language models with a
single GPU", ICML 2023) and as the "INT-b" baseline of KIVI (Liu et al., ICML 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

from ratequant.quantizers._minmax import (
    PerTokenGroups,
    check_group_size,
    decode_token_groups,
    decode_token_groups_into,
    encode_token_groups,
    group_along_dim,
)
from ratequant.quantizers.base import register


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
