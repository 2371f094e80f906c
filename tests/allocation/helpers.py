"""What the allocation tests share: synthetic distortion tables and their fits, the brute-force optimum, the
geometries, and a quantizer that only has a cost."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ratequant.allocation import Curves
from ratequant.allocation.fitting import fit_distortion
from ratequant.geometry import Geometry
from ratequant.quantizers.base import Quantizer

ALL = (1, 2, 3, 4, 5, 6, 7, 8)
G = Geometry(num_layers=6, num_kv_heads=3, head_dim=32, num_heads=6)  # N = 36
TINY = Geometry(num_layers=1, num_kv_heads=2, head_dim=8)  # N = 4: keys then values
FLOOR_WIDTHS = (1, 2, 3, 4, 5)


def brute_force(curves, bitset, cost, total, at_most=False):
    """Minimum of sum curves over all width choices with sum cost*b == total (or <= total)."""
    n = curves.shape[0]
    best, arg = math.inf, None
    for choice in itertools.product(range(len(bitset)), repeat=n):
        spent = sum(cost[i] * bitset[j] for i, j in enumerate(choice))
        if spent > total if at_most else spent != total:
            continue
        val = sum(curves[i, j] for i, j in enumerate(choice))
        if val < best:
            best, arg = val, choice
    return best, arg


def table_for(geometry, bitset=ALL, seed=0, betas=(4.5, 3.7), noise=0.0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, 2, geometry.shape))
    beta = np.empty(geometry.shape)
    beta[0], beta[1] = betas
    t = alpha[..., None] * beta[..., None] ** -np.asarray(bitset, float)
    return t * np.exp(rng.normal(0, noise, t.shape)) if noise else t


def fitted(geometry, **kw):
    """Curves of a fit to a synthetic table over all widths."""
    return Curves.from_fit(fit_distortion(table_for(geometry, **kw), ALL))


@dataclass(frozen=True)
class FakeQuantizer(Quantizer):
    """Stores a float16 scale and zero per token and head (32 bits); optionally a width-dependent codebook."""

    name: ClassVar[str] = "fake-test"
    codebook: bool = False

    def quantize(self, x, bits, kind):  # pragma: no cover - cost only
        raise NotImplementedError

    def dequantize(self, q):  # pragma: no cover - cost only
        raise NotImplementedError

    def metadata_bits_per_token(self, head_dim, bits, kind):
        return 32.0 + (2**bits if self.codebook else 0.0)
