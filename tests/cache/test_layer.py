"""The cache (:mod:`ratequant.cache.layer`: RateQuantLayer, RateQuantCache).

At the edges: NaN and Inf, all-zero groups, head_dims that are not powers of two, every dtype, left padding,
sequences shorter than one group or longer than the residual window, sliding-window layers, caches that do not fit
the model, and the optional working buffer of dequantized chunks.

The core: exact storage round trips, the residual policy, beam reorder, crop and reset, byte accounting, generation
through the cache, construction from a plan, sink tokens and refusals. Generation tests compare the cache with a
reference that must agree with it: 8-bit everywhere against the full-precision DynamicCache (same greedy tokens),
and mixed widths against a DynamicCache run inside :func:`simulated_quantization` (same tokens for greedy, sampling
with a fixed seed, beam search and a left-padded batch; the prompt is shorter than the residual window, so prefill
follows the policy exactly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from ratequant.cache import RateQuantCache, RateQuantLayer
from ratequant.cache.simulate import simulated_quantization
from ratequant.compat import cache_argument, model_geometry
from ratequant.errors import PlanError, RateQuantError
from ratequant.quantizers import available, get_quantizer
from ratequant.spec import CacheBytes, KVQuantSpec, StoragePolicy, bit_groups
from tests.cache.helpers import (
    DESIGNS,
    DTYPES,
    KIVI4,
    UNIFORM,
    generate,
    ids_of,
    make_plan,
    mixed_bits,
    poisoned,
    simulated,
)
from tests.conftest import TINY, tiny_config, tiny_model

KIVI = KIVI4  # the name the core tests use


@torch.no_grad()
def streamed(model, ids, cache) -> torch.Tensor:
    """Logits ``[B, T, V]`` of feeding ``ids`` one token at a time through ``cache``."""
    return torch.cat(
        [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(ids.shape[1])], 1
    )


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
# unpadded row is unaffected by its neighbour (per-token designs: test_batch_of_two_with_left_padding below).
# Sequences shorter than one group: nothing is quantized, the logits are bit-identical to full precision and the
# cache holds only its residual buffers. Longer than the residual window: every whole chunk is stored, at the exact
# chunk boundaries.
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


# =========================================================================================================
# The core: round trips and the residual policy, beam reorder and crop, bytes, generation through the cache,
# construction and plans, sink tokens, refusals
# =========================================================================================================


def random_bits(shape, low=1, high=5, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape)


def make_cache(bits, quantizer, residual_length=128, sink_tokens=0, **kwargs) -> RateQuantCache:
    return RateQuantCache(KVQuantSpec(bits, quantizer, residual_length, sink_tokens), **kwargs)


def make_layer(key_bits, value_bits, quantizer, residual_length, sink_tokens=0, **kwargs) -> RateQuantLayer:
    return RateQuantLayer(key_bits, value_bits, StoragePolicy(quantizer, residual_length, sink_tokens), **kwargs)


def expected_nbytes(
    bits, quantizer, head_dim, tokens, *, batch_size=1, residual_length=128, sink_tokens=0, dtype=torch.float16
) -> CacheBytes:
    spec = KVQuantSpec(bits, quantizer, residual_length, sink_tokens)
    return spec.expected_bytes(head_dim, tokens, batch_size=batch_size, dtype=dtype)


def reference_read(x: torch.Tensor, widths, kind: str, chunk: int, quantizer, sinks: int = 0) -> torch.Tensor:
    """What a layer must return after holding ``x`` [B, H, S, D]: the first ``sinks`` tokens untouched, then
    whole chunks counted from the sinks quantized chunk by chunk (written out here, not via the policy)."""
    s = x.shape[2]
    out = x.clone()
    start = min(sinks, s)
    for c in range((s - start) // chunk):
        lo, hi = start + c * chunk, start + (c + 1) * chunk
        for bits, heads in bit_groups(widths):
            part = x[:, list(heads), lo:hi]
            back = quantizer.dequantize(quantizer.quantize(part, bits, kind))
            out[:, list(heads), lo:hi] = back
    return out


def held_tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable through the attributes of ``obj`` (dicts, lists, tuples, objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("ratequant"):
        items = vars(obj).values()
    else:
        return []
    return [t for item in items for t in held_tensors(item, seen)]


def storage_sum(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------------------
# storage and policy, on plain tensors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantizer,residual,sinks",
    [(KIVI, 8, 0), (KIVI, 0, 0), (UNIFORM, 0, 0), (UNIFORM, 12, 0), (KIVI, 8, 3), (KIVI, 0, 5), (UNIFORM, 12, 1)],
)
def test_read_equals_chunkwise_quantization(quantizer, residual, sinks):
    """Streaming in uneven pieces stores every whole chunk once; reads are exact (sinks + stored + residual)."""
    torch.manual_seed(0)
    widths_k, widths_v = [2, 3, 2], [4, 1, 4]  # non-contiguous head groups
    layer = make_layer(widths_k, widths_v, quantizer, residual, sinks)
    chunks = layer.policy.chunks
    keys = torch.randn(2, 3, 61, 16) * 3
    values = torch.randn(2, 3, 61, 16)
    pos = 0
    for piece in (1, 5, 17, 1, 1, 9, 27):  # the first pieces fill the sinks over several updates
        k_out, v_out = layer.update(keys[:, :, pos : pos + piece], values[:, :, pos : pos + piece])
        # the new tokens come back at full precision; older ones as the cache holds them
        held_k = reference_read(keys[:, :, :pos], widths_k, "key", chunks[0], quantizer, sinks)
        held_v = reference_read(values[:, :, :pos], widths_v, "value", chunks[1], quantizer, sinks)
        assert torch.equal(k_out, torch.cat([held_k, keys[:, :, pos : pos + piece]], 2))
        assert torch.equal(v_out, torch.cat([held_v, values[:, :, pos : pos + piece]], 2))
        pos += piece
    assert layer.get_seq_length() == 61
    k_now, v_now = layer.read()
    assert torch.equal(k_now, reference_read(keys, widths_k, "key", chunks[0], quantizer, sinks))
    assert torch.equal(v_now, reference_read(values, widths_v, "value", chunks[1], quantizer, sinks))
    assert layer.stored_lengths() == tuple((61 - sinks) // f * f for f in chunks)
    # the stored part really is quantized (differs from the input), the sinks and the residual are exact
    p = layer.stored_lengths()[0]
    assert (k_now[:, :, sinks : sinks + p] - keys[:, :, sinks : sinks + p]).abs().max() > 1e-3
    assert torch.equal(k_now[:, :, :sinks], keys[:, :, :sinks])
    assert torch.equal(k_now[:, :, sinks + p :], keys[:, :, sinks + p :])


def test_chunk_sizes_follow_residual_and_token_group():
    assert StoragePolicy(KIVI, 0).chunks == (4, 1)
    assert StoragePolicy(KIVI, 128).chunks == (128, 128)
    assert StoragePolicy(UNIFORM, 0).chunks == (1, 1)
    assert StoragePolicy(KIVI, 8, sink_tokens=3).chunks == (8, 8)  # sinks do not change the chunk
    with pytest.raises(RateQuantError, match="multiple"):
        StoragePolicy(KIVI, 6)
    with pytest.raises(RateQuantError, match="residual length"):
        StoragePolicy(KIVI, -1)


def test_stored_codes_are_never_requantized():
    """The packed bytes of a chunk stay bit-identical while later tokens arrive."""
    torch.manual_seed(1)
    layer = make_layer([3, 3], [2, 2], KIVI, 8)
    layer.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    before = {k: v[:1].clone() for k, v in layer._stores[0].groups[0].tensors.items()}
    for _ in range(20):
        layer.update(torch.randn(1, 2, 1, 16) * 10, torch.randn(1, 2, 1, 16))
    after = layer._stores[0].groups[0].tensors
    assert layer.stored_lengths() == (24, 24)
    assert all(torch.equal(before[k], after[k][:1]) for k in before)


def test_dtype_and_device_follow_the_model():
    layer = make_layer([4, 2], [4, 2], UNIFORM, 4)
    k, v = layer.update(torch.randn(1, 2, 9, 8, dtype=torch.bfloat16), torch.randn(1, 2, 9, 8, dtype=torch.bfloat16))
    assert k.dtype == v.dtype == torch.bfloat16
    assert all(t.device == k.device for t in layer.tensors())
    assert layer._stores[0].residual.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# beam reorder, batch selection, crop, reset
# ---------------------------------------------------------------------------------------------------------


def filled_layer(batch=3, tokens=23, residual=8, seed=2, sinks=0):
    torch.manual_seed(seed)
    layer = make_layer([2, 4, 2], [3, 3, 1], KIVI, residual, sinks)
    layer.update(torch.randn(batch, 3, tokens, 16), torch.randn(batch, 3, tokens, 16))
    return layer


@pytest.mark.parametrize("sinks", [0, 3])
def test_reorder_select_repeat_move_rows_exactly(sinks):
    layer = filled_layer(sinks=sinks)
    k0, v0 = layer.read()
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    k1, v1 = layer.read()
    assert torch.equal(k1, k0[idx]) and torch.equal(v1, v0[idx])
    layer.batch_select_indices(torch.tensor([1, 2]))
    assert torch.equal(layer.read()[0], k0[[0, 0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.read()[1], v0[[0, 0, 0, 0]])
    # later updates go on with the new batch layout
    k, _ = layer.update(torch.zeros(4, 3, 1, 16), torch.zeros(4, 3, 1, 16))
    stored = (24 - sinks) // 8 * 8
    assert k.shape == (4, 3, 24, 16) and layer.stored_lengths() == (stored, stored)
    assert torch.equal(layer.read()[0][:, :, :sinks], k0[[0, 0, 0, 0], :, :sinks])


def test_crop_inside_residual_is_exact():
    layer = filled_layer(tokens=23)  # 16 stored, 7 in the residual
    k0, v0 = layer.read()
    layer.crop(-4)
    k1, v1 = layer.read()
    assert layer.get_seq_length() == 19 and not layer.lossy_crop
    assert torch.equal(k1, k0[:, :, :19]) and torch.equal(v1, v0[:, :, :19])


def test_crop_into_stored_chunk_keeps_what_attention_saw():
    layer = filled_layer(tokens=23)
    k0, v0 = layer.read()
    layer.crop(-12)  # 11 tokens left: chunk 0 stored, 3 dequantized tokens of chunk 1 back in the residual
    k1, v1 = layer.read()
    assert layer.get_seq_length() == 11 and layer.stored_lengths() == (8, 8) and layer.lossy_crop
    assert torch.equal(k1, k0[:, :, :11]) and torch.equal(v1, v0[:, :, :11])
    k2, _ = layer.update(torch.randn(3, 3, 6, 16), torch.randn(3, 3, 6, 16))
    assert k2.shape[2] == 17 and layer.stored_lengths() == (16, 16)
    with pytest.raises(RateQuantError, match="negative"):
        layer.crop(3)


def test_reset_releases_memory_and_allows_a_new_batch():
    cache = make_cache(random_bits((2, 2, 3)), KIVI, 8)
    for layer in cache.layers:
        layer.update(torch.randn(2, 3, 30, 16), torch.randn(2, 3, 30, 16))
    assert cache.nbytes().total > 0 and cache.get_seq_length() == 30
    cache.reset()
    assert cache.nbytes() == CacheBytes() and cache.get_seq_length() == 0 and cache.tensors() == []
    k, _ = cache.layers[0].update(torch.randn(5, 3, 2, 16), torch.randn(5, 3, 2, 16))
    assert k.shape == (5, 3, 2, 16)
    with pytest.raises(RateQuantError, match="reset"):
        cache.layers[0].update(torch.randn(4, 3, 2, 16), torch.randn(4, 3, 2, 16))


# ---------------------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("growth", [0.0, 0.25])
def test_nbytes_is_the_storage_of_every_tensor_held(growth):
    cache = make_cache(random_bits((2, 3, 3), 1, 9), KIVI, 8, growth=growth)
    for step in range(6):
        for layer in cache.layers:
            layer.update(torch.randn(2, 3, 7 if step == 0 else 5, 16), torch.randn(2, 3, 7 if step == 0 else 5, 16))
    nb = cache.nbytes()
    everything = held_tensors(cache.layers)
    assert len(everything) == len(cache.tensors())
    assert nb.total == storage_sum(everything) == storage_sum(cache.tensors())
    codes = sum(t.untyped_storage().nbytes() for t in cache.tensors() if t.dtype == torch.uint8)
    # 32 tokens = 4 chunks of 8: every residual buffer is empty again (none of them was released early)
    assert nb.codes == codes and nb.residual == 0
    assert all(s.residual.shape == (2, 3, 0, 16) for layer in cache.layers for s in layer._stores)
    if growth == 0:  # exact size: no reserved chunk
        assert all(g.capacity() == g.num_chunks for layer in cache.layers for s in layer._stores for g in s.groups)


def test_residual_window_holds_exactly_the_waiting_tokens():
    bits = random_bits((2, 1, 3), 1, 9, seed=5)
    cache = make_cache(bits, KIVI, 40)
    layer = cache.layers[0]
    layer.update(torch.randn(1, 3, 45, 16), torch.randn(1, 3, 45, 16))  # 40 stored, 5 in the residual
    for tokens in range(46, 130):
        layer.update(torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16))
        for store in layer._stores:
            assert store.residual.shape == (1, 3, tokens % 40, 16)
            assert store.residual.untyped_storage().nbytes() == store.residual.numel() * 4
        assert cache.nbytes() == expected_nbytes(bits, KIVI, 16, tokens, residual_length=40, dtype=torch.float32)
    layer.crop(-15)  # 114 tokens: 2 chunks stay stored, 34 tokens of the third return to the residual
    assert layer._stores[0].residual.shape == (1, 3, 34, 16) and layer.lossy_crop


@pytest.mark.parametrize(
    "quantizer,residual", [(get_quantizer("kivi"), 128), (get_quantizer("uniform", group_size=32), 0)]
)
def test_nbytes_matches_plan_formula(quantizer, residual):
    """Real bytes = plan formula (quantizer.bits_per_token per stored token) within 1%, plus the residual."""
    bits = random_bits((2, 2, 3), 1, 9, seed=3)
    cache = make_cache(bits, quantizer, residual)
    for layer in cache.layers:
        layer.update(torch.randn(2, 3, 600, 64, dtype=torch.float16), torch.randn(2, 3, 600, 64, dtype=torch.float16))
    nb = cache.nbytes()
    want = expected_nbytes(bits, quantizer, 64, 600, batch_size=2, residual_length=residual, dtype=torch.float16)
    assert nb.residual == want.residual
    assert abs(nb.codes - want.codes) <= 0.01 * want.codes
    assert abs(nb.codes + nb.metadata - want.codes - want.metadata) <= 0.01 * (want.codes + want.metadata)


def test_default_geometry_at_4096_tokens_fits_a_quarter_of_float16():
    """SmolLM2-135M geometry, 2.5-bit mixed plan, default KIVI and 128-token window: <= 25% of a float16 cache."""
    layers, heads, dim, tokens = 30, 3, 64, 4096
    bits = 2 + (np.arange(2 * layers * heads) % 2).reshape(2, layers, heads)
    quantizer = get_quantizer("kivi")
    cache = make_cache(bits, quantizer)
    gen = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        kv = torch.randn(2, 1, heads, tokens, dim, generator=gen).half()
        layer.update(kv[0], kv[1])
    got = cache.nbytes()
    fp16 = 2 * layers * heads * dim * 2 * tokens
    assert got == expected_nbytes(bits, quantizer, dim, tokens)  # codes 2.5, metadata 1, residual 0.5 bits
    assert got.total <= 0.25 * fp16 and got.total == storage_sum(cache.tensors())


# ---------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------


def full_bits(model, value):
    g = model_geometry(model)
    return np.full(g.shape, value)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"])
def test_eight_bit_greedy_matches_full_precision(family):
    model = tiny_model(family)
    prompt = torch.randint(2, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=14, do_sample=False, min_new_tokens=14)
    with torch.no_grad():
        ref = model.generate(prompt, **cache_argument(model, DynamicCache(config=model.config)), **kw)
        cache = make_cache(full_bits(model, 8), get_quantizer("kivi", group_size=4), residual_length=4)
        out = model.generate(prompt, **cache_argument(model, cache), **kw)
    assert cache.layers[0].stored_lengths() == (20, 20)  # most of the sequence was really quantized
    assert torch.equal(out, ref)


def test_sliding_window_layers_keep_history_and_match():
    """Mistral with a 6-token window: the mask applies the window to the full history the cache keeps."""
    model = tiny_model("mistral", sliding_window=6)
    prompt = torch.randint(2, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=15, do_sample=False, min_new_tokens=15)
    with torch.no_grad():
        ref = model.generate(prompt, **cache_argument(model, DynamicCache(config=model.config)), **kw)
        out = model.generate(prompt, **cache_argument(model, make_cache(full_bits(model, 8), KIVI, 4)), **kw)
    assert torch.equal(out, ref)


GEN_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0, temperature=1.0),
    "beam": dict(do_sample=False, num_beams=2),
}


@pytest.mark.parametrize("mode", sorted(GEN_MODES))
def test_mixed_generation_matches_simulated_reference(mode):
    """Cache generation = DynamicCache generation under simulated quantization (same policy, same widths)."""
    model = tiny_model("llama", seed=3)
    bits = random_bits(model_geometry(model).shape, 1, 4, seed=4)
    quantizer, residual = get_quantizer("kivi", group_size=4), 8
    prompt = torch.randint(2, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=18, min_new_tokens=18, **GEN_MODES[mode])
    with torch.no_grad():
        spec = KVQuantSpec(bits, quantizer, residual)
        cache = RateQuantCache(spec, model=model)
        torch.manual_seed(5)
        out = model.generate(prompt, **cache_argument(model, cache), **kw)
        with simulated_quantization(model, spec):
            torch.manual_seed(5)
            ref = model.generate(prompt, **cache_argument(model, DynamicCache(config=model.config)), **kw)
        if mode == "greedy":
            full = model.generate(prompt, **cache_argument(model, DynamicCache(config=model.config)), **kw)
    assert torch.equal(out, ref)
    if mode == "greedy":
        assert not torch.equal(out, full)  # 1-3 bits do change this tiny model's output
    rows = 2 if mode == "beam" else 1
    want = expected_nbytes(
        bits, quantizer, 16, cache.get_seq_length(), batch_size=rows, residual_length=residual, dtype=torch.float32
    )
    got, stored = cache.nbytes(), want.codes + want.metadata
    assert got.residual == want.residual and abs(got.codes + got.metadata - stored) <= 0.01 * stored


def test_batch_of_two_with_left_padding():
    model = tiny_model("qwen2", seed=4)
    bits = random_bits(model_geometry(model).shape, 2, 5, seed=6)
    quantizer, residual = get_quantizer("uniform"), 8
    ids = torch.randint(2, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0  # left padding in row 0
    kw = dict(attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        spec = KVQuantSpec(bits, quantizer, residual)
        cache = RateQuantCache(spec)
        out = model.generate(ids, **cache_argument(model, cache), **kw)
        with simulated_quantization(model, spec):
            ref = model.generate(ids, **cache_argument(model, DynamicCache(config=model.config)), **kw)
        solo = RateQuantCache(spec)
        alone = model.generate(ids[1:], **cache_argument(model, solo), **{**kw, "attention_mask": None})
    assert torch.equal(out, ref)
    assert torch.equal(out[1], alone[0])  # the unpadded row is unaffected by its neighbour (per-token design)
    want = expected_nbytes(bits, quantizer, 16, 21, batch_size=2, residual_length=residual, dtype=torch.float32)
    assert cache.nbytes().total <= want.total * 1.01


# ---------------------------------------------------------------------------------------------------------
# construction and plans
# ---------------------------------------------------------------------------------------------------------


def test_bad_bits_are_refused():
    with pytest.raises(RateQuantError, match="shape"):
        make_cache(np.full((3, 2), 4), KIVI)
    with pytest.raises(RateQuantError, match="from 1 to 8"):
        make_cache(np.full((2, 2, 2), 9), KIVI)
    with pytest.raises(RateQuantError, match="integer"):
        make_cache(np.full((2, 2, 2), 2.5), KIVI)
    with pytest.raises(RateQuantError, match="multiple"):
        make_cache(np.full((2, 2, 2), 4), KIVI, residual_length=6)
    with pytest.raises(RateQuantError, match="KVQuantSpec"):
        RateQuantCache(np.full((2, 2, 2), 4))
    with pytest.raises(RateQuantError, match="StoragePolicy"):
        RateQuantLayer([4], [4], KIVI)
    layer = make_layer([4, 4, 4], [4, 4, 4], KIVI, 8)
    with pytest.raises(PlanError, match="kv-heads"):
        layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))


def test_from_plan_checks_model_and_quantizer():
    model = tiny_model("llama")
    bits = random_bits(model_geometry(model).shape, 2, 5)
    plan = make_plan(model, bits, KIVI)
    cache = RateQuantCache.from_plan(plan, model)
    assert np.array_equal(cache.bits, bits) and cache.quantizer == KIVI and cache.spec.residual_length == 8
    assert cache.spec.sink_tokens == 0
    assert RateQuantCache.from_plan(plan, model, residual_length=16).layers[0].policy.chunks == (16, 16)
    assert RateQuantCache.from_plan(plan, model, sink_tokens=2).spec.sink_tokens == 2
    with pytest.raises(PlanError, match="calibrated for quantizer"):
        RateQuantCache.from_plan(plan, model, UNIFORM)
    with pytest.warns(UserWarning):
        assert RateQuantCache.from_plan(plan, model, UNIFORM, allow_mismatch=True).quantizer == UNIFORM
    other = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=2))
    with pytest.raises(PlanError, match="made for"):
        RateQuantCache.from_plan(plan, other)


# ---------------------------------------------------------------------------------------------------------
# sink tokens
# ---------------------------------------------------------------------------------------------------------


def sink_lengths(sinks: int, chunk: int) -> list[int]:
    """Cache lengths to check: below, at and just past the sinks, then S + k * F + r."""
    return sorted({1, max(1, sinks - 1), sinks, sinks + 1, sinks + chunk, sinks + 2 * chunk + 3, sinks + 5 * chunk + 7})


@pytest.mark.parametrize("sinks", [1, 4])
@pytest.mark.parametrize("quantizer,residual", [(KIVI, 8), (UNIFORM, 0)])
def test_sink_bytes_and_exact_read_back(sinks, quantizer, residual):
    """nbytes().sink is S tokens of every (layer, head, kind) in the model's dtype; the whole nbytes() agrees
    with the spec's byte formula; the sinks read back bit-exactly while later tokens are quantized."""
    layers, batch, heads, dim = 2, 2, 3, 16
    bits = random_bits((2, layers, heads), 1, 9, seed=11)
    spec = KVQuantSpec(bits, quantizer, residual, sinks)
    cache = RateQuantCache(spec)
    chunk = max(spec.chunks)
    lengths = sink_lengths(sinks, chunk)
    gen = torch.Generator().manual_seed(sinks)
    keys = (torch.randn(layers, batch, heads, lengths[-1], dim, generator=gen) * 5).half()
    values = (torch.randn(layers, batch, heads, lengths[-1], dim, generator=gen) * 5).half()
    pos = 0
    for n in lengths:
        for i, layer in enumerate(cache.layers):
            layer.update(keys[i, :, :, pos:n], values[i, :, :, pos:n])
        pos = n
        got, want = cache.nbytes(), spec.expected_bytes(dim, n, batch_size=batch, dtype=torch.float16)
        per_token = batch * heads * dim * 2 * 2 * layers  # float16, keys and values, every layer
        assert got.sink == want.sink == min(n, sinks) * per_token, n
        assert got.residual == want.residual, n
        stored = want.codes + want.metadata
        assert abs(got.total - want.total) <= 0.01 * stored, (n, got, want)
        assert got.buffer == 0 and got.total == storage_sum(cache.tensors())
        for i, layer in enumerate(cache.layers):
            k, v = layer.read()
            s = min(n, sinks)
            assert k.dtype == torch.float16 and k.shape[2] == n
            assert torch.equal(k[:, :, :s], keys[i, :, :, :s]) and torch.equal(v[:, :, :s], values[i, :, :, :s])
            p = layer.stored_lengths()
            assert p == (spec.policy.split("key", n)[1], spec.policy.split("value", n)[1])
            if p[0]:  # the tokens after the sinks really are quantized
                assert not torch.equal(k[:, :, s : s + p[0]], keys[i, :, :, s : s + p[0]])
    assert got.sink == sinks * per_token and got.codes > 0


