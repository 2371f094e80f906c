"""``turbo``: Lloyd-Max codebooks, the random rotation, nearest-level bound for every width."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from scipy import integrate, stats

from ratequant.errors import RateQuantError
from ratequant.quantizers import get_quantizer
from ratequant.quantizers.turbo import codebook_tensors, lloyd_max_gaussian, random_rotation

from ._helpers import EPS32, assert_stored_exactly, kv_tensors

# Published Lloyd-Max distortions of N(0, 1) (Max 1960; 1 bit is exactly 1 - 2 / pi).
KNOWN = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.03455, 4: 0.009501, 5: 0.002505}


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_satisfies_the_lloyd_conditions(bits):
    cb = lloyd_max_gaussian(bits)
    assert cb is lloyd_max_gaussian(bits)  # computed once, cached
    levels = cb.levels
    assert levels.shape == (1 << bits,) and np.all(np.diff(levels) > 0)
    assert np.allclose(levels, -levels[::-1])
    assert np.allclose(cb.boundaries, (levels[:-1] + levels[1:]) / 2)
    # centroid condition, checked by independent numerical integration on a few cells
    edges = np.concatenate([[-np.inf], cb.boundaries, [np.inf]])
    for k in {0, len(levels) // 2, len(levels) - 1}:
        mass = integrate.quad(stats.norm.pdf, edges[k], edges[k + 1])[0]
        first = integrate.quad(lambda t: t * stats.norm.pdf(t), edges[k], edges[k + 1])[0]
        assert first / mass == pytest.approx(levels[k], rel=1e-6, abs=1e-9)
    if bits in KNOWN:
        assert cb.distortion == pytest.approx(KNOWN[bits], rel=2e-3)
    samples = np.random.default_rng(bits).standard_normal(400_000)
    nearest = levels[np.searchsorted(cb.boundaries, samples)]
    assert np.mean((samples - nearest) ** 2) == pytest.approx(cb.distortion, rel=0.05)


def test_rotation_is_orthogonal_seeded_and_cached():
    r = random_rotation(64, 0)
    assert torch.allclose(r.double() @ r.double().T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    assert random_rotation(64, 0) is r
    assert not torch.allclose(random_rotation(64, 1), r)
    assert torch.allclose(
        random_rotation(96, 0).double().T @ random_rotation(96, 0).double(),
        torch.eye(96, dtype=torch.float64),
        atol=1e-6,
    )


def nearest_level_bound(design, x, q, bits):
    """Per token: ``(||x|| / sqrt(D)) ||y - Q(y)|| + |gain_stored - gain| ||Q(y)||`` (+ slack).

    ``Q`` is brute-force nearest-level quantization; the gain rounding is at most half a float16 ulp
    (relative 2**-11) or 2**-25 absolute in the subnormal range.
    """
    d = x.shape[-1]
    xr = x.double() @ random_rotation(d, design.seed).double()
    norm = torch.linalg.vector_norm(xr, dim=-1, keepdim=True)
    y = torch.where(norm > 0, xr * math.sqrt(d) / norm, torch.zeros_like(xr))
    levels = torch.tensor(lloyd_max_gaussian(bits).levels)
    y_hat = levels[(y.unsqueeze(-1) - levels).abs().argmin(-1)]
    quant = norm.squeeze(-1) / math.sqrt(d) * torch.linalg.vector_norm(y - y_hat, dim=-1)
    gain = norm.squeeze(-1) / torch.linalg.vector_norm(y_hat, dim=-1)  # |gain| <= ||x|| / ||y_hat||
    rounding = torch.maximum(gain * 2**-11, torch.full_like(gain, 2**-25))
    rounding = rounding * torch.linalg.vector_norm(y_hat, dim=-1)
    slack = 64 * d * EPS32 * (norm.squeeze(-1) + x.double().abs().amax(-1))
    return quant + rounding + slack


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=15, deadline=None)
@given(x=kv_tensors(head_dims=(1, 2, 8, 16, 24), max_abs=1e3))
def test_nearest_level_bound_every_width(bits, x):
    design = get_quantizer("turbo")
    q = design.quantize(x, bits, "key")
    x_hat = design.dequantize(q)
    err = torch.linalg.vector_norm(x.double() - x_hat.double(), dim=-1)
    assert bool((err <= nearest_level_bound(design, x, q, bits)).all())
    assert_stored_exactly(q)
    assert q.tensors["scale"].shape == (*x.shape[:3], 1)
    assert torch.equal(design.fake_quantize(x, bits, "key"), x_hat)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_mse_matches_the_codebook_distortion_on_gaussian_data(bits):
    x = torch.randn(1, 4, 2048, 64, generator=torch.Generator().manual_seed(bits))
    x_hat = get_quantizer("turbo").fake_quantize(x, bits, "value")
    per_coord = float((x - x_hat).pow(2).sum(-1).div(x.pow(2).sum(-1)).mean())
    # the least-squares gain can only help; finite head_dim makes coordinates slightly lighter-tailed
    assert 0.8 * lloyd_max_gaussian(bits).distortion < per_coord <= 1.02 * lloyd_max_gaussian(bits).distortion


def test_zero_tokens_and_scale_invariance():
    design = get_quantizer("turbo")
    x = torch.randn(1, 1, 4, 32, generator=torch.Generator().manual_seed(0))
    x[0, 0, 1] = 0
    x_hat = design.fake_quantize(x, 3, "key")
    assert torch.equal(x_hat[0, 0, 1], torch.zeros(32))
    # codes depend only on the direction of each token
    q1, q2 = design.quantize(x, 3, "key"), design.quantize(x * 1024, 3, "key")
    assert torch.equal(q1.tensors["codes"], q2.tensors["codes"])


def test_large_gains_switch_to_float32_metadata():
    x = torch.randn(1, 1, 3, 16, generator=torch.Generator().manual_seed(0)) * 1e6
    q = get_quantizer("turbo").quantize(x, 4, "key")
    assert q.tensors["scale"].dtype == torch.float32
    assert q.nbytes() == 3 * (16 * 4 // 8 + 4)
    assert get_quantizer("turbo").quantize(x * 1e-6, 4, "key").tensors["scale"].dtype == torch.float16


def test_metadata_accounting_and_codebook_cache():
    design = get_quantizer("turbo", scale_dtype="bfloat16")
    assert design.metadata_bits_per_token(64, 2, "key") == 16
    x = torch.randn(2, 3, 5, 64)
    for bits in range(1, 9):
        assert design.quantize(x, bits, "value").nbytes() == 2 * 3 * 5 * design.bits_per_token(64, bits, "value") / 8
    assert codebook_tensors(3)[0] is codebook_tensors(3)[0]


@pytest.mark.parametrize("bad", [-1, 1.0, True, "0", None])
def test_invalid_seed(bad):
    with pytest.raises(RateQuantError, match="seed"):
        get_quantizer("turbo", seed=bad)


@pytest.mark.parametrize("bits", range(1, 9))
def test_fast_nearest_level_equals_bucketize(bits):
    """The lookup-table search agrees exactly with a binary search, including on and beside boundaries."""
    from ratequant.quantizers.turbo import nearest_level

    _, bounds = codebook_tensors(bits)
    inf = torch.full_like(bounds, float("inf"))
    probes = torch.cat(
        [
            torch.randn(20000, generator=torch.Generator().manual_seed(bits)) * 2,
            torch.linspace(-12, 12, 50001),
            bounds,
            torch.nextafter(bounds, inf),
            torch.nextafter(bounds, -inf),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 8.0, -8.0]),
        ]
    )
    assert torch.equal(nearest_level(probes, bits).long(), torch.bucketize(probes, bounds))
