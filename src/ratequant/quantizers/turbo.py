"""``turbo``: random orthogonal rotation, then a Lloyd-Max scalar codebook per coordinate (TurboQuant).

Zandieh et al., "TurboQuant: Online vector quantization with near-optimal distortion rate", ICLR 2026.
After a random rotation, the coordinates of ``sqrt(head_dim) * x / ||x||`` are distributed like those of a
uniformly random point on the sphere of radius ``sqrt(head_dim)``: approximately independent N(0, 1) for
the head dims of interest. Each coordinate is then quantized with the MSE-optimal (Lloyd-Max) scalar
codebook of N(0, 1) at ``bits`` bits, and one gain per token restores the scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ratequant.errors import RateQuantError
from ratequant.kernels import native
from ratequant.quantizers._minmax import PackedDesign
from ratequant.quantizers.base import QuantizedTensor, register
from ratequant.validation import check_int


@dataclass(frozen=True)
class Codebook:
    """Lloyd-Max quantizer of N(0, 1): ``levels`` ``[2**bits]`` ascending, ``boundaries`` the midpoints.

    ``distortion`` is its mean squared error on N(0, 1) (0.3634, 0.1175, 0.03455, 0.009501, ... for
    1, 2, 3, 4 bits).
    """

    bits: int
    levels: np.ndarray
    boundaries: np.ndarray
    distortion: float


@cache
def lloyd_max_gaussian(bits: int) -> Codebook:
    """The Lloyd-Max codebook of N(0, 1) at ``bits`` (1..8), computed once per width and cached.

    Solves the Lloyd conditions (every level is the centroid of its cell, every boundary the midpoint of
    its two levels) on the positive half-line with a root finder started from the companding
    (Panter-Dite) approximation, then mirrors it.
    """
    from scipy.optimize import root
    from scipy.special import ndtr, ndtri

    PackedDesign.check_bits(bits)
    half = 1 << (bits - 1)
    inv_sqrt_2pi = 1.0 / math.sqrt(2.0 * math.pi)

    def cells(inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.concatenate([[0.0], inner, [np.inf]])
        a, b = t[:-1], t[1:]
        p = ndtr(-a) - ndtr(-b)  # P(a < X < b) via upper tails: accurate far out
        c = (np.exp(-0.5 * a * a) - np.exp(-0.5 * b * b)) * inv_sqrt_2pi / p
        return p, c

    def residual(inner: np.ndarray) -> np.ndarray:
        c = cells(inner)[1]
        return inner - 0.5 * (c[:-1] + c[1:])

    inner = np.zeros(0)
    if half > 1:
        start = math.sqrt(3.0) * ndtri(0.5 + 0.5 * np.arange(1, half) / half)
        inner = root(residual, start, method="hybr", options={"xtol": 1e-14}).x
        if not np.all(np.diff(inner) > 0) or np.max(np.abs(residual(inner))) > 1e-9:
            raise RateQuantError(f"turbo: Lloyd-Max iteration did not converge for {bits} bits")
    p, c = cells(inner)
    levels = np.concatenate([-c[::-1], c])
    boundaries = 0.5 * (levels[:-1] + levels[1:])
    return Codebook(bits, levels, boundaries, float(1.0 - 2.0 * np.sum(p * c * c)))


@cache
def _rotation_cpu(head_dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed
    return q.to(torch.float32)


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, make) -> torch.Tensor:
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = make()
    return _DEVICE_CACHE[key]


def random_rotation(head_dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded Haar-random orthogonal ``[head_dim, head_dim]`` float32 matrix (QR of a Gaussian), cached."""
    dev = torch.device(device)
    return _cached(("rot", head_dim, seed, str(dev)), lambda: _rotation_cpu(head_dim, seed).to(dev))


def codebook_tensors(bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [2**bits], boundaries [2**bits - 1])`` float32 on ``device``, cached."""
    dev = torch.device(device)

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        cb = lloyd_max_gaussian(bits)
        return (
            torch.tensor(cb.levels, dtype=torch.float32, device=dev),
            torch.tensor(cb.boundaries, dtype=torch.float32, device=dev),
        )

    return _cached(("cb", bits, str(dev)), make)


def _make_lookup(bits: int, dev: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    # A uniform grid of cells of width delta (a power of two, at most a quarter of the smallest gap between
    # boundaries) over [-span, span). Cell j stores how many boundaries lie below the left edge of cell j - 1
    # and the next boundary after those; one comparison then finishes the count (see nearest_level).
    bounds = lloyd_max_gaussian(bits).boundaries
    gap = float(np.min(np.diff(bounds))) if len(bounds) > 1 else 1.0
    delta = 2.0 ** math.floor(math.log2(gap / 4))
    span = 2.0 ** math.ceil(math.log2(float(np.max(np.abs(bounds))) + 4 * delta))
    cells = int(round(2 * span / delta))
    lower_edges = (np.arange(cells) - 1) * delta - span
    below = np.searchsorted(bounds, lower_edges, side="left")  # boundaries < edge
    following = np.concatenate([bounds, [np.inf]])[below]
    return (
        1.0 / delta,
        span,
        torch.tensor(below, dtype=torch.int32, device=dev),
        torch.tensor(following, dtype=torch.float32, device=dev),
    )


def nearest_level(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Index (int32) of the nearest Lloyd-Max level for every element of float32 ``y``.

    Equal to ``torch.bucketize(y, boundaries)`` (the number of boundaries ``< y``) but a few times faster
    on CPU: a table lookup on a fine power-of-two grid plus one comparison.
    """
    if bits == 1:  # one boundary, at 0
        return (y > 0).to(torch.int32)
    inv_delta, span, below, following = _cached(("lut", bits, str(y.device)), lambda: _make_lookup(bits, y.device))
    top = span - 1.0 / inv_delta
    cell = y.clamp(-span, top).add_(span).mul_(inv_delta).to(torch.int32).reshape(-1)
    above = torch.gt(y.reshape(-1), following.index_select(0, cell)).to(torch.int32)
    return below.index_select(0, cell).add_(above).reshape(y.shape)


