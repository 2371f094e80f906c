"""Simulated quantization reproduces token-by-token decoding through RateQuantCache.

The two paths share only the policy helpers; the cache stores packed codes and decodes one token per
forward, the simulation fake-quantizes whole sequences and mixes quantized and full-precision copies by
mask. Their logits must agree to float tolerance while both differ clearly from full precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from ratequant.cache import RateQuantCache
from ratequant.compat import model_geometry
from ratequant.errors import PlanError, RateQuantError
from ratequant.quantizers import available, get_quantizer
from ratequant.simulate import quantized_masks, simulated_quantization, simulated_quantization_from_plan

KIVI4 = get_quantizer("kivi", group_size=4)
UNIFORM = get_quantizer("uniform")


def mixed_bits(model, seed=0, low=1, high=5):
    return np.random.default_rng(seed).integers(low, high, size=model_geometry(model).shape)


@torch.no_grad()
def streamed_logits(model, ids, cache, attention_mask=None, step=1):
    """Feed ``ids`` through ``cache`` ``step`` tokens at a time; logits ``[B, T, V]``."""
    out = []
    for i in range(0, ids.shape[1], step):
        mask = None if attention_mask is None else attention_mask[:, : i + step]
        kwargs = {}
        if attention_mask is not None:  # positions as generate() derives them from the padding mask
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = pos[:, i : i + step]
        piece = ids[:, i : i + step]
        out.append(model(piece, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs).logits)
    return torch.cat(out, 1)


@torch.no_grad()
def simulated_logits(model, ids, bits, quantizer, residual, attention_mask=None):
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0))
    with simulated_quantization(model, bits, quantizer, residual):
        return model(ids, **kwargs).logits


def test_quantized_masks_follow_the_policy():
    qk, qv = quantized_masks(10, 10, (4, 1), "cpu")
    t = torch.arange(10)[:, None]
    j = torch.arange(10)[None, :]
    assert torch.equal(qk, j < (t // 4) * 4) and torch.equal(qv, j < t)
    qk, _ = quantized_masks(1, 9, (4, 4), "cpu")  # one new query at position 8 after 8 cached tokens
    assert qk.tolist() == [[True] * 8 + [False]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"])
def test_streaming_equals_simulated_across_families(family):
    model = tiny_model(family)
    bits = mixed_bits(model)
    ids = torch.randint(2, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    stream = streamed_logits(model, ids, RateQuantCache(bits, KIVI4, 8))
    sim = simulated_logits(model, ids, bits, KIVI4, 8)
    with torch.no_grad():
        full = model(ids).logits
    assert (stream - sim).abs().max() < 1e-4
    assert (sim - full).abs().max() > 1e-2  # the quantization is really there
    assert torch.equal(sim[:, :8], full[:, :8])  # the first chunk's queries see only full precision


def test_sliding_window_and_softcapping_models():
    """Mistral with a 5-token window (sdpa) and Gemma2 (eager, logit soft-capping, alternating windows)."""
    import transformers as tf
    from conftest import TINY
    from transformers import AutoModelForCausalLM

    torch.manual_seed(8)
    gemma2 = AutoModelForCausalLM.from_config(
        tf.Gemma2Config(**{**TINY, "head_dim": 16, "sliding_window": 5, "attn_implementation": "eager"})
    ).eval()
    for model in (tiny_model("mistral", seed=8, sliding_window=5), gemma2):
        bits = mixed_bits(model, seed=8)
        ids = torch.randint(2, 300, (2, 23), generator=torch.Generator().manual_seed(8))
        stream = streamed_logits(model, ids, RateQuantCache(bits, KIVI4, 4))
        sim = simulated_logits(model, ids, bits, KIVI4, 4)
        assert (stream - sim).abs().max() < 1e-4


@pytest.mark.parametrize(
    "quantizer,residual", [(KIVI4, 0), (UNIFORM, 0), (UNIFORM, 5), (get_quantizer("kivi", group_size=8), 16)]
)
def test_streaming_equals_simulated_across_residual_policies(quantizer, residual):
    """residual 0 with KIVI gives keys and values different chunk sizes (the four-copy path)."""
    model = tiny_model("llama", seed=1)
    bits = mixed_bits(model, seed=1)
    ids = torch.randint(2, 300, (1, 41), generator=torch.Generator().manual_seed(1))
    stream = streamed_logits(model, ids, RateQuantCache(bits, quantizer, residual))
    sim = simulated_logits(model, ids, bits, quantizer, residual)
    assert (stream - sim).abs().max() < 1e-4


@pytest.mark.parametrize("design", available())
def test_every_registered_design_streams_as_simulated(design):
    quantizer = get_quantizer(design)
    residual = 0 if quantizer.token_group("key") > 8 else 8
    model = tiny_model("llama", seed=9)
    bits = mixed_bits(model, seed=9)
    ids = torch.randint(2, 300, (2, 37), generator=torch.Generator().manual_seed(9))
    stream = streamed_logits(model, ids, RateQuantCache(bits, quantizer, residual))
    sim = simulated_logits(model, ids, bits, quantizer, residual)
    assert (stream - sim).abs().max() < 1e-4


def test_aligned_chunked_prefill_equals_simulated():
    """Feeding whole chunks at a time follows the same policy as one token at a time."""
    model = tiny_model("qwen3", seed=2)
    bits = mixed_bits(model, seed=2)
    ids = torch.randint(2, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    chunked = streamed_logits(model, ids, RateQuantCache(bits, KIVI4, 8), step=8)
    sim = simulated_logits(model, ids, bits, KIVI4, 8)
    assert (chunked - sim).abs().max() < 1e-4


def test_left_padded_batch_matches_streaming():
    model = tiny_model("llama", seed=3)
    bits = mixed_bits(model, seed=3)
    ids = torch.randint(2, 300, (2, 26), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    stream = streamed_logits(model, ids, RateQuantCache(bits, UNIFORM, 4), attention_mask=mask)
    sim = simulated_logits(model, ids, bits, UNIFORM, 4, attention_mask=mask)
    real = mask.bool()
    assert (stream - sim)[real].abs().max() < 1e-4


def test_eager_attention_float_masks():
    model = tiny_model("llama", seed=4, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    bits = mixed_bits(model, seed=4)
    ids = torch.randint(2, 300, (1, 30), generator=torch.Generator().manual_seed(4))
    stream = streamed_logits(model, ids, RateQuantCache(bits, KIVI4, 8))
    sim = simulated_logits(model, ids, bits, KIVI4, 8)
    assert (stream - sim).abs().max() < 1e-4


def test_context_restores_the_model_even_on_error():
    model = tiny_model("gemma", seed=5)
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(KeyError):
            with simulated_quantization(model, mixed_bits(model), UNIFORM, 4):
                raise KeyError("boom")
        assert torch.equal(model(ids).logits, before)


def test_all_eight_bits_is_close_to_full_precision():
    model = tiny_model("gpt2", seed=6)
    ids = torch.randint(2, 300, (1, 40), generator=torch.Generator().manual_seed(6))
    eight = np.full(model_geometry(model).shape, 8)
    two = np.full(model_geometry(model).shape, 2)
    with torch.no_grad():
        full = model(ids).logits
    err8 = (simulated_logits(model, ids, eight, UNIFORM, 0) - full).abs().max()
    err2 = (simulated_logits(model, ids, two, UNIFORM, 0) - full).abs().max()
    assert err8 < err2 / 20


def test_bad_inputs_are_refused():
    model = tiny_model("llama")
    with pytest.raises(PlanError, match="kv-heads"):
        with simulated_quantization(model, np.full((2, 3, 5), 4), UNIFORM):
            pass
    with pytest.raises(RateQuantError, match="multiple"):
        with simulated_quantization(model, mixed_bits(model), KIVI4, residual_length=6):
            pass


def test_from_plan_equals_arrays():
    from ratequant.plan import Plan

    model = tiny_model("llama", seed=7)
    bits = mixed_bits(model, seed=7)
    g = model_geometry(model)
    plan = Plan(
        model={"name": "tiny", **g.to_dict()},
        quantizer=KIVI4.to_config(),
        budget={"kind": "avg_bits", "value": float(bits.mean())},
        allocator="test",
        avg_bits=float(bits.mean()),
        bits={"key": bits[0].tolist(), "value": bits[1].tolist()},
        residual_length=8,
    )
    ids = torch.randint(2, 300, (1, 25), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), simulated_quantization_from_plan(model, plan):
        via_plan = model(ids).logits
    assert torch.equal(via_plan, simulated_logits(model, ids, bits, KIVI4, 8))
    with pytest.raises(PlanError, match="calibrated for quantizer"):
        with simulated_quantization_from_plan(model, plan, UNIFORM):
            pass


# ---------------------------------------------------------------------------------------------------------
# the embedded default model
# ---------------------------------------------------------------------------------------------------------


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
    return math.exp(nll.item())


@pytest.mark.slow
def test_streaming_and_simulated_perplexity_agree_on_default_model(default_model):
    """Two 256-token windows, KIVI (G=32) with the 128-token residual, 4 and 2.5 average bits."""
    from ratequant.data import load_corpus, token_windows

    model, geometry = default_model.model, default_model.geometry
    ids = token_windows(default_model.tokenizer, load_corpus().evaluation, 256, max_windows=2)
    quantizer = get_quantizer("kivi")
    parity = (np.arange(geometry.num_components) % 2).reshape(geometry.shape)
    plans = {4.0: 3 + 2 * parity, 2.5: 2 + parity}  # alternating 3/5 and 2/3 bits per component
    with torch.no_grad():
        full = _ppl(model(ids).logits, ids)
    for avg, bits in plans.items():
        assert bits.mean() == avg
        sim = _ppl(simulated_logits(model, ids, bits, quantizer, 128), ids)
        stream = _ppl(streamed_logits(model, ids, RateQuantCache(bits, quantizer, 128)), ids)
        assert abs(stream - sim) <= 0.01 * sim, (avg, stream, sim)
        assert abs(stream - sim) < abs(sim - full) / 10, (avg, stream, sim, full)