def test_crop_into_the_sinks_and_refill():
    """Cropping into the sink region drops every stored chunk and keeps the surviving sinks exactly; new
    tokens first refill the sinks, then chunks are counted from the sinks again."""
    sinks, chunk = 4, 8
    layer = filled_layer(tokens=23, sinks=sinks)  # 4 sinks, 16 stored, 3 in the residual
    k0, v0 = layer.read()
    assert layer.stored_lengths() == (16, 16)
    layer.crop(-21)  # 2 tokens left, both sinks
    k1, v1 = layer.read()
    assert layer.get_seq_length() == 2 and layer.stored_lengths() == (0, 0) and not layer.lossy_crop
    assert torch.equal(k1, k0[:, :, :2]) and torch.equal(v1, v0[:, :, :2])
    nb = layer.nbytes()
    assert nb == CacheBytes(sink=2 * 3 * 3 * 16 * 4 * 2)  # 2 tokens, batch 3, 3 heads, float32, K and V
    assert nb.total == storage_sum(layer.tensors())
    new_k, new_v = torch.randn(3, 3, 13, 16), torch.randn(3, 3, 13, 16)
    k2, v2 = layer.update(new_k, new_v)
    assert layer.get_seq_length() == 15 and layer.stored_lengths() == (8, 8)  # 4 sinks + 8 stored + 3 waiting
    want_k = reference_read(torch.cat([k0[:, :, :2], new_k], 2), [2, 4, 2], "key", chunk, KIVI, sinks)
    want_v = reference_read(torch.cat([v0[:, :, :2], new_v], 2), [3, 3, 1], "value", chunk, KIVI, sinks)
    assert torch.equal(layer.read()[0], want_k) and torch.equal(layer.read()[1], want_v)
    assert torch.equal(k2, torch.cat([k0[:, :, :2], new_k], 2))  # the new tokens come back at full precision
    want = KVQuantSpec(np.array([[[2, 4, 2]], [[3, 3, 1]]]), KIVI, 8, sinks).expected_bytes(
        16, 15, batch_size=3, dtype=torch.float32
    )
    got = layer.nbytes()
    assert (got.sink, got.residual) == (want.sink, want.residual)
    assert abs(got.total - want.total) <= 0.01 * (want.codes + want.metadata)
    # crop exactly to the sinks, then to nothing
    layer.crop(-11)
    assert layer.get_seq_length() == 4 and layer.stored_lengths() == (0, 0) and not layer.lossy_crop
    assert torch.equal(layer.read()[0], want_k[:, :, :4])
    layer.crop(-4)
    assert layer.get_seq_length() == 0 and layer.nbytes() == CacheBytes()


