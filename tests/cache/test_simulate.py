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

from ratequant.cache import RateQuantCache, simulate
from ratequant.cache.simulate import fake_quantize_range, quantized_masks, query_runs, simulated_quantization
from ratequant.compat import cache_argument, model_geometry
from ratequant.errors import PlanError, RateQuantError
from ratequant.quantizers import available, get_quantizer
from ratequant.spec import KVQuantSpec, StoragePolicy
from tests.cache.helpers import ids_of, make_plan, poisoned, simulated
from tests.conftest import tiny_model

KIVI4 = get_quantizer("kivi", group_size=4)
UNIFORM = get_quantizer("uniform")


def mixed_bits(model, seed=0, low=1, high=5):
    return np.random.default_rng(seed).integers(low, high, size=model_geometry(model).shape)


def cache_for(bits, quantizer, residual, sinks=0) -> RateQuantCache:
    return RateQuantCache(KVQuantSpec(bits, quantizer, residual, sinks))


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
        out.append(model(piece, attention_mask=mask, use_cache=True, **cache_argument(model, cache), **kwargs).logits)
    return torch.cat(out, 1)


@torch.no_grad()
def simulated_logits(model, ids, bits, quantizer, residual, attention_mask=None, sinks=0, prefill_chunk=1):
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0))
    spec = KVQuantSpec(bits, quantizer, residual, sinks)
    with simulated_quantization(model, spec, prefill_chunk=prefill_chunk):
        return model(ids, **kwargs).logits


