"""Calibration capture: exact tensors and gradients, padding-invariant, and every patch undone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MambaConfig, Qwen3Config

from ratequant.compat import intercept_attention, original_attention
from ratequant.errors import RateQuantError, UnsupportedModelError
from ratequant.geometry import Geometry
from ratequant.measure.capture import CalibrationStats, Recorder, capture, next_token_loss_sum

VOCAB = 101


def _llama(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=96,
        vocab_size=VOCAB,
        **overrides,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _reference_gradients(model, ids):
    """d(summed next-token loss)/dK, dV through an independent path: additive zero perturbations."""
    L, B, T = model.config.num_hidden_layers, ids.shape[0], ids.shape[1]
    hkv = model.config.num_key_value_heads
    d = model.config.hidden_size // model.config.num_attention_heads
    delta = torch.zeros(2, L, B, hkv, T, d, requires_grad=True)
    kept = {}

    def fn(module, query, key, value, attention_mask, **kwargs):
        key = key + delta[0, module.layer_idx]
        value = value + delta[1, module.layer_idx]
        kept[module.layer_idx] = (key.detach(), value.detach(), query.detach())
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    with intercept_attention(model, fn):
        logits = model(ids, use_cache=False).logits
    next_token_loss_sum(logits, ids, torch.ones_like(ids, dtype=torch.bool)).backward()
    return delta.grad, kept


def test_capture_shapes_values_and_exact_gradients():
    model = _llama()
    ids = _ids(2, 11)
    stats = capture(model, ids)
    assert stats.geometry == Geometry(3, 2, 16, 4)
    assert stats.keys.shape == stats.values.shape == stats.key_grads.shape == (3, 2, 2, 11, 16)
    assert stats.queries.shape == (3, 2, 4, 11, 16)
    assert stats.keys.dtype == torch.float32 and not stats.keys.requires_grad
    assert stats.token_count == 22 and stats.loss_tokens == 20
    assert stats.scalings == (0.25,) * 3 and stats.sliding_windows == (None,) * 3
    assert set(stats.timings) == {"forward", "backward", "collect"}

    grads, kept = _reference_gradients(model, ids)
    for layer in range(3):
        key, value, query = kept[layer]
        assert torch.equal(stats.keys[layer], key)
        assert torch.equal(stats.values[layer], value)
        assert torch.equal(stats.queries[layer], query)
    scale = grads.abs().max()
    assert scale > 0
    torch.testing.assert_close(stats.key_grads, grads[0], atol=1e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(stats.value_grads, grads[1], atol=1e-6 * scale, rtol=1e-5)
    # loss_sum is the summed cross-entropy of the unpatched model
    with torch.no_grad():
        logits = model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    assert stats.loss_sum == pytest.approx(float(ce), rel=1e-5)


def test_model_state_is_restored_and_no_parameter_gradients():
    model = _llama()
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    capture(model, _ids(1, 8))
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert not model.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_contributes_nothing(side):
    model = _llama()
    a, b = _ids(1, 10, seed=2), _ids(1, 7, seed=3)
    alone_a, alone_b = capture(model, a), capture(model, b)
    pad = torch.zeros(1, 3, dtype=torch.long)
    row_b = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask_b = (torch.arange(10) >= 3) if side == "left" else (torch.arange(10) < 7)
    ids = torch.cat([a, row_b])
    mask = torch.stack([torch.ones(10, dtype=torch.bool), mask_b])
    stats = capture(model, ids, mask.long())
    assert stats.token_count == 17 and stats.loss_tokens == 9 + 6
    real = slice(3, 10) if side == "left" else slice(0, 7)
    padded = slice(0, 3) if side == "left" else slice(7, 10)
    for name in ("keys", "values", "queries", "key_grads", "value_grads"):
        full = getattr(stats, name)
        torch.testing.assert_close(full[:, :1], getattr(alone_a, name), atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(full[:, 1:, :, real], getattr(alone_b, name), atol=2e-6, rtol=1e-4)
        assert torch.count_nonzero(full[:, 1:, :, padded]) == 0
    assert stats.loss_sum == pytest.approx(alone_a.loss_sum + alone_b.loss_sum, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_capture_in_smaller_passes_equals_one_pass(batch_size):
    model = _llama()
    ids = _ids(3, 9, seed=4)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the middle sequence
    whole = capture(model, ids, mask)
    parts = capture(model, ids, mask, batch_size=batch_size)
    for name in ("keys", "values", "queries", "key_grads", "value_grads"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), atol=2e-6, rtol=1e-4)
    assert torch.equal(parts.attention_mask, whole.attention_mask)
    assert (parts.token_count, parts.loss_tokens) == (whole.token_count, whole.loss_tokens) == (25, 22)
    assert parts.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)
    assert parts.scalings == whole.scalings and set(parts.timings) == set(whole.timings)
    with pytest.raises(RateQuantError, match="batch_size must be a positive integer"):
        capture(model, ids, batch_size=0)


def test_concat_refuses_passes_that_do_not_belong_together():
    model = _llama()
    a, b = capture(model, _ids(1, 6)), capture(model, _ids(1, 7))
    with pytest.raises(RateQuantError, match="differ in model, token count"):
        CalibrationStats.concat([a, b])
    with pytest.raises(RateQuantError, match="differ in model, token count"):
        CalibrationStats.concat([a, capture(model, _ids(1, 6), gradients=False)])
    assert CalibrationStats.concat([a]) is a


def test_recorder_context_records_passes_and_cleans_up_on_error():
    model = _llama()
    ids = _ids(2, 6)
    with torch.no_grad(), Recorder(model, queries=False) as rec:
        model(ids[:1])
        model(ids[1:])
    assert rec.num_passes == 2
    stats = rec.stats()
    reference = capture(model, ids, gradients=False)
    assert stats.queries is None and reference.key_grads is None
    torch.testing.assert_close(stats.keys, reference.keys, atol=1e-6, rtol=1e-5)

    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"), Recorder(model, gradients=True):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("error inside the block")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == "sdpa"
    assert not model.get_input_embeddings()._forward_hooks
    with pytest.raises(RateQuantError, match="no forward pass"):
        Recorder(model).stats()


def test_recorder_gradients_match_capture():
    model = _llama()
    ids = _ids(2, 9)
    with Recorder(model, gradients=True) as rec:
        logits = model(ids, use_cache=False).logits
        loss = next_token_loss_sum(logits, ids, torch.ones_like(ids, dtype=torch.bool))
        stats = rec.stats(loss=loss)
    reference = capture(model, ids)
    torch.testing.assert_close(stats.key_grads, reference.key_grads, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(stats.value_grads, reference.value_grads, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "config,geometry",
    [
        (
            GPT2Config(n_embd=48, n_head=3, n_layer=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
            Geometry(2, 3, 16, 3),
        ),
        (
            Qwen3Config(
                hidden_size=64,
                num_attention_heads=6,
                num_key_value_heads=2,
                num_hidden_layers=2,
                intermediate_size=96,
                vocab_size=VOCAB,
                head_dim=8,
            ),
            Geometry(2, 2, 8, 6),
        ),
    ],
)
def test_other_families(config, geometry):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    stats = capture(model, _ids(2, 5))
    assert stats.geometry == geometry
    assert stats.keys.shape == (geometry.num_layers, 2, geometry.num_kv_heads, 5, geometry.head_dim)
    assert stats.queries.shape[2] == geometry.num_heads
    assert stats.key_grads.abs().sum() > 0 and stats.value_grads.abs().sum() > 0


def test_unsupported_model_and_bad_inputs():
    config = MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=VOCAB, state_size=4)
    mamba = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError):
        capture(mamba, _ids(1, 4))
    model = _llama()
    with pytest.raises(RateQuantError, match="integer tensor"):
        capture(model, torch.rand(2, 4))
    with pytest.raises(RateQuantError, match="shape"):
        capture(model, _ids(2, 4), torch.ones(2, 5))
    with pytest.raises(RateQuantError, match="no real tokens"):
        capture(model, _ids(1, 4), torch.zeros(1, 4))


def test_stats_validation():
    g = Geometry(2, 2, 4, 4)
    k = torch.zeros(2, 1, 2, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    CalibrationStats(keys=k, values=k, attention_mask=mask, geometry=g)
    with pytest.raises(RateQuantError, match="geometry"):
        CalibrationStats(keys=k, values=k, attention_mask=mask, geometry=Geometry(3, 2, 4))
    with pytest.raises(RateQuantError, match="values"):
        CalibrationStats(keys=k, values=k[:, :, :, :2], attention_mask=mask, geometry=g)
    with pytest.raises(RateQuantError, match="both"):
        CalibrationStats(keys=k, values=k, attention_mask=mask, geometry=g, key_grads=k)
    with pytest.raises(RateQuantError, match="queries"):
        CalibrationStats(keys=k, values=k, attention_mask=mask, geometry=g, queries=k)
    with pytest.raises(RateQuantError, match="bool"):
        CalibrationStats(keys=k, values=k, attention_mask=mask.long(), geometry=g)


def test_sliding_window_and_scaling_are_recorded_per_layer():
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=48,
        vocab_size=VOCAB,
        sliding_window=3,
    )
    stats = capture(AutoModelForCausalLM.from_config(config).eval(), _ids(1, 6))
    assert stats.sliding_windows == (3, 3)
    assert stats.scalings == (16**-0.5, 16**-0.5)