def test_crop_after_the_sinks_keeps_them_and_reset_clears_them():
    layer = filled_layer(tokens=23, sinks=3)  # 3 sinks, 16 stored, 4 in the residual
    k0, _ = layer.read()
    layer.crop(-10)  # 13 tokens: sinks, chunk 0 stored, 2 dequantized tokens of chunk 1 back in the residual
    assert layer.get_seq_length() == 13 and layer.stored_lengths() == (8, 8) and layer.lossy_crop
    assert torch.equal(layer.read()[0], k0[:, :, :13])
    assert layer.nbytes().sink == 3 * 3 * 3 * 16 * 4 * 2 and layer.nbytes().residual == 2 * 3 * 3 * 16 * 4 * 2

    bits = random_bits((2, 2, 3), seed=12)
    cache = make_cache(bits, KIVI, 8, sink_tokens=5)
    for layer in cache.layers:
        layer.update(torch.randn(2, 3, 30, 16), torch.randn(2, 3, 30, 16))
    assert cache.nbytes().sink == 5 * 2 * 3 * 16 * 4 * 2 * 2
    cache.reset()
    assert cache.nbytes() == CacheBytes() and cache.get_seq_length() == 0 and cache.tensors() == []
    x = torch.randn(4, 3, 2, 16)
    k, _ = cache.layers[0].update(x, x)  # a new batch; the sinks fill again
    assert k.shape == (4, 3, 2, 16) and cache.layers[0].nbytes().sink == 2 * 4 * 3 * 16 * 4 * 2
    assert torch.equal(cache.layers[0].read()[0], x)


