"""The cache (:mod:`ratequant.cache.layer`: RateQuantLayer, RateQuantCache) at the edges: NaN and Inf, all-zero
groups, head_dims that are not powers of two, every dtype, left padding, sequences shorter than one group or longer
than the residual window, sliding-window layers, caches that do not fit the model, and the optional working buffer of
dequantized chunks. Round trips, the residual policy, byte accounting and generate() modes: tests/cache/test_cache.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from ratequant.cache import RateQuantCache, RateQuantLayer
from ratequant.cache.simulate import simulated_quantization
from ratequant.compat import model_geometry
from ratequant.errors import PlanError, RateQuantError
from ratequant.quantizers import available, get_quantizer
from ratequant.spec import CacheBytes, KVQuantSpec, StoragePolicy
from tests.conftest import TINY, tiny_model

KIVI4 = get_quantizer("kivi", group_size=4)
UNIFORM = get_quantizer("uniform")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DESIGNS = {
    "uniform": get_quantizer("uniform", group_size=8),
    "kivi": get_quantizer("kivi", group_size=4),
    "quarot": get_quantizer("quarot"),
    "turbo": get_quantizer("turbo"),
}


def mixed_bits(model, low=1, high=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=model_geometry(model).shape)


def ids_of(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def streamed(model, ids, cache) -> torch.Tensor:
    """Logits ``[B, T, V]`` of feeding ``ids`` one token at a time through ``cache``."""
    return torch.cat(
        [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(ids.shape[1])], 1
    )


@torch.no_grad()
def simulated(model, ids, bits, quantizer, residual) -> torch.Tensor:
    with simulated_quantization(model, KVQuantSpec(bits, quantizer, residual)):
        return model(ids).logits


def generate(model, ids, cache, n=10, **kw):
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


# --------------------------------------------------------------------------------------------------------
# NaN and Inf: never quantized into finite numbers. The quantizers refuse them
# (tests/quantizers/test_conformance.py::test_errors_are_clear); the cache raises in the update that delivers
# them and stays unchanged; the simulation raises in the forward pass whose quantized prefix holds them, and
# restores the model (tests/cache/test_simulate.py).
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_cache_refuses_non_finite_values_in_the_update_that_delivers_them(special, kind):
    layer = RateQuantLayer([3, 3], [2, 2], StoragePolicy(KIVI4, 8))
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    (k if kind == "key" else v)[0, 1, 2, 7] = special
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(k, v)  # refused at once, although these tokens would only wait in the residual window
    assert layer.get_seq_length() == 0  # the refused tokens are not counted


def test_cache_refuses_non_finite_values_at_once_and_stays_usable():
    layer = RateQuantLayer([2, 3], [2, 3], StoragePolicy(UNIFORM, 4))
    layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    before = layer.read()
    bad = torch.randn(1, 2, 1, 16)
    bad[0, 1, 0, 0] = float("inf")
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(torch.randn(1, 2, 1, 16), bad)  # would complete the chunk of value head 1 only
    assert layer.get_seq_length() == 3
    after = layer.read()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(bad, torch.randn(1, 2, 1, 16))  # inside the residual window too
    assert layer.get_seq_length() == 3


def poisoned(model, layer: int = 1):
    """``model`` whose layer ``layer`` computes NaN keys for kv-head 0 (a NaN weight row)."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.k_proj.weight[0, 0] = float("nan")
    return model


def test_cache_generation_with_non_finite_keys_is_refused():
    model = poisoned(tiny_model("llama"))
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        generate(model, ids_of(6), RateQuantCache(KVQuantSpec(np.full(model_geometry(model).shape, 4), UNIFORM, 4)))


# --------------------------------------------------------------------------------------------------------
# all-equal groups: no division by zero, finite output (every design: tests/quantizers/test_conformance.py)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(available()))
def test_cache_of_all_zero_keys_and_values_is_exact(name):
    design = get_quantizer(name)
    layer = RateQuantLayer([1, 8], [2, 3], StoragePolicy(design, 0))
    zeros = torch.zeros(2, 2, 64, 32)
    k, v = layer.update(zeros, zeros)
    assert layer.stored_lengths()[0] > 0 and torch.equal(k, zeros) and torch.equal(v, zeros)
    assert torch.equal(layer.read()[0], zeros)


