"""Chunked prefill: the pieces, their equality with one pass (full precision) and with the simulation (quantized),
and ``generate`` on top of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ratequant.cache import RateQuantCache, restore_attention
from ratequant.cache.generation import generate
from ratequant.cache.prefill import piece_bounds, prefill
from ratequant.cache.simulate import simulated_quantization
from ratequant.compat import cache_argument, model_geometry
from ratequant.errors import RateQuantError
from ratequant.inputs.models import LoadedModel
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec
from tests.conftest import tiny_model, tiny_tokenizer


def ids(tokens=40, seed=0):
    return torch.randint(2, 300, (1, tokens), generator=torch.Generator().manual_seed(seed))


def spec_for(model, sinks=0, residual=8):
    bits = np.random.default_rng(1).integers(2, 5, size=model_geometry(model).shape)
    return KVQuantSpec(bits, get_quantizer("kivi", group_size=4), residual_length=residual, sink_tokens=sinks)


def test_piece_bounds():
    assert piece_bounds(10, 4) == [0, 4, 8, 10]
    assert piece_bounds(10, 4, sink_tokens=2) == [0, 6, 10]
    assert piece_bounds(3, 8, sink_tokens=1) == [0, 3]
    assert piece_bounds(0, 8) == [0]
    with pytest.raises(RateQuantError, match="prefill chunk"):
        piece_bounds(10, 0)


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 5}), ("gpt2", {})])
def test_chunked_prefill_of_a_full_precision_cache_equals_one_pass(family, overrides):
    from transformers import DynamicCache

    model, x = tiny_model(family, seed=4, **overrides), ids()
    one = prefill(model, x, DynamicCache(config=model.config), None)
    for chunk in (1, 7, 16):
        cache = DynamicCache(config=model.config)
        torch.testing.assert_close(prefill(model, x, cache, chunk), one, rtol=0, atol=1e-5)
        assert cache.get_seq_length() == x.shape[1]


@pytest.mark.parametrize("sinks", [0, 2])
def test_chunked_prefill_through_the_packed_cache_equals_the_simulation(sinks):
    model, x = tiny_model("qwen3", seed=5), ids(45)
    spec = spec_for(model, sinks)
    got = prefill(model, x, RateQuantCache(spec, model=model), 8)
    with torch.no_grad(), simulated_quantization(model, spec, prefill_chunk=8):
        want = model(x).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - model(x).logits[:, -1]).abs().max() > 1e-3


def loaded(family="llama"):
    model = tiny_model(family, seed=6)
    return LoadedModel(model, tiny_tokenizer(), "tiny", "memory", model_geometry(model))


def test_generate_with_chunked_prefill():
    lm = loaded()
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    one = generate(lm, prompt, max_new_tokens=6, prefill_chunk=None)
    chunked = generate(lm, prompt, max_new_tokens=6, prefill_chunk=8)
    assert chunked.text == one.text and chunked.new_tokens == 6
    assert chunked.prefill_chunk == 8 and one.prefill_chunk is None
    spec = spec_for(lm.model, sinks=1)
    quantized = generate(lm, prompt, spec, max_new_tokens=6, prefill_chunk=8)
    assert quantized.cache_bytes["codes"] > 0 and quantized.cache_bytes["sink"] > 0
    assert quantized.to_dict()["prefill_chunk"] == 8
    with pytest.raises(RateQuantError, match="prefill chunk"):
        generate(lm, prompt, max_new_tokens=2, prefill_chunk=0)


def test_prefill_refuses_chunks_the_cache_policy_does_not_follow_and_empty_input():
    model = tiny_model("llama", seed=7)
    cache = RateQuantCache(spec_for(model, residual=8), model=model)
    with pytest.raises(RateQuantError, match="must divide or be a multiple of the quantization chunk"):
        prefill(model, ids(20), cache, 6)
    with pytest.raises(RateQuantError, match="no tokens"):
        prefill(model, ids(20)[:, :0], cache, 8)


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 5}), ("qwen3", {})])
def test_prefill_pieces_hand_grouped_keys_to_sdpa_without_repeating_them(family, overrides, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model, x = tiny_model(family, seed=7, **overrides), ids(37)
    want = model(x).logits[:, -1]  # the model's own attention, keys repeated per query head
    repeats = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda h, n: repeats.append(n) or real(h, n))
    for cache in (None, RateQuantCache(spec_for(model), model=model)):
        from transformers import DynamicCache

        got = prefill(model, x, DynamicCache(config=model.config) if cache is None else cache, 8)
        if cache is None:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert repeats == []
    cache = DynamicCache(config=model.config)  # outside prefill, a piece over a history: repeated as before
    for piece in (x[:, :9], x[:, 9:12]):
        model(piece, **cache_argument(model, cache), use_cache=True)
    assert repeats


@pytest.mark.parametrize("sinks", [0, 3])
def test_prefill_allocates_each_packed_store_once_and_leaves_no_slack(sinks, monkeypatch):
    """Growing a store copies it; a prompt in pieces reserves its stores up front instead (RateQuantCache.reserve),
    and after the prompt the allocated bytes are the stored data, as without the reservation."""
    from ratequant.cache.storage import GroupStore

    model, x = tiny_model("llama", seed=7), ids(61)
    spec = spec_for(model, sinks)
    grown = []
    real = GroupStore._reallocate
    monkeypatch.setattr(GroupStore, "_reallocate", lambda g, *a: (grown.append(id(g)), real(g, *a))[1])
    cache = RateQuantCache(spec, model=model)
    prefill(model, x, cache, 8)
    groups = [g for layer in cache.layers for store in layer._stores for g in store.groups]
    assert sorted(grown) == sorted(id(g) for g in groups)  # each group grew exactly once
    assert all(g.capacity() == g.num_chunks == (61 - sinks) // 8 for g in groups)
    monkeypatch.setattr(GroupStore, "_reallocate", real)
    grown_chunk_by_chunk = RateQuantCache(spec, model=model)
    with torch.no_grad():
        for lo in range(0, 61, 8):
            model(x[:, lo : lo + 8], **cache_argument(model, grown_chunk_by_chunk), use_cache=True)
    assert cache.nbytes() == grown_chunk_by_chunk.nbytes()


def test_generates_own_chunked_prefill_through_a_cache_made_for_the_model_equals_prefill():
    """``model.generate(..., prefill_chunk_size=P)`` with no context manager: its pieces (from token 0) through a
    cache made for the model give what :func:`prefill` gives with the same pieces (no sinks), bit for bit, and
    the same stored bytes."""
    model, x = tiny_model("llama", seed=9), ids(43)
    spec = spec_for(model, sinks=0)
    reference = RateQuantCache(spec, model=model)
    want = prefill(model, x, reference, 8)
    cache = RateQuantCache(spec, model=model)
    out = model.generate(
        x,
        **cache_argument(model, cache),
        prefill_chunk_size=8,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    torch.testing.assert_close(out.logits[0], want, rtol=0, atol=0)
    assert cache.get_seq_length() == 43 and cache.nbytes().codes == reference.nbytes().codes > 0
    restore_attention(model)