def test_quantized_masks_follow_the_policy():
    policy = StoragePolicy(KIVI4, 0)
    assert policy.chunks == (4, 1)
    qk, qv = quantized_masks(10, 10, policy, "cpu")
    t = torch.arange(10)[:, None]
    j = torch.arange(10)[None, :]
    assert torch.equal(qk, j < (t // 4) * 4) and torch.equal(qv, j < t)
    qk, _ = quantized_masks(1, 9, StoragePolicy(KIVI4, 4), "cpu")  # one new query at position 8 after 8 cached
    assert qk.tolist() == [[True] * 8 + [False]]


def test_quantized_masks_with_sinks_and_prefill_chunks():
    """S = 2 sinks: key j is quantized for the query at t iff 2 <= j < 2 + floor((t - 2) / F) * F (t >= 2)."""
    qk, qv = quantized_masks(12, 12, StoragePolicy(KIVI4, 0, 2), "cpu")
    want_k = [[2 <= j < (2 + (t - 2) // 4 * 4 if t >= 2 else 0) for j in range(12)] for t in range(12)]
    want_v = [[2 <= j < t for j in range(12)] for t in range(12)]
    assert qk.tolist() == want_k and qv.tolist() == want_v
    assert not qk[:, :2].any() and not qv[:, :2].any()  # sinks are never quantized
    # the last 3 queries of 14 positions, pieces of 8 after the sinks: [2, 10) is quantized for t >= 10
    qk, _ = quantized_masks(3, 14, StoragePolicy(KIVI4, 4, 2), "cpu", prefill_chunk=8)
    assert qk.tolist() == [[False] * 2 + [True] * 8 + [False] * 4] * 3
    qk, _ = quantized_masks(1, 10, StoragePolicy(KIVI4, 4, 2), "cpu", prefill_chunk=8)  # query at 9
    assert not qk.any()


def test_fake_quantize_range_keeps_the_sinks_and_the_residual():
    x = torch.randn(2, 3, 17, 16) * 3
    groups = [(2, (0, 2)), (3, (1,))]
    policy = StoragePolicy(KIVI4, 4, 3)  # sinks [0, 3), quantized [3, 15), residual [15, 17)
    out = fake_quantize_range(x, groups, "key", policy)
    assert torch.equal(out[:, :, :3], x[:, :, :3]) and torch.equal(out[:, :, 15:], x[:, :, 15:])
    for bits, heads in groups:
        part = x[:, list(heads), 3:15]
        assert torch.equal(out[:, list(heads), 3:15], KIVI4.fake_quantize(part, bits, "key"))
    assert fake_quantize_range(x[:, :, :6], groups, "key", policy) is not None
    assert torch.equal(fake_quantize_range(x[:, :, :6], groups, "key", policy), x[:, :, :6])  # nothing stored yet
    assert torch.equal(fake_quantize_range(x, groups, "key", policy, prefill_chunk=8)[:, :, 11:], x[:, :, 11:])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"])
def test_streaming_equals_simulated_across_families(family):
    model = tiny_model(family)
    bits = mixed_bits(model)
    ids = torch.randint(2, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    stream = streamed_logits(model, ids, cache_for(bits, KIVI4, 8))
    sim = simulated_logits(model, ids, bits, KIVI4, 8)
    with torch.no_grad():
        full = model(ids).logits
    assert (stream - sim).abs().max() < 1e-4
    assert (sim - full).abs().max() > 1e-2  # the quantization is really there
    torch.testing.assert_close(sim[:, :8], full[:, :8], rtol=0, atol=1e-5)  # the first chunk sees full precision


@pytest.mark.parametrize(("residual", "sinks", "chunk"), [(4, 2, 1), (0, 0, 1), (4, 3, 8), (0, 1, 3)])
def test_query_runs_cover_the_queries_with_the_masks_quantized_ranges(residual, sinks, chunk):
    for quantizer in (KIVI4, get_quantizer("quarot")):
        policy = StoragePolicy(quantizer, residual, sinks)
        q_len, kv_len = 13, 21
        qk, qv = quantized_masks(q_len, kv_len, policy, "cpu", prefill_chunk=chunk)
        runs = query_runs(policy, q_len, kv_len, chunk)
        assert runs[0][0] == 0 and runs[-1][1] == q_len and all(r[1] == n[0] for r, n in zip(runs, runs[1:]))
        k = torch.arange(kv_len)
        for a, b, key_end, value_end in runs:
            assert torch.equal(qk[a:b], ((k >= sinks) & (k < key_end)).expand(b - a, -1))
            assert torch.equal(qv[a:b], ((k >= sinks) & (k < value_end)).expand(b - a, -1))


def test_one_pass_over_both_copies_equals_the_runs(monkeypatch):
    """Past :data:`simulate.MAX_RUNS` runs of queries, attention runs once over both copies of the keys."""
    model = tiny_model("llama")
    bits = mixed_bits(model)
    ids = torch.randint(2, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    runs = simulated_logits(model, ids, bits, KIVI4, 8)
    monkeypatch.setattr(simulate, "MAX_RUNS", 0)
    both = simulated_logits(model, ids, bits, KIVI4, 8)
    assert (runs - both).abs().max() < 1e-5
    assert (both - streamed_logits(model, ids, cache_for(bits, KIVI4, 8))).abs().max() < 1e-4


def test_sliding_window_and_softcapping_models():
    """Mistral with a 5-token window (sdpa) and Gemma2 (eager, logit soft-capping, alternating windows)."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from tests.conftest import TINY

    torch.manual_seed(8)
    gemma2 = AutoModelForCausalLM.from_config(
        tf.Gemma2Config(**{**TINY, "head_dim": 16, "sliding_window": 5, "attn_implementation": "eager"})
    ).eval()
    for model in (tiny_model("mistral", seed=8, sliding_window=5), gemma2):
        bits = mixed_bits(model, seed=8)
        ids = torch.randint(2, 300, (2, 23), generator=torch.Generator().manual_seed(8))
        stream = streamed_logits(model, ids, cache_for(bits, KIVI4, 4))
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
    stream = streamed_logits(model, ids, cache_for(bits, quantizer, residual))
    sim = simulated_logits(model, ids, bits, quantizer, residual)
    assert (stream - sim).abs().max() < 1e-4


@pytest.mark.parametrize("design", available())
def test_every_registered_design_streams_as_simulated(design):
    quantizer = get_quantizer(design)
    residual = 0 if quantizer.token_group("key") > 8 else 8
    model = tiny_model("llama", seed=9)
    bits = mixed_bits(model, seed=9)
    ids = torch.randint(2, 300, (2, 37), generator=torch.Generator().manual_seed(9))
    stream = streamed_logits(model, ids, cache_for(bits, quantizer, residual))
    sim = simulated_logits(model, ids, bits, quantizer, residual)
    assert (stream - sim).abs().max() < 1e-4


def test_aligned_chunked_prefill_equals_simulated():
    """Feeding whole chunks at a time follows the same policy as one token at a time."""
    model = tiny_model("qwen3", seed=2)
    bits = mixed_bits(model, seed=2)
    ids = torch.randint(2, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    chunked = streamed_logits(model, ids, cache_for(bits, KIVI4, 8), step=8)
    sim = simulated_logits(model, ids, bits, KIVI4, 8)
    assert (chunked - sim).abs().max() < 1e-4


def test_left_padded_batch_matches_streaming():
    model = tiny_model("llama", seed=3)
    bits = mixed_bits(model, seed=3)
    ids = torch.randint(2, 300, (2, 26), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    stream = streamed_logits(model, ids, cache_for(bits, UNIFORM, 4), attention_mask=mask)
    sim = simulated_logits(model, ids, bits, UNIFORM, 4, attention_mask=mask)
    real = mask.bool()
    assert (stream - sim)[real].abs().max() < 1e-4


def test_eager_attention_float_masks():
    model = tiny_model("llama", seed=4, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    bits = mixed_bits(model, seed=4)
    ids = torch.randint(2, 300, (1, 30), generator=torch.Generator().manual_seed(4))
    stream = streamed_logits(model, ids, cache_for(bits, KIVI4, 8))
    sim = simulated_logits(model, ids, bits, KIVI4, 8)
    assert (stream - sim).abs().max() < 1e-4


def test_context_restores_the_model_even_on_error():
    model = tiny_model("gemma", seed=5)
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(KeyError), simulated_quantization(model, KVQuantSpec(mixed_bits(model), UNIFORM, 4)):
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
    wrong = KVQuantSpec(np.full((2, 3, 5), 4), UNIFORM)
    with pytest.raises(PlanError, match="kv-heads"), simulated_quantization(model, wrong):
        pass
    with pytest.raises(RateQuantError, match="multiple"):
        KVQuantSpec(mixed_bits(model), KIVI4, residual_length=6)
    with pytest.raises(RateQuantError, match="KVQuantSpec"), simulated_quantization(model, mixed_bits(model)):
        pass
    spec = KVQuantSpec(mixed_bits(model), KIVI4, 8)
    with pytest.raises(RateQuantError, match="prefill chunk"), simulated_quantization(model, spec, prefill_chunk=12):
        pass


def test_from_plan_equals_arrays():
    model = tiny_model("llama", seed=7)
    bits = mixed_bits(model, seed=7)
    plan = make_plan(model, bits, KIVI4)
    ids = torch.randint(2, 300, (1, 25), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), simulated_quantization(model, plan.resolve(model)):
        via_plan = model(ids).logits
    assert torch.equal(via_plan, simulated_logits(model, ids, bits, KIVI4, 8))
    with pytest.raises(PlanError, match="calibrated for quantizer"):
        plan.resolve(model, UNIFORM)


# ---------------------------------------------------------------------------------------------------------
# sink tokens, float64, and the evaluation conditions
# ---------------------------------------------------------------------------------------------------------

KIVI8 = get_quantizer("kivi", group_size=8)
# float64: the two paths agree to rounding. float32: their keys differ by float32 rounding (~3e-5 after one
# layer of qwen3), enough to flip a few 1-4 bit codes near a rounding boundary; the flips then compound over
# layers (measured up to 2.4e-3 on these windows), still far below the quantization's own effect (> 1e-1).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: head_dim 24 (three KIVI value groups of 8)
@pytest.mark.parametrize("residual,sinks", [(0, 3), (16, 3), (16, 1)])
def test_streaming_with_sinks_equals_simulated(dtype, family, residual, sinks):
    """Token by token through the cache = one simulated pass, over windows of several chunks after the sinks.

    residual 0: keys in chunks of 8 (KIVI's token group), values per token (the four-copy path)."""
    model = tiny_model(family, seed=10).to(dtype)
    bits = mixed_bits(model, seed=10)
    chunk = max(StoragePolicy(KIVI8, residual).chunks)
    n = sinks + 4 * chunk + 5 if residual else sinks + 6 * chunk + 3
    ids = torch.randint(2, 300, (2, n), generator=torch.Generator().manual_seed(10))
    cache = cache_for(bits, KIVI8, residual, sinks)
    stream = streamed_logits(model, ids, cache)
    sim = simulated_logits(model, ids, bits, KIVI8, residual, sinks=sinks)
    with torch.no_grad():
        full = model(ids).logits
        no_sinks = simulated_logits(model, ids, bits, KIVI8, residual)
    assert stream.dtype == dtype and cache.get_seq_length() == n
    assert (stream - sim).abs().max() < TOLERANCE[dtype]
    assert (sim - full).abs().max() > 1e-1  # the quantization is really there
    assert (sim - no_sinks).abs().max() > 1e-2  # and the sinks change what it touches
    untouched = sinks + min(StoragePolicy(KIVI8, residual).chunks)  # queries that see nothing quantized
    assert (sim[:, :untouched] - full[:, :untouched]).abs().max() < TOLERANCE[dtype]
    # the cache really holds the sinks at full precision and quantized chunks after them
    k, _ = cache.layers[1].read()
    chunks = StoragePolicy(KIVI8, residual).chunks
    assert cache.layers[1].stored_lengths() == tuple((n - sinks) // f * f for f in chunks)
    assert k.shape[2] == n


@pytest.fixture(scope="module")
def float64_llama():
    return tiny_model("llama", seed=11).double()


def _condition_spec(model, residual=16, sinks=3):
    return KVQuantSpec(mixed_bits(model, seed=11), KIVI8, residual, sinks)


@pytest.mark.parametrize("first", [1, 30])
def test_streaming_condition_equals_simulated_condition(float64_llama, first):
    """Prefill in pieces of the chunk after the sinks = the token-by-token simulation; pieces of two chunks =
    the simulation with prefill_chunk = 2 x chunk (and that differs from token by token)."""
    from ratequant.evaluation.conditions import FullPrecision, Simulated, Streaming

    model = float64_llama
    spec = _condition_spec(model)
    n = 3 + 16 * 4 + 7
    ids = torch.randint(2, 300, (1, n), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        streaming = Streaming(spec)
        stream = streaming.log_probs(model, ids, first)
        sim = Simulated(spec).log_probs(model, ids, first)
        full = FullPrecision().log_probs(model, ids, first)
        stream2 = Streaming(spec, prefill_chunk=32).log_probs(model, ids, first)
        sim2 = Simulated(spec, prefill_chunk=32).log_probs(model, ids, first)
        explicit = Streaming(spec, prefill_chunk=16).log_probs(model, ids, first)
    assert streaming.piece == 16
    assert stream.shape == sim.shape == full.shape == (n - first, 300) and stream.dtype == torch.float32
    assert (stream - sim).abs().max() < 1e-6  # float64 model, float32 log-probs
    assert torch.equal(explicit, stream)
    assert (stream2 - sim2).abs().max() < 1e-6
    assert (sim2 - sim).abs().max() > 1e-4  # pieces of two chunks see more at full precision
    assert (sim - full).abs().max() > 1e-2
    assert streaming.last_cache.get_seq_length() == n  # every token went through the cache
    # row i predicts token first + i: the log-probs line up with one full-precision pass
    with torch.no_grad():
        logits = model(ids).logits[0, first - 1 : n - 1].float()
    assert (full - torch.log_softmax(logits, -1)).abs().max() < 1e-5


def test_streaming_condition_with_different_key_and_value_chunks(float64_llama):
    """residual 0 with KIVI: keys in chunks of 8, values per token. Streaming's default piece is the smaller
    chunk (one token), which is token-by-token decoding; pieces of 8 see their own values at full precision,
    which is the simulation with prefill_chunk=8."""
    from ratequant.evaluation.conditions import Simulated, Streaming

    model = float64_llama
    spec = _condition_spec(model, residual=0, sinks=2)
    ids = torch.randint(2, 300, (1, 2 + 8 * 4 + 3), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        stream = Streaming(spec).log_probs(model, ids, 1)
        stream8 = Streaming(spec, prefill_chunk=8).log_probs(model, ids, 1)
        sim = Simulated(spec).log_probs(model, ids, 1)
        sim8 = Simulated(spec, prefill_chunk=8).log_probs(model, ids, 1)
    assert Streaming(spec).piece == 1
    assert (stream - sim).abs().max() < 1e-6  # pieces of one token = token by token
    assert (stream8 - sim8).abs().max() < 1e-6
    assert (sim8 - sim).abs().max() > 1e-2  # the two semantics differ here


# ---------------------------------------------------------------------------------------------------------
# the embedded default model
# ---------------------------------------------------------------------------------------------------------


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
    return math.exp(nll.item())


@pytest.mark.slow
def test_streaming_and_simulated_perplexity_agree_on_default_model(default_model):
    """Two 512-token windows, KIVI (G=32) with the 128-token residual, 4 and 2.5 average bits: the real cache,
    prefilled in pieces of its 128-token chunk, against the simulation of token-by-token decoding."""
    from ratequant.evaluation import Simulated, Streaming, WindowProtocol, make_windows, score_conditions
    from ratequant.inputs.corpora import load_corpus

    model, geometry = default_model.model, default_model.geometry
    windows = make_windows(default_model.tokenizer, load_corpus().evaluation, WindowProtocol(512, 2))
    quantizer = get_quantizer("kivi")
    parity = (np.arange(geometry.num_components) % 2).reshape(geometry.shape)
    plans = {4.0: 3 + 2 * parity, 2.5: 2 + parity}  # alternating 3/5 and 2/3 bits per component
    for avg, bits in plans.items():
        assert bits.mean() == avg
        spec = KVQuantSpec(bits, quantizer, 128)
        scores = score_conditions(model, windows, {"sim": Simulated(spec), "stream": Streaming(spec)}, progress=False)
        full, sim, stream = (scores["all"][k] for k in ("full-precision", "sim", "stream"))
        assert stream.ppl == pytest.approx(sim.ppl, rel=2e-3), avg  # float32 rounding of the keys per piece
        assert stream.kl == pytest.approx(sim.kl, rel=0.05), avg
        assert abs(stream.ppl - sim.ppl) < abs(sim.ppl - full.ppl) / 10, (avg, stream.ppl, sim.ppl, full.ppl)


# --------------------------------------------------------------------------------------------------------
# NaN or Inf in keys: the simulation raises in the forward pass whose quantized prefix holds them, and restores
# the model (the cache's refusal: tests/cache/test_layer.py)
# --------------------------------------------------------------------------------------------------------
def test_simulation_refuses_non_finite_keys_and_restores_the_model():
    model = tiny_model("llama")
    clean = tiny_model("llama")
    ids = ids_of(12)
    bits = np.full(model_geometry(model).shape, 4)
    poisoned(model)
    with pytest.raises(RateQuantError, match="NaN or Inf"), torch.no_grad():
        with simulated_quantization(model, KVQuantSpec(bits, UNIFORM, 4)):
            model(ids)
    with torch.no_grad():  # the model's own result (whatever its attention makes of the NaN): attention restored
        untouched = poisoned(tiny_model("llama"))(ids).logits
        torch.testing.assert_close(model(ids).logits, untouched, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(simulated(clean, ids[:, :3], bits, UNIFORM, 4), clean(ids[:, :3]).logits)