# --------------------------------------------------------------------------------------------------------
# head_dim not a power of two: a head_dim-40 model generates through the cache at 8 bits exactly as at full
# precision and streams as it simulates (the designs alone: tests/quantizers/test_conformance.py)
# --------------------------------------------------------------------------------------------------------
def test_model_with_head_dim_40_through_cache_and_simulation():
    model = tiny_model("llama", head_dim=40)
    assert model_geometry(model).head_dim == 40
    ids = ids_of(14)
    eight = np.full(model_geometry(model).shape, 8)
    quarot = get_quantizer("quarot")
    assert torch.equal(
        generate(model, ids, RateQuantCache(KVQuantSpec(eight, quarot, 4))),
        generate(model, ids, DynamicCache(config=model.config)),
    )
    bits = mixed_bits(model)
    for design in (quarot, get_quantizer("turbo"), get_quantizer("kivi", group_size=8)):
        stream = streamed(model, ids, RateQuantCache(KVQuantSpec(bits, design, 8)))
        assert (stream - simulated(model, ids, bits, design, 8)).abs().max() < 1e-4
    with pytest.raises(RateQuantError, match="head_dim 40 is not divisible"):  # kivi's default value group
        generate(model, ids, RateQuantCache(KVQuantSpec(bits, get_quantizer("kivi"), 32)), n=40)


# --------------------------------------------------------------------------------------------------------
# float16, bfloat16 and float32 models: cache generation at 8 bits gives the full-precision tokens, the cache
# keeps the model's dtype and its exact byte formula, and streaming equals simulated evaluation (logits; the
# perplexity: tests/evaluation/test_perplexity.py) to within the dtype's own rounding noise.
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float32_logits():
    with torch.no_grad():
        return tiny_model("llama", seed=1)(ids_of(40)).logits


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_models_in_every_dtype_stream_as_they_simulate(dtype, float32_logits):
    model = tiny_model("llama", seed=1).to(dtype)
    ids, bits = ids_of(40), mixed_bits(model, seed=1)
    with torch.no_grad():
        full = model(ids).logits.float()
    noise = float((full - float32_logits).abs().max())  # the dtype's own rounding noise at full precision
    cache = RateQuantCache(KVQuantSpec(bits, KIVI4, 8))
    stream = streamed(model, ids, cache).float()
    sim = simulated(model, ids, bits, KIVI4, 8).float()
    gap = float((stream - sim).abs().max())
    # In float32 the two paths agree to rounding. In 16-bit dtypes the keys a token-by-token forward computes
    # differ from the whole-sequence ones by the dtype's rounding, which can move a value across a code
    # boundary; the gap then stays within a few times that noise (and far below the quantization effect).
    allowed = 2 * noise + 1e-5 if dtype == torch.float32 else 10 * noise
    assert stream.dtype == torch.float32 and gap <= allowed, (gap, noise)
    assert float((sim - full).abs().max()) > 10 * gap  # the quantization effect is far above the disagreement
    k, v = cache.layers[0].read()
    assert k.dtype == v.dtype == dtype and cache.layers[0]._stores[0].residual.dtype == dtype
    want = KVQuantSpec(bits, KIVI4, 8).expected_bytes(16, 40, dtype=dtype)
    got = cache.nbytes()
    assert got.residual == want.residual and got.codes == want.codes
    assert abs(got.metadata - want.metadata) <= 0.01 * want.metadata