def _levels_at(levels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return levels.index_select(0, idx.reshape(-1)).reshape(idx.shape)


@register
@dataclass(frozen=True)
class Turbo(PackedDesign):
    """Rotation ``x @ R`` (``R`` Haar-random, fixed by ``seed``), Lloyd-Max codes, one gain per token.

    Encode: ``xr = x @ R``; ``y = sqrt(D) * xr / ||xr||``; ``code_i`` = nearest Lloyd-Max level of ``y_i``;
    ``gain = <xr, y_hat> / ||y_hat||^2`` (the least-squares scale for the chosen codes, ``~ ||x|| /
    sqrt(D)``), stored in ``scale_dtype`` as ``scale [B, H, T, 1]``. Decode: ``x_hat = (y_hat @ R^T) * gain``.

    Storage per token per head: ``head_dim * bits`` code bits + one ``scale_dtype`` value. Bound (per
    token): ``||x - x_hat||_2 <= (||x|| / sqrt(D)) * ||y - y_hat||_2 + |gain_stored - gain| * ||y_hat||``
    with ``y_hat`` the nearest-level quantization of ``y``, up to float32 rounding; the expected squared
    error is about ``codebook.distortion * ||x||^2 / D`` per coordinate.
    """

    name = "turbo"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.seed, "turbo: seed", lo=0)

    def metadata_bits_per_token(self, head_dim: int, bits: int, kind: str) -> float:
        self.check_bits(bits)
        self.check_kind(kind)
        return float(self._meta_bits())

    def _encode(self, x, bits, kind):
        d = x.shape[-1]
        xr = torch.matmul(x, random_rotation(d, self.seed, x.device))
        # Normalise by the per-token max first so that norms of very large or very small tokens are exact.
        peak = xr.abs().amax(-1, keepdim=True)
        if not bool(torch.isfinite(peak).all()):
            raise RateQuantError("turbo: the rotated tensor overflows float32; scale the tensor down")
        unit = xr.div_(torch.where(peak > 0, peak, torch.ones_like(peak)))  # in place: fewer temporaries
        norm = torch.linalg.vector_norm(unit, dim=-1, keepdim=True)
        y = unit * torch.where(norm > 0, math.sqrt(d) / norm, torch.zeros_like(norm))
        idx = nearest_level(y, bits)
        del y
        levels, _ = codebook_tensors(bits, x.device)
        y_hat = _levels_at(levels, idx)
        dot = torch.linalg.vecdot(unit, y_hat, dim=-1).unsqueeze(-1)
        gain = peak * (dot / torch.linalg.vecdot(y_hat, y_hat, dim=-1).unsqueeze(-1))
        dtype = self._meta_dtype()
        if dtype != torch.float32 and bool(gain.abs().amax() > torch.finfo(dtype).max):
            dtype = torch.float32  # does not fit scale_dtype: keep float32 for this block
        return idx, {"scale": gain.to(dtype)}

    def _decode(self, codes, meta, bits, kind):
        levels, _ = codebook_tensors(bits, codes.device)
        y_hat = _levels_at(levels, codes.to(torch.int32))
        rot = random_rotation(codes.shape[-1], self.seed, codes.device)
        return torch.matmul(y_hat, rot.T) * meta["scale"].to(torch.float32)

    def attend_rotation(self, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``R`` ``[head_dim, head_dim]``: ``dequantize(q) == rows @ R.T`` for the rotated rows ``gain * levels[codes]``
        that :meth:`prepare_attend` serves."""
        return random_rotation(head_dim, self.seed, device)

    def prepare_attend(self, q: QuantizedTensor):
        """The native kernel over the *rotated* rows ``levels[codes] * gain`` (the Lloyd-Max codebook as the
        kernel's table of code values, one gain per token and no offset): callers rotate the queries by ``R`` and
        the weighted values back by ``R.T`` (:meth:`attend_rotation`). None where the kernel is missing or the
        block does not fit it."""
        if not {"codes", "scale"} <= q.tensors.keys():
            return None
        b, h, t, d = q.shape
        scale = q.tensors["scale"]
        levels, _ = codebook_tensors(q.bits, scale.device)
        codes = q.tensors["codes"].view(b, h, t, -1)
        return native.prepare_minmax_decode(codes, q.bits, d, scale, torch.zeros_like(scale), 1, d, levels)
