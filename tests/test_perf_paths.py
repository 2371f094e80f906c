"""Fast paths agree exactly with the reference paths they replace.

* ``PackedDesign.dequantize_into`` (fused decode written straight into a strided output) is bit-identical to
  ``dequantize`` for every design, width, kind and output dtype.
* ``packing.unpack`` (broadcast-shift extraction of multi-byte words) agrees with a bit-by-bit reference.
* The cache's optional working buffer of dequantized chunks changes nothing a caller sees (same keys and
  values at every step, after crop and beam reorder), is counted in ``nbytes().buffer`` and stays within
  its byte limit; without it the cache holds no buffer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ratequant.cache import RateQuantCache, RateQuantLayer
from ratequant.cache.storage import _progression
from ratequant.kernels.packing import pack, unpack
from ratequant.quantizers import get_quantizer
from ratequant.spec import CacheBytes, KVQuantSpec, StoragePolicy

DESIGNS = {
    "uniform": get_quantizer("uniform", group_size=8),
    "kivi": get_quantizer("kivi", group_size=4),
    "quarot": get_quantizer("quarot"),
    "turbo": get_quantizer("turbo"),
}


@pytest.mark.parametrize("name", sorted(DESIGNS))
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_strided_output_is_bit_identical(name, kind, dtype):
    quantizer = DESIGNS[name]
    gen = torch.Generator().manual_seed(7)
    n, b, h, t, d = 3, 2, 2, 8, 16
    for bits in range(1, 9):
        x = (torch.randn(n * b, h, t, d, generator=gen) * 3).to(dtype)
        q = quantizer.quantize(x, bits, kind)
        want = quantizer.dequantize(q).view(n, b, h, t, d)
        # a strided destination, as the cache uses: [B, H_total, n * t, D] seen as [n, B, h, t, D]
        big = torch.full((b, 2 * h + 1, n * t, d), float("nan"), dtype=dtype)
        view = big[:, 1::2][:, :h].unflatten(2, (n, t)).permute(2, 0, 1, 3, 4)
        quantizer.dequantize_into(q, view)
        assert torch.equal(view, want), (name, kind, bits)
        assert torch.isnan(big[:, 0::2]).all()  # nothing written outside the view


def test_kivi_partial_token_group_falls_back_exactly():
    quantizer = get_quantizer("kivi", group_size=4)
    x = torch.randn(2, 3, 6, 16)  # 6 tokens: one full and one partial key group
    q = quantizer.quantize(x, 3, "key")
    out = torch.empty(2, 3, 6, 16)
    quantizer.dequantize_into(q, out)
    assert torch.equal(out, quantizer.dequantize(q))


def reference_unpack(packed: list[int], bits: int, n: int) -> list[int]:
    stream = [(byte >> k) & 1 for byte in packed for k in range(8)]
    return [sum(stream[i * bits + k] << k for k in range(bits)) for i in range(n)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_agrees_with_bit_by_bit_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 64):
        codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8, generator=gen)
        packed = pack(codes, bits)
        got = unpack(packed, bits, n)
        assert got.is_contiguous()
        for row in range(5):
            assert got[row].tolist() == reference_unpack(packed[row].tolist(), bits, n) == codes[row].tolist()


def test_progression_detects_evenly_spaced_heads():
    assert _progression((0, 1, 2)) == slice(0, 3, 1)
    assert _progression((1, 3, 5)) == slice(1, 6, 2)
    assert _progression((4,)) == slice(4, 5, 1)
    assert _progression((0, 1, 3)) is None


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
