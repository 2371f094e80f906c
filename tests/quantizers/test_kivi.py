"""``kivi``: per-channel keys over token groups, per-token values; half-a-step bound for every width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from ratequant.errors import RateQuantError
from ratequant.quantizers import get_quantizer
from tests.cache.helpers import KIVI4

from ._helpers import arithmetic_slack, assert_stored_exactly, kv_tensors


def expanded_meta(q, name, group_size):
    """Per-element stored metadata ``[B, H, T, D]`` of a KIVI block."""
    meta = q.tensors[name].float()
    t, d = q.shape[2], q.shape[3]
    if q.kind == "key":
        return meta.repeat_interleave(group_size, dim=2)[:, :, :t]
    return meta.repeat_interleave(d // meta.shape[-1], dim=-1)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["key", "value"])
@settings(max_examples=15, deadline=None)
@given(x=kv_tensors(head_dims=(1, 4, 8, 16), max_tokens=11))
def test_half_step_bound_every_width(bits, kind, x):
    design = get_quantizer("kivi", group_size=4)
    q = design.quantize(x, bits, kind)
    x_hat = design.dequantize(q)
    step, zero = expanded_meta(q, "scale", 4), expanded_meta(q, "zero", 4)
    bound = step / 2 + arithmetic_slack(x, zero, zero + step * ((1 << bits) - 1))
    assert bool(((x - x_hat).abs() <= bound).all())
    assert_stored_exactly(q)
    assert torch.equal(design.fake_quantize(x, bits, kind), x_hat)


def test_layout_of_metadata():
    x = torch.randn(2, 3, 70, 64)
    design = get_quantizer("kivi")  # group_size 32
    key = design.quantize(x, 2, "key")
    assert key.tensors["scale"].shape == (2, 3, 3, 64)  # ceil(70 / 32) token groups per channel
    value = design.quantize(x, 2, "value")
    assert value.tensors["scale"].shape == (2, 3, 70, 2)  # groups of 32 along head_dim
    assert design.token_group("key") == 32 and design.token_group("value") == 1


def test_partial_last_key_group_is_quantized_on_its_own():
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(0))
    design = get_quantizer("kivi", group_size=32)
    whole = design.fake_quantize(x, 3, "key")
    assert torch.equal(whole[:, :, :32], design.fake_quantize(x[:, :, :32], 3, "key"))
    assert torch.equal(whole[:, :, 32:], design.fake_quantize(x[:, :, 32:].contiguous(), 3, "key"))


def test_key_outlier_channel_does_not_hurt_other_channels():
    x = torch.randn(1, 1, 64, 16, generator=torch.Generator().manual_seed(1))
    x[..., 3] *= 50
    kivi = get_quantizer("kivi").fake_quantize(x, 3, "key")
    uniform = get_quantizer("uniform").fake_quantize(x, 3, "key")
    others = [c for c in range(16) if c != 3]
    kivi_err = (kivi - x)[..., others].pow(2).mean()
    uniform_err = (uniform - x)[..., others].pow(2).mean()
    assert float(kivi_err) < 0.05 * float(uniform_err)


def test_value_group_is_capped_at_head_dim():
    design = get_quantizer("kivi", group_size=32)
    assert design.metadata_bits_per_token(16, 4, "value") == 2 * 16  # one group of 16
    q = design.quantize(torch.randn(1, 1, 5, 16), 4, "value")
    assert q.tensors["scale"].shape == (1, 1, 5, 1)


def test_metadata_accounting_matches_storage():
    design = get_quantizer("kivi", group_size=32)
    assert design.metadata_bits_per_token(64, 2, "key") == 2 * 64 * 16 / 32
    assert design.metadata_bits_per_token(64, 2, "value") == 2 * 2 * 16
    x = torch.randn(1, 3, 96, 64)
    for bits in range(1, 9):
        for kind in ("key", "value"):
            expected = 3 * 96 * design.bits_per_token(64, bits, kind) / 8
            assert design.quantize(x, bits, kind).nbytes() == expected


def test_invalid_parameters():
    for bad in (0, -1, None, 1.5, True):
        with pytest.raises(RateQuantError, match="group_size"):
            get_quantizer("kivi", group_size=bad)
    with pytest.raises(RateQuantError, match="head_dim 48 is not divisible by group_size 32"):
        get_quantizer("kivi").quantize(torch.zeros(1, 1, 2, 48), 2, "value")
    # keys are grouped over tokens: any head_dim works
    assert get_quantizer("kivi").quantize(torch.zeros(1, 1, 2, 48), 2, "key").shape == (1, 1, 2, 48)


# All-equal groups: no division by zero, exact where the constants are float16 (every design:
# tests/quantizers/test_conformance.py)
def test_constant_key_channels_are_exact_with_kivi():
    """KIVI keys: each channel constant over its token group (values differ across channels): range 0."""
    channel = torch.linspace(-4, 4, 16).half().float()  # float16-representable
    x = channel.expand(1, 3, 12, 16).clone()
    for bits in range(1, 9):
        assert torch.equal(KIVI4.fake_quantize(x, bits, "key"), x)


# Fast path: ``dequantize_into`` of a partial last key group falls back to the exact decode.
def test_kivi_partial_token_group_falls_back_exactly():
    quantizer = get_quantizer("kivi", group_size=4)
    x = torch.randn(2, 3, 6, 16)  # 6 tokens: one full and one partial key group
    q = quantizer.quantize(x, 3, "key")
    out = torch.empty(2, 3, 6, 16)
    quantizer.dequantize_into(q, out)
    assert torch.equal(out, quantizer.dequantize(q))