def test_from_plan_takes_a_path_and_a_cache_made_for_the_model_routes_its_attention(tmp_path):
    """A cache made with the model (from_plan always is) routes the model's attention to read the packed stores,
    its layers fed by the model's attention modules; ``attention="decode"`` and no model leave the model alone;
    restore_attention gives the implementation name back."""
    from ratequant.cache import restore_attention
    from ratequant.compat import attention_modules

    model = tiny_model("llama", seed=2)
    bits = random_bits(model_geometry(model).shape, 2, 5)
    path = make_plan(model, bits, KIVI).to_json(tmp_path / "plan.json")
    decode = RateQuantCache.from_plan(str(path), model, attention="decode")
    assert np.array_equal(decode.bits, bits) and not any(layer.attend_packed for layer in decode.layers)
    RateQuantCache(decode.spec)  # no model: nothing routed either
    assert model.config._attn_implementation == "sdpa"
    cache = RateQuantCache.from_plan(path, model)
    assert np.array_equal(cache.bits, bits) and model.config._attn_implementation == "ratequant_sdpa"
    modules = attention_modules(model)
    assert all(layer.attend_packed and layer.attention_module is m for layer, m in zip(cache.layers, modules))
    with pytest.raises(RateQuantError, match="attention must be one of packed, decode"):
        RateQuantCache(cache.spec, model=model, attention="fast")
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert not cache.layers[0]._hands_over(1)  # the names restored: the cache decodes the history


