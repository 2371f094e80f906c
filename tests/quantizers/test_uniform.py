"""``uniform``: half-a-step bound for every width, metadata precision edge cases, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from ratequant.errors import RateQuantError
from ratequant.kernels.packing import unpack
from ratequant.quantizers import get_quantizer

from ._helpers import arithmetic_slack, assert_stored_exactly, kv_tensors


def check_half_step(design, x, bits, kind="key"):
    """Elementwise ``|x - x_hat| <= stored_step / 2`` (+ float32 slack); returns the QuantizedTensor."""
    q = design.quantize(x, bits, kind)
    x_hat = design.dequantize(q)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    d = x.shape[-1]
    g = d // q.tensors["scale"].shape[-1]
    step = q.tensors["scale"].float().repeat_interleave(g, dim=-1)
    zero = q.tensors["zero"].float().repeat_interleave(g, dim=-1)
    err = (x - x_hat).abs()
    bound = step / 2 + arithmetic_slack(x, zero, zero + step * ((1 << bits) - 1))
    assert bool((err <= bound).all()), float((err - bound).max())
    codes = unpack(q.tensors["codes"], bits, d)
    assert int(codes.max()) < (1 << bits)
    return q


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=25, deadline=None)
@given(x=kv_tensors())
def test_half_step_bound_every_width(bits, x):
    design = get_quantizer("uniform")
    q = check_half_step(design, x, bits)
    assert_stored_exactly(q)
    assert torch.equal(design.fake_quantize(x, bits, "key"), design.dequantize(q))


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=10, deadline=None)
@given(x=kv_tensors(head_dims=(8, 16, 24)))
def test_grouped_bound_every_width(bits, x):
    design = get_quantizer("uniform", group_size=8)
    q = check_half_step(design, x, bits)
    assert q.tensors["scale"].shape == (*x.shape[:3], x.shape[-1] // 8)


def test_step_is_range_over_levels_within_float16_rounding():
    x = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0))
    q = get_quantizer("uniform").quantize(x, 4, "value")
    ideal = (x.amax(-1) - x.amin(-1)) / 15
    stored = q.tensors["scale"].float().squeeze(-1)
    assert bool((stored >= ideal * (1 - 1e-6)).all())
    # rounding the zero down costs at most one float16 ulp of the range; the step at most one more ulp
    assert bool((stored <= ideal * (1 + 2**-9) + 2**-14).all())


def test_constant_groups_and_zeros():
    design = get_quantizer("uniform")
    for bits in range(1, 9):
        zeros = torch.zeros(1, 2, 3, 8)
        assert torch.equal(design.fake_quantize(zeros, bits, "key"), zeros)
        exact = torch.full((1, 1, 4, 8), -3.25)  # representable in float16: reconstructed exactly
        assert torch.equal(design.fake_quantize(exact, bits, "key"), exact)
        inexact = torch.full((1, 1, 4, 8), 0.1)  # not representable: within a step below 1 fp16 ulp
        err = (design.fake_quantize(inexact, bits, "key") - inexact).abs().max()
        assert float(err) <= 2**-14 * 0.1


def test_large_magnitudes_switch_metadata_to_float32():
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(1)) * 1e6
    design = get_quantizer("uniform")
    q = check_half_step(design, x, 4)
    assert q.tensors["scale"].dtype == torch.float32 and q.tensors["zero"].dtype == torch.float32
    assert q.nbytes() == 1 * 2 * 5 * (16 * 4 // 8 + 2 * 4)  # honest: float32 metadata counted
    small = get_quantizer("uniform").quantize(x * 1e-6, 4, "key")
    assert small.tensors["scale"].dtype == torch.float16


def test_tiny_magnitudes_stay_within_the_absolute_bound():
    for scale in (1e-6, 1e-12, 1e-30):
        x = torch.randn(1, 1, 6, 8, generator=torch.Generator().manual_seed(2)) * scale
        for bits in (2, 8):
            q = check_half_step(get_quantizer("uniform"), x, bits)
            # float16 steps bottom out at 2**-24: the error is at most half of that
            assert float((get_quantizer("uniform").dequantize(q) - x).abs().max()) <= max(
                2**-25, float(q.tensors["scale"].float().max()) / 2
            )


def test_float16_input_keeps_its_dtype():
    x = torch.randn(1, 2, 7, 32, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    design = get_quantizer("uniform")
    q = design.quantize(x, 3, "value")
    x_hat = design.dequantize(q)
    assert x_hat.dtype == torch.float16
    step = q.tensors["scale"].float()
    err = (x.float() - x_hat.float()).abs()
    assert bool((err <= step / 2 + x_hat.float().abs() * 2**-11 + 1e-6).all())


def test_metadata_accounting():
    design = get_quantizer("uniform")
    assert design.metadata_bits_per_token(64, 4, "key") == 32
    assert design.bits_per_element(64, 4, "key") == 4.5
    grouped = get_quantizer("uniform", group_size=16, scale_dtype="float32")
    assert grouped.metadata_bits_per_token(64, 2, "value") == 2 * 4 * 32
    x = torch.randn(2, 3, 10, 64)
    for bits in range(1, 9):
        assert grouped.quantize(x, bits, "key").nbytes() == 2 * 3 * 10 * grouped.bits_per_token(64, bits, "key") / 8


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "64"])
def test_invalid_group_size(bad):
    with pytest.raises(RateQuantError, match="group_size"):
        get_quantizer("uniform", group_size=bad)


def test_group_size_must_divide_head_dim():
    design = get_quantizer("uniform", group_size=24)
    with pytest.raises(RateQuantError, match="not divisible by group_size 24"):
        design.quantize(torch.zeros(1, 1, 2, 64), 4, "key")
    with pytest.raises(RateQuantError, match="not divisible"):
        design.metadata_bits_per_token(64, 4, "key")
