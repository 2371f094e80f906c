"""``quarot``: the Hadamard rotation is orthogonal for every head_dim; per-token L2 bound every width."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from ratequant.errors import RateQuantError
from ratequant.quantizers import get_quantizer
from ratequant.quantizers.quarot import hadamard, hadamard_block_size

from ._helpers import EPS32, assert_stored_exactly, kv_tensors


@pytest.mark.parametrize("d", [1, 2, 7, 12, 64, 80, 96, 128, 256])
def test_hadamard_is_orthogonal_and_symmetric(d):
    h = hadamard(d).double()
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-6)
    assert torch.equal(h, h.T)
    p = hadamard_block_size(d)
    assert d % p == 0 and (p & (p - 1)) == 0 and (d // p) % 2 == 1
    nonzero = h[h != 0].abs()
    assert torch.allclose(nonzero, torch.full_like(nonzero, 1 / math.sqrt(p)))
    assert int((h != 0).sum()) == d * p  # block diagonal with d / p dense blocks


def rotated_bound(design, x, q, bits):
    """Per-token bound ``sqrt(sum_groups g * (step/2 + (1 - c) * range/2)^2)`` + float32 slack."""
    d = x.shape[-1]
    xr = x @ hadamard(d)
    ng = q.tensors["scale"].shape[-1]
    g = d // ng
    xg = xr.reshape(*xr.shape[:3], ng, g)
    rng = xg.amax(-1) - xg.amin(-1)
    step = q.tensors["scale"].float()
    per_elem = step / 2 + (1 - design.clip_ratio) * rng / 2
    bound = (g * per_elem.pow(2)).sum(-1).sqrt()
    scale = x.abs().amax(-1) + xr.abs().amax(-1) + q.tensors["zero"].float().abs().amax(-1)
    return bound + 16 * d * EPS32 * (scale + step.amax(-1) * ((1 << bits) - 1))


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=15, deadline=None)
@given(x=kv_tensors(head_dims=(1, 4, 8, 12, 16), max_abs=1e3))
def test_l2_bound_every_width(bits, x):
    design = get_quantizer("quarot")
    q = design.quantize(x, bits, "key")
    x_hat = design.dequantize(q)
    err = torch.linalg.vector_norm(x - x_hat, dim=-1)
    assert bool((err <= rotated_bound(design, x, q, bits)).all())
    assert_stored_exactly(q)
    assert torch.equal(design.fake_quantize(x, bits, "value"), x_hat)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip", [0.9, 0.5])
def test_l2_bound_with_clipping_and_groups(bits, clip):
    x = torch.randn(2, 2, 9, 96, generator=torch.Generator().manual_seed(bits))
    design = get_quantizer("quarot", clip_ratio=clip, group_size=32)
    q = design.quantize(x, bits, "value")
    err = torch.linalg.vector_norm(x - design.dequantize(q), dim=-1)
    assert bool((err <= rotated_bound(design, x, q, bits)).all())
    assert q.tensors["scale"].shape == (2, 2, 9, 3)


def test_clipping_helps_at_low_bits_on_gaussian_data():
    x = torch.randn(1, 4, 512, 64, generator=torch.Generator().manual_seed(0))
    plain = (get_quantizer("quarot").fake_quantize(x, 2, "key") - x).pow(2).mean()
    clipped = (get_quantizer("quarot", clip_ratio=0.8).fake_quantize(x, 2, "key") - x).pow(2).mean()
    assert float(clipped) < float(plain)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(1, 2, 256, 64, generator=torch.Generator().manual_seed(1))
    x[..., 5] *= 30
    quarot = (get_quantizer("quarot").fake_quantize(x, 3, "key") - x).pow(2).mean()
    uniform = (get_quantizer("uniform").fake_quantize(x, 3, "key") - x).pow(2).mean()
    assert float(quarot) < 0.5 * float(uniform)


def test_metadata_accounting():
    design = get_quantizer("quarot", group_size=32)
    assert design.metadata_bits_per_token(64, 3, "key") == 2 * 2 * 16
    x = torch.randn(1, 2, 8, 64)
    for bits in range(1, 9):
        assert design.quantize(x, bits, "key").nbytes() == 2 * 8 * design.bits_per_token(64, bits, "key") / 8


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True, "1"])
def test_invalid_clip_ratio(bad):
    with pytest.raises(RateQuantError, match="clip_ratio"):
        get_quantizer("quarot", clip_ratio=bad)


def test_group_size_must_divide_head_dim():
    with pytest.raises(RateQuantError, match="not divisible by group_size 64"):
        get_quantizer("quarot", group_size=64).quantize(torch.zeros(1, 1, 1, 96), 4, "key")
