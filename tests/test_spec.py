"""The spec: the token rule (sink / quantized / residual ranges) and the byte formula, on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.quantizers import get_quantizer
from ratequant.spec import DEFAULT_RESIDUAL_LENGTH, CacheBytes, KVQuantSpec, StoragePolicy, bit_groups
from tests.conftest import tiny_model

UNIFORM = get_quantizer("uniform")  # token group 1 for both kinds
KIVI4 = get_quantizer("kivi", group_size=4)  # keys in groups of 4 tokens, values per token

# n = 0..12 tokens, chunk F = 4, worked out by hand from the module's rule
# s0 = min(S, n), s1 = s0 + floor((n - s0) / F) * F
SPLITS = {
    0: [
        (0, 0, 0),
        (0, 0, 1),
        (0, 0, 2),
        (0, 0, 3),
        (0, 4, 0),
        (0, 4, 1),
        (0, 4, 2),
        (0, 4, 3),
        (0, 8, 0),
        (0, 8, 1),
        (0, 8, 2),
        (0, 8, 3),
        (0, 12, 0),
    ],
    3: [
        (0, 0, 0),
        (1, 0, 0),
        (2, 0, 0),
        (3, 0, 0),
        (3, 0, 1),
        (3, 0, 2),
        (3, 0, 3),
        (3, 4, 0),
        (3, 4, 1),
        (3, 4, 2),
        (3, 4, 3),
        (3, 8, 0),
        (3, 8, 1),
    ],
}
ENDS = {
    0: [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12],
    3: [0, 1, 2, 3, 3, 3, 3, 7, 7, 7, 7, 11, 11],
}


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_split_and_quantized_end_by_hand(sinks, kind):
    policy = StoragePolicy(UNIFORM, 4, sinks)
    assert policy.chunks == (4, 4) and policy.chunk(kind) == 4
    for n in range(13):
        assert policy.split(kind, n) == SPLITS[sinks][n], n
        assert sum(policy.split(kind, n)) == n
        end = policy.quantized_end(kind, n)
        assert isinstance(end, int) and end == ENDS[sinks][n], n
    # a tensor of query positions gives the same ends as the ints, elementwise
    ends = policy.quantized_end(kind, torch.arange(13))
    assert isinstance(ends, torch.Tensor) and ends.tolist() == ENDS[sinks]
    # and for numpy / python ints of any kind
    assert policy.quantized_end(kind, np.int64(11)) == ENDS[sinks][11]


def test_without_sinks_the_end_is_a_multiple_of_the_chunk():
    policy = StoragePolicy(UNIFORM, 4)
    for n in range(40):
        assert policy.quantized_end("key", n) == n // 4 * 4


def test_kinds_with_different_chunks():
    """KIVI with residual 0: keys in chunks of its token group (4), values per token (chunk 1)."""
    policy = StoragePolicy(KIVI4, 0, 3)
    assert policy.chunks == (4, 1)
    assert [policy.quantized_end("key", n) for n in range(13)] == ENDS[3]
    assert [policy.quantized_end("value", n) for n in range(13)] == list(range(13))  # all but sinks quantized
    assert policy.split("value", 2) == (2, 0, 0) and policy.split("value", 9) == (3, 6, 0)
    assert policy.quantized_end("value", torch.arange(13)).tolist() == list(range(13))


def test_prefill_chunk_widens_the_effective_chunk():
    policy = StoragePolicy(UNIFORM, 4, 3)
    # pieces of 8 after 3 sinks: [3, 11), [11, 19); a query sees its own piece at full precision
    assert [policy.quantized_end("key", n, prefill_chunk=8) for n in (3, 10, 11, 18, 19)] == [3, 3, 11, 11, 19]
    # a prefill chunk dividing F changes nothing
    assert [policy.quantized_end("key", n, prefill_chunk=2) for n in range(13)] == ENDS[3]
    assert policy.quantized_end("key", torch.tensor([10, 11]), prefill_chunk=8).tolist() == [3, 11]
    assert policy.check_prefill_chunk(8) == 8 and policy.check_prefill_chunk(2) == 2
    with pytest.raises(RateQuantError, match="divide or be a multiple"):
        policy.check_prefill_chunk(6)
    with pytest.raises(RateQuantError, match="prefill chunk"):
        policy.check_prefill_chunk(0)


def test_policy_is_validated():
    assert StoragePolicy(KIVI4, 0).chunks == (4, 1)
    assert StoragePolicy(KIVI4, 128).chunks == (128, 128)
    assert StoragePolicy(UNIFORM, 0).chunks == (1, 1)
    assert StoragePolicy(UNIFORM).residual_length == DEFAULT_RESIDUAL_LENGTH == 128
    with pytest.raises(RateQuantError, match="multiple"):
        StoragePolicy(KIVI4, 6)
    with pytest.raises(RateQuantError, match="residual length"):
        StoragePolicy(KIVI4, -1)
    with pytest.raises(RateQuantError, match="sink tokens"):
        StoragePolicy(KIVI4, 8, -1)
    with pytest.raises(RateQuantError, match="sink tokens"):
        StoragePolicy(KIVI4, 8, 1 << 20)
    with pytest.raises(RateQuantError, match="sink tokens"):
        StoragePolicy(KIVI4, 8, True)
    with pytest.raises(RateQuantError, match="Quantizer"):
        StoragePolicy("kivi", 8)


def test_expected_bytes_by_hand():
    """1 layer x 2 kv heads, 2 bits, uniform (64 bits per token: 32 code + 32 metadata), F=4, S=3, 12 tokens,
    batch 2, float16: each (head, kind) holds 3 sink, 8 quantized and 1 residual token(s)."""
    spec = KVQuantSpec(np.full((2, 1, 2), 2), UNIFORM, residual_length=4, sink_tokens=3)
    got = spec.expected_bytes(16, 12, batch_size=2, dtype=torch.float16)
    per = 4  # (head, kind) pairs
    assert got == CacheBytes(
        codes=per * 8 * 2 * 16 * 2 // 8,
        metadata=per * 8 * 2 * 32 // 8,
        residual=per * 1 * 2 * 16 * 2,
        sink=per * 3 * 2 * 16 * 2,
    )
    assert got.total == 256 + 256 + 256 + 768
    # below the sinks everything is a sink token; float32 doubles the full-precision parts
    assert spec.expected_bytes(16, 2, batch_size=2, dtype=torch.float32) == CacheBytes(sink=per * 2 * 2 * 16 * 4)
    assert spec.expected_bytes(16, 0) == CacheBytes()
    # without sinks the same 12 tokens are 3 whole chunks
    plain = KVQuantSpec(np.full((2, 1, 2), 2), UNIFORM, residual_length=4)
    assert plain.expected_bytes(16, 12, batch_size=2) == CacheBytes(codes=per * 12 * 8, metadata=per * 12 * 8)


def test_component_and_full_precision_bytes_add_up():
    policy = StoragePolicy(KIVI4, 8, 5)
    bits = np.random.default_rng(0).integers(1, 9, size=(2, 3, 2))
    spec = KVQuantSpec(bits, KIVI4, 8, 5)
    for n in (0, 3, 5, 12, 13, 5 + 3 * 8 + 7):
        want = spec.expected_bytes(32, n, batch_size=3, dtype=torch.bfloat16)
        codes = meta = 0.0
        for k, kind in enumerate(("key", "value")):
            for b in bits[k].ravel():
                c, m = policy.component_bytes(kind, int(b), 32, n, 3)
                codes, meta = codes + c, meta + m
        assert (want.codes, want.metadata) == (round(codes), round(meta))
        sink, stored, residual = policy.split("key", n)
        assert want.sink == sink * 3 * 32 * 2 * bits.size
        assert want.residual == residual * 3 * 32 * 2 * bits.size
        assert policy.full_precision_bytes("key", 32, n, 3, 2) == (residual * 3 * 32 * 2, sink * 3 * 32 * 2)


def test_spec_fields_and_geometry_check():
    bits = np.array([[[2, 3]], [[4, 4]]])
    spec = KVQuantSpec(bits, KIVI4, 8, 2)
    assert spec.num_layers == 1 and spec.num_kv_heads == 2 and spec.avg_bits == 3.25
    assert spec.chunks == (8, 8) and spec.policy == StoragePolicy(KIVI4, 8, 2)
    assert spec.groups("key", 0) == [(2, (0,)), (3, (1,))] and spec.groups("value", 0) == [(4, (0, 1))]
    assert not spec.bits.flags.writeable
    bits[0, 0, 0] = 7
    assert spec.bits[0, 0, 0] == 2  # a copy
    d = spec.to_dict()
    assert d["bits"] == {"key": [[2, 3]], "value": [[4, 4]]} and d["sink_tokens"] == 2 and d["residual_length"] == 8
    assert "sinks 2" in repr(spec)
    spec.check_geometry(Geometry(1, 2, 16, 4))
    with pytest.raises(PlanError, match="1 layers with 3 kv-heads"):
        spec.check_geometry(Geometry(1, 3, 16, 6))
    with pytest.raises(PlanError, match="2 layers"):
        spec.check_geometry(Geometry(2, 2, 16, 4))
    uni = KVQuantSpec.uniform(3, Geometry(4, 2, 16, 4), UNIFORM, residual_length=0, sink_tokens=1)
    assert uni.bits.shape == (2, 4, 2) and (uni.bits == 3).all() and uni.sink_tokens == 1


def test_bad_specs_are_refused():
    with pytest.raises(RateQuantError, match="shape"):
        KVQuantSpec(np.full((3, 2), 4), KIVI4)
    with pytest.raises(RateQuantError, match="from 1 to 8"):
        KVQuantSpec(np.full((2, 2, 2), 9), KIVI4)
    with pytest.raises(RateQuantError, match="integer"):
        KVQuantSpec(np.full((2, 2, 2), 2.5), KIVI4)
    with pytest.raises(RateQuantError, match="multiple"):
        KVQuantSpec(np.full((2, 2, 2), 4), KIVI4, residual_length=6)
    with pytest.raises(RateQuantError, match="sink tokens"):
        KVQuantSpec(np.full((2, 2, 2), 4), KIVI4, sink_tokens=-2)


def test_cache_bytes_and_bit_groups():
    a, b = CacheBytes(1, 2, 3, 4, 5), CacheBytes(10, 20, 30, 40, 50)
    assert a + b == CacheBytes(11, 22, 33, 44, 55) and (a + b).total == 165
    assert a.to_dict() == {"codes": 1, "metadata": 2, "residual": 3, "sink": 4, "buffer": 5, "total": 15}
    with pytest.raises(RateQuantError, match=r"CacheBytes\.sink"):
        CacheBytes(sink=-1)
    assert bit_groups([4, 2, 4, 1]) == [(1, (3,)), (2, (1,)), (4, (0, 2))]


# --------------------------------------------------------------------------------------------------------
# Careless users, round two: each case failed once (a traceback, silent garbage, a lost or deleted file) and must
# now end in one clear line with exit status 2, or in the right result. The number in a test's name is the item of
# the reliability issue's list.
# --------------------------------------------------------------------------------------------------------
def test_6_a_group_larger_than_anything_or_than_the_models_context_is_refused_before_allocating():
    from ratequant.cache import RateQuantCache
    from ratequant.cache.simulate import simulated_quantization
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    with pytest.raises(RateQuantError, match="group_size must be an integer from 1 to 65536"):
        get_quantizer("kivi", group_size=10**9)
    model = tiny_model("llama")  # 512 positions
    spec = KVQuantSpec(np.full((2, 3, 2), 2), get_quantizer("kivi", group_size=4096), residual_length=0)
    with pytest.raises(PlanError, match="exceed the model's context of 512 tokens"):
        RateQuantCache(spec, model=model)
    with pytest.raises(PlanError, match="exceed the model's context"), simulated_quantization(model, spec):
        pass
