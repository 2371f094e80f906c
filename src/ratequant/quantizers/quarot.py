"""``quarot``: orthogonal Hadamard rotation along head_dim, then per-token min-max quantization.

Ashkboos et al., "QuaRot: Outlier-free 4-bit inference in rotated LLMs", ICML 2024. Rotating a key or
value vector by an orthogonal Hadamard matrix spreads outlier channels over all coordinates, which shrinks
each token's range; the rotation is undone on dequantize (in a real deployment it is folded into the
attention weights; here it is applied explicitly so the design is a drop-in quantizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from ratequant.errors import RateQuantError
from ratequant.kernels import native
from ratequant.quantizers._minmax import (
    PerTokenGroups,
    check_group_size,
    decode_token_groups,
    encode_token_groups,
    group_along_dim,
)
from ratequant.quantizers.base import QuantizedTensor, register


def hadamard_block_size(head_dim: int) -> int:
    """Largest power of two dividing ``head_dim``: the size of each Hadamard block."""
    return head_dim & -head_dim


@cache
def _hadamard_cpu(head_dim: int) -> torch.Tensor:
    p = hadamard_block_size(head_dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:  # Sylvester construction: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(p)
    return torch.block_diag(*([h] * (head_dim // p))).to(torch.float32)


_DEVICE_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def hadamard(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthogonal, symmetric ``[head_dim, head_dim]`` float32 rotation (cached per size and device).

    For a power-of-two head_dim this is the normalised Sylvester Hadamard matrix. Otherwise it is block
    diagonal, with ``head_dim / p`` Sylvester blocks of size ``p`` = the largest power of two dividing
    head_dim (e.g. 3 blocks of 32 for head_dim 96); it stays exactly orthogonal (``H @ H == I`` up to
    float32 rounding), so the error bounds below hold unchanged. An odd head_dim gets the identity.
    """
    key = (head_dim, str(torch.device(device)))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = _hadamard_cpu(head_dim).to(device)
    return _DEVICE_CACHE[key]


@register
@dataclass(frozen=True)
class Quarot(PerTokenGroups):
    """Hadamard rotation ``x @ H`` then per-token min-max in groups of ``group_size`` along head_dim.

    ``clip_ratio`` in (0, 1] shrinks each group's range around its midpoint before quantizing (QuaRot's
    clipping); values outside are clamped. ``group_size=None`` is one group per token.

    Storage per token per head: ``head_dim * bits`` code bits + ``2 * head_dim / group_size`` values of
    ``scale_dtype``. Bound (per token, since ``H`` is orthogonal): ``||x - x_hat||_2 <=
    sqrt(sum_groups g * (step_g / 2 + (1 - clip_ratio) * range_g / 2) ** 2)`` with ``step_g`` the stored
    scale and ``range_g`` the max - min of the rotated group, up to float32 rounding.
    """

    name = "quarot"
    clip_ratio: float = 1.0
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.clip_ratio, (int, float)) and not isinstance(self.clip_ratio, bool)
        if not ok or not 0.0 < float(self.clip_ratio) <= 1.0:
            raise RateQuantError(f"quarot: clip_ratio must be a number in (0, 1], got {self.clip_ratio!r}")
        check_group_size(self.name, self.group_size, allow_none=True)

    def _encode(self, x, bits, kind):
        d = x.shape[-1]
        g = group_along_dim(self.name, self.group_size, d)
        xr = torch.matmul(x, hadamard(d, x.device))
        return encode_token_groups(xr, bits, g, self._meta_dtype(), float(self.clip_ratio))

    def _decode(self, codes, meta, bits, kind):
        xr = decode_token_groups(codes, meta)
        return torch.matmul(xr, hadamard(codes.shape[-1], codes.device))

    def attend_rotation(self, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``R`` ``[head_dim, head_dim]`` float32, orthogonal: ``dequantize(q) == rows @ R.T`` for the rows
        :meth:`prepare_attend` reads (here the Hadamard ``H``, with ``H.T == H``)."""
        return hadamard(head_dim, device)

    def prepare_attend(self, q: QuantizedTensor):
        """The native kernel over the *rotated* rows ``codes * scale + zero`` (per-token groups along head_dim),
        i.e. ``dequantize(q) @ R`` with ``R = attend_rotation(...)``: callers rotate the queries by ``R`` and the
        weighted values back by ``R.T``. None where the kernel is missing or the block does not fit it."""
        if q.kind not in ("key", "value") or not {"codes", "scale", "zero"} <= q.tensors.keys():
            return None
        b, h, t, d = q.shape
        g = group_along_dim(self.name, self.group_size, d)
        codes = q.tensors["codes"].view(b, h, t, -1)
        return native.prepare_minmax_decode(codes, q.bits, d, q.tensors["scale"], q.tensors["zero"], 1, g)