# ---------------------------------------------------------------------------------------------------------
# refusals: the spec against the model, the cache dtype
# ---------------------------------------------------------------------------------------------------------


def test_cache_refuses_a_spec_made_for_another_model():
    model = tiny_model("llama")  # 3 layers x 2 kv heads
    with pytest.raises(PlanError, match="3 layers with 2 kv-heads"):
        RateQuantCache(KVQuantSpec(np.full((2, 2, 2), 4), KIVI, 8), model=model)
    with pytest.raises(PlanError, match="3 layers with 2 kv-heads"):
        RateQuantCache(KVQuantSpec(np.full((2, 3, 4), 4), KIVI, 8), model=model)
    assert RateQuantCache(KVQuantSpec(np.full((2, 3, 2), 4), KIVI, 8), model=model).spec.num_layers == 3


def test_a_cache_with_too_few_layers_fails_with_plan_error_in_a_forward():
    model = tiny_model("llama")
    cache = RateQuantCache(KVQuantSpec(np.full((2, 2, 2), 4), KIVI, 8))  # no model given: not checked up front
    ids = torch.randint(2, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(PlanError, match="layer 2"):
        model(ids, use_cache=True, **cache_argument(model, cache))
    with pytest.raises(PlanError, match="layer 5"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 5)


def test_an_update_that_overflows_the_cache_dtype_is_refused_and_changes_nothing():
    layer = make_layer([4, 4], [4, 4], UNIFORM, 4, sink_tokens=1)
    first = torch.randn(1, 2, 6, 8, dtype=torch.float16)
    layer.update(first, first)
    before, nbytes = layer.read(), layer.nbytes()
    big = torch.randn(1, 2, 3, 8)
    big[0, 1, 2, 5] = 1e6  # finite in float32, inf in float16
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(big, torch.randn(1, 2, 3, 8))
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(torch.randn(1, 2, 3, 8), big)
    assert layer.get_seq_length() == 6 and layer.nbytes() == nbytes
    assert all(torch.equal(a, b) for a, b in zip(layer.read(), before))
    k, _ = layer.update(big.clamp(-100, 100), big.clamp(-100, 100))  # a float32 update that fits is cast
    assert k.dtype == torch.float16 and layer.get_seq_length() == 9