# --------------------------------------------------------------------------------------------------------
# Batches with left padding (token-grouped KIVI keys): the cache generates what the simulation does, and the
# unpadded row is unaffected by its neighbour (per-token designs: tests/cache/test_cache.py). Sequences shorter
# than one group: nothing is quantized, the logits are bit-identical to full precision and the cache holds only
# its residual buffers. Longer than the residual window: every whole chunk is stored, at the exact chunk
# boundaries.
# --------------------------------------------------------------------------------------------------------
def test_left_padded_batch_with_token_grouped_keys():
    model = tiny_model("llama", seed=4)
    bits = mixed_bits(model, 2, 5, seed=6)
    ids = ids_of(7, batch=2, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0
    kw = dict(attention_mask=mask, pad_token_id=1)
    # residual 8 > prompt 7: the prefill sees only full-precision keys, as in token-by-token decoding
    cache = RateQuantCache(KVQuantSpec(bits, KIVI4, 8))
    out = generate(model, ids, cache, n=14, **kw)
    with simulated_quantization(model, KVQuantSpec(bits, KIVI4, 8)):
        ref = generate(model, ids, DynamicCache(config=model.config), n=14, **kw)
    alone = generate(model, ids[1:], RateQuantCache(KVQuantSpec(bits, KIVI4, 8)), n=14)
    assert torch.equal(out, ref)
    assert torch.equal(out[1], alone[0])  # key groups are per row: the neighbour's padding does not leak
    assert cache.layers[0].stored_lengths() == (16, 16) and torch.isfinite(cache.layers[0].read()[0]).all()


@pytest.mark.parametrize("length", [1, 3, 31])
def test_sequence_shorter_than_one_group_stays_full_precision(length):
    model = tiny_model("qwen2", seed=5)
    g = model_geometry(model)
    kivi = get_quantizer("kivi")  # groups of 32 tokens, residual window 128
    bits = mixed_bits(model, seed=5)
    ids = ids_of(length, seed=5)
    cache = RateQuantCache(KVQuantSpec(bits, kivi, 128))
    with torch.no_grad():
        got = model(ids, past_key_values=cache, use_cache=True).logits
        want = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    assert torch.equal(got, want)
    assert torch.equal(simulated(model, ids, bits, kivi, 128), want)
    nb = cache.nbytes()
    assert cache.layers[0].stored_lengths() == (0, 0) and nb.codes == nb.metadata == 0
    assert nb.residual == KVQuantSpec(bits, kivi).expected_bytes(g.head_dim, length, dtype=torch.float32).residual
    # residual 0: values (per token) are stored at once, keys wait for a whole group of 32
    short = RateQuantCache(KVQuantSpec(bits, kivi, 0))
    with torch.no_grad():
        model(ids, past_key_values=short, use_cache=True)
    assert short.layers[0].stored_lengths() == (0, length)


@pytest.mark.parametrize("length", [7, 8, 9, 15, 16, 17, 41])
def test_sequence_longer_than_the_residual_window_stores_whole_chunks(length):
    layer = RateQuantLayer([2, 5], [3, 1], StoragePolicy(KIVI4, 8))
    gen = torch.Generator().manual_seed(length)
    keys, values = torch.randn(1, 2, length, 16, generator=gen), torch.randn(1, 2, length, 16, generator=gen)
    for i in range(length):
        layer.update(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    stored = (length // 8) * 8
    assert layer.stored_lengths() == (stored, stored) and layer.get_seq_length() == length
    k, v = layer.read()
    assert torch.equal(k[:, :, stored:], keys[:, :, stored:]) and torch.equal(v[:, :, stored:], values[:, :, stored:])
    if stored:
        assert not torch.equal(k[:, :, :stored], keys[:, :, :stored])
        assert (k[:, :, :stored] - keys[:, :, :stored]).abs().max() < 1.5  # 2 and 5 bits over 4-token groups


# --------------------------------------------------------------------------------------------------------
# sliding-window layers (Gemma2 alternating, Qwen2 with ``max_window_layers``) are applied by the mask over the
# full history the cache keeps: the result equals the windowed model, not the unwindowed one
# --------------------------------------------------------------------------------------------------------
def windowed_pair(kind: str):
    """(model with sliding-window layers, the same weights with the windows switched off)."""
    import transformers as tf

    common = {**TINY, "num_hidden_layers": 4}
    if kind == "gemma2":
        configs = [tf.Gemma2Config(**common, head_dim=16, sliding_window=w) for w in (5, 4096)]
    else:
        configs = [
            tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=w, max_window_layers=2) for w in (5, 4096)
        ]
    out = []
    for config in configs:
        torch.manual_seed(9)
        out.append(AutoModelForCausalLM.from_config(config).eval())
    return out


@pytest.mark.parametrize("kind", ["gemma2", "qwen2"])
def test_sliding_window_layers_are_applied_over_the_full_history(kind):
    from ratequant.compat import sliding_window_layers

    model, unwindowed = windowed_pair(kind)
    assert any(sliding_window_layers(model)) and not all(sliding_window_layers(model))
    ids = ids_of(24, seed=9)
    with torch.no_grad():
        windowed_ref, unwindowed_ref = model(ids).logits, unwindowed(ids).logits
    cache = RateQuantCache(KVQuantSpec(np.full(model_geometry(model).shape, 8), KIVI4, 4))
    stream = streamed(model, ids, cache)
    assert cache.get_seq_length() == 24 and cache.layers[0].stored_lengths() == (24, 24)  # the whole history
    gap = float((stream - windowed_ref).abs().max())
    assert gap < 0.05 * float((windowed_ref - unwindowed_ref).abs().max()), gap
    assert torch.equal(
        generate(
            model, ids[:, :9], RateQuantCache(KVQuantSpec(np.full(model_geometry(model).shape, 8), KIVI4, 4)), n=12
        ),
        generate(model, ids[:, :9], DynamicCache(config=model.config), n=12),
    )


# --------------------------------------------------------------------------------------------------------
# Careless users, round two: each case failed once (a traceback, silent garbage, a lost or deleted file) and must
# now end in one clear line with exit status 2, or in the right result. The number in a test's name is the item of
# the reliability issue's list.
# --------------------------------------------------------------------------------------------------------
def test_10_a_cache_with_more_layers_than_the_model_is_refused_at_the_next_forward():
    from ratequant.cache import RateQuantCache
    from ratequant.compat import cache_argument
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    model = tiny_model("llama")  # 3 layers
    cache = RateQuantCache(KVQuantSpec(np.full((2, 4, 2), 4), get_quantizer("uniform")))
    ids = torch.randint(2, 300, (1, 5))
    with torch.no_grad():
        model(ids, **cache_argument(model, cache), use_cache=True)
        with pytest.raises(PlanError, match="fewer layers than the spec's 4"):
            model(ids[:, :1], **cache_argument(model, cache), use_cache=True)
    with pytest.raises(PlanError, match="layers"):
        RateQuantCache(KVQuantSpec(np.full((2, 4, 2), 4), get_quantizer("uniform")), model=model)


# --------------------------------------------------------------------------------------------------------
# Fast paths: the cache's optional working buffer of dequantized chunks changes nothing a caller sees (same keys
# and values at every step, after crop and beam reorder), is counted in ``nbytes().buffer`` and stays within its
# byte limit; without it the cache holds no buffer.
# --------------------------------------------------------------------------------------------------------
def stream(layer: RateQuantLayer, keys: torch.Tensor, values: torch.Tensor, pieces) -> list:
    outs, pos = [], 0
    for piece in pieces:
        outs.append(layer.update(keys[:, :, pos : pos + piece], values[:, :, pos : pos + piece]))
        pos += piece
    return outs


@pytest.mark.parametrize("quantizer_name", ["kivi", "turbo"])
@pytest.mark.parametrize("widths", [([2, 3, 2, 2], [4, 1, 4, 1]), ([3, 3, 3, 3], [2, 2, 2, 2])])
@pytest.mark.parametrize("limit_chunks,sinks", [(1, 0), (3, 0), (100, 0), (3, 3)])
def test_working_buffer_returns_exactly_what_the_packed_store_gives(quantizer_name, widths, limit_chunks, sinks):
    quantizer = DESIGNS[quantizer_name]
    torch.manual_seed(3)
    b, h, d, chunk = 2, 4, 16, 4
    keys, values = torch.randn(b, h, 45, d) * 2, torch.randn(b, h, 45, d)
    per_kind = limit_chunks * b * h * chunk * d * 4
    policy = StoragePolicy(quantizer, chunk, sinks)
    plain = RateQuantLayer(*widths, policy)
    fast = RateQuantLayer(*widths, policy, buffer_bytes=2 * per_kind)
    pieces = (5, 1, 1, 9, 1, 1, 1, 13, 1, 12)
    for (k0, v0), (k1, v1) in zip(stream(plain, keys, values, pieces), stream(fast, keys, values, pieces)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    stored = plain.stored_lengths()[0] // chunk
    for store in fast._stores:
        assert store.buffered == min(stored, limit_chunks)
    nb = fast.nbytes()
    assert nb.buffer == 2 * min(stored, limit_chunks) * b * h * chunk * d * 4 <= 2 * per_kind
    assert nb.total - nb.buffer == plain.nbytes().total
    assert plain.nbytes().buffer == 0
    # crop into a stored chunk, beam reorder, more tokens: still identical
    for layer in (plain, fast):
        layer.crop(-7)
        layer.reorder_cache(torch.tensor([1, 0]))
    assert plain.lossy_crop and fast.lossy_crop  # the crop did cut into a stored chunk
    more_k, more_v = torch.randn(b, h, 9, d), torch.randn(b, h, 9, d)
    k0, v0 = plain.update(more_k, more_v)
    k1, v1 = fast.update(more_k, more_v)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert all(torch.equal(a, c) for a, c in zip(plain.read(), fast.read()))


def test_cache_buffer_is_split_over_layers_and_listed_with_its_tensors():
    bits = np.full((2, 3, 2), 2)
    cache = RateQuantCache(KVQuantSpec(bits, DESIGNS["kivi"], 4), buffer_bytes=3 * 2 * (1 * 2 * 4 * 8 * 4) * 2)
    for layer in cache.layers:
        layer.update(torch.randn(1, 2, 18, 8), torch.randn(1, 2, 18, 8))
    nb = cache.nbytes()
    assert nb.buffer == 3 * 2 * (2 * 1 * 2 * 4 * 8 * 4)  # 3 layers, K+V, 2 chunks of [1, 2, 4, 8] float32
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.tensors()}
    assert sum(storages.values()) == nb.total
    assert nb.to_dict()["buffer"] == nb.buffer and nb.to_dict()["total"] == nb.total
    cache.reset()
    assert cache.nbytes() == CacheBytes()


def test_buffer_bytes_is_validated():
    from ratequant.errors import RateQuantError

    with pytest.raises(RateQuantError, match="buffer_bytes"):
        RateQuantLayer([2], [2], StoragePolicy(DESIGNS["kivi"], 4), buffer_bytes=-1)
    with pytest.raises(RateQuantError, match="buffer_bytes"):
        RateQuantCache(KVQuantSpec(np.full((2, 1, 1), 2), DESIGNS["kivi"], 4), buffer_bytes=-1)
