"""The native decode kernel agrees bit for bit with the PyTorch path it replaces, and falls back cleanly.

Every width 1..8, both kinds, per-token groups and KIVI's per-channel key groups, every output and metadata
dtype, head dims that are and are not multiples of 8 (the AVX2 path and the portable one), strided 5-D
outputs as the cache uses, rows so short that the last ones end within 8 bytes of the buffer's end, and
values at the edges of float16 (overflow to inf, subnormals). Set ``RATEQUANT_REQUIRE_NATIVE=1`` (CI does) to
fail instead of skip when the kernel is not built.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ratequant.cache import RateQuantCache, RateQuantLayer
from ratequant.kernels import native
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec, StoragePolicy

needs_native = pytest.mark.skipif(
    not native.available() and os.environ.get("RATEQUANT_REQUIRE_NATIVE") != "1",
    reason=f"native kernel unavailable: {native.describe()}",
)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DESIGNS = {
    "uniform": get_quantizer("uniform"),
    "uniform-g8": get_quantizer("uniform", group_size=8),
    "uniform-g4": get_quantizer("uniform", group_size=4),
    "kivi-g4": get_quantizer("kivi", group_size=4),
    "kivi-g16": get_quantizer("kivi", group_size=16, scale_dtype="bfloat16"),
    "kivi-f32": get_quantizer("kivi", group_size=8, scale_dtype="float32"),
}


def both_paths(quantizer, q, out_shape, dtype, strided=False):
    """(native, torch) results of ``dequantize_into`` into fresh outputs (strided views when asked)."""
    results = []
    for use_native in (True, False):
        if strided:  # a head slice of a wider tensor, seen as the cache's [n, B, H, T, D] chunk view
            n, b, h, t, d = out_shape
            big = torch.full((b, 2 * h + 1, n * t, d), float("nan"), dtype=dtype)
            out = big[:, 1::2][:, :h].unflatten(2, (n, t)).permute(2, 0, 1, 3, 4)
        else:
            out = torch.full(out_shape, float("nan"), dtype=dtype)
        if use_native:
            quantizer.dequantize_into(q, out)
        else:
            with native.disabled():
                quantizer.dequantize_into(q, out)
        results.append(out)
    return results


def test_kernel_is_built_where_required():
    if os.environ.get("RATEQUANT_REQUIRE_NATIVE") == "1":
        assert native.available(), native.describe()
    assert ("native kernel (" in native.describe()) == native.available()


@needs_native
@pytest.mark.parametrize("name", sorted(DESIGNS))
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("head_dim", [8, 12, 64])
def test_native_decode_is_bit_identical_to_torch(name, kind, head_dim):
    quantizer = DESIGNS[name]
    group = quantizer.group_size
    if group is not None and head_dim % min(group, head_dim) and (kind == "value" or quantizer.name == "uniform"):
        pytest.skip(f"group {group} does not divide head_dim {head_dim}")
    gen = torch.Generator().manual_seed(head_dim)
    for bits in range(1, 9):
        x = torch.randn(3, 2, 16, head_dim, generator=gen) * 4 + 1
        q = quantizer.quantize(x, bits, kind)
        for dtype in OUT_DTYPES:
            got, want = both_paths(quantizer, q, (3, 2, 16, head_dim), dtype)
            assert torch.equal(got, want), (name, kind, head_dim, bits, dtype)
        assert torch.equal(quantizer.dequantize(q), both_paths(quantizer, q, tuple(x.shape), x.dtype)[1])


@needs_native
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_native_decode_into_strided_chunk_view(bits, dtype):
    quantizer = get_quantizer("kivi", group_size=4)
    n, b, h, t, d = 3, 2, 2, 8, 16
    for kind in ("key", "value"):
        x = torch.randn(n * b, h, t, d, generator=torch.Generator().manual_seed(bits)).to(dtype)
        q = quantizer.quantize(x, bits, kind)
        got, want = both_paths(quantizer, q, (n, b, h, t, d), dtype, strided=True)
        assert torch.equal(got, want)
        assert not torch.isnan(got).any()


@needs_native
def test_native_decode_rounds_float16_edges_like_torch():
    quantizer = get_quantizer("uniform", scale_dtype="float32")
    big = torch.linspace(-7e4, 7e4, 64).repeat(1, 1, 4, 1)  # beyond float16's 65504: inf after rounding
    tiny = torch.linspace(-3e-7, 3e-7, 64).repeat(1, 1, 4, 1)  # float16 subnormals
    for x in (big, tiny):
        for bits in (3, 8):
            q = quantizer.quantize(x, bits, "value")
            for dtype in (torch.float16, torch.bfloat16):
                got, want = both_paths(quantizer, q, tuple(x.shape), dtype)
                assert torch.equal(got, want)
    q = quantizer.quantize(big, 8, "value")
    assert torch.isinf(both_paths(quantizer, q, tuple(big.shape), torch.float16)[0]).any()


@needs_native
def test_prepared_decode_refuses_what_it_cannot_decode():
    quantizer = get_quantizer("uniform", group_size=8)
    q = quantizer.quantize(torch.randn(2, 2, 4, 16), 3, "value")
    codes, scale, zero = (q.tensors[k] for k in ("codes", "scale", "zero"))
    prepared = native.prepare_minmax_decode(codes, 3, 16, scale, zero, 1, 8)
    assert prepared is not None
    assert native.prepare_minmax_decode(codes, 3, 15, scale, zero, 1, 8) is None  # wrong head_dim
    assert native.prepare_minmax_decode(codes, 3, 16, scale, zero, 3, 8) is None  # 4 tokens, groups of 3
    assert native.prepare_minmax_decode(codes, 3, 16, scale[..., :1], zero, 1, 8) is None  # metadata size
    assert native.prepare_minmax_decode(codes.transpose(0, 1), 3, 16, scale, zero, 1, 8) is None
    out = torch.zeros(2, 2, 4, 16)
    assert not prepared.decode(torch.zeros(2, 2, 4, 32)[..., ::2])  # last dim not contiguous
    assert not prepared.decode(torch.zeros(2, 2, 5, 16))  # wrong shape
    assert not prepared.decode(out.to(torch.float64))  # unsupported dtype
    with native.disabled():
        assert not native.available() and not prepared.decode(out)
    assert torch.equal(out, torch.zeros_like(out))  # nothing written by a refused call
    assert prepared.decode(out) and torch.equal(out, quantizer.dequantize(q))


@needs_native
def test_quantizer_falls_back_to_torch_for_outputs_the_kernel_refuses():
    quantizer = get_quantizer("kivi", group_size=4)
    q = quantizer.quantize(torch.randn(2, 2, 8, 16), 2, "key")
    out = torch.zeros(2, 2, 8, 16, dtype=torch.float64)
    quantizer.dequantize_into(q, out)
    assert torch.equal(out, quantizer.dequantize(q).double())


@needs_native
@pytest.mark.parametrize("heads,sinks", [((2, 3, 2, 3), 0), ((2, 2, 3, 4), 0), ((2, 3, 2, 3), 3)])
def test_cache_streams_identically_with_and_without_the_kernel(heads, sinks):
    quantizer = get_quantizer("kivi", group_size=4)
    gen = torch.Generator().manual_seed(3)
    layers = [RateQuantLayer(heads, heads[::-1], StoragePolicy(quantizer, 8, sinks)) for _ in range(2)]
    steps = [torch.randn(2, 4, n, 16, generator=gen) for n in (13, 1, 1, 5, 1, 9, 1)]
    for i, x in enumerate(steps):
        got = layers[0].update(x, -x)
        with native.disabled():
            want = layers[1].update(x, -x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), i
        if i == 3:  # crop into a stored chunk and reorder the batch: prepared decoders must follow
            for layer in layers:
                layer.crop(-6)
                layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layers[0].read()[0], layers[1].read()[0])


@needs_native
def test_default_model_geometry_cache_uses_one_kernel_call_per_bit_group(monkeypatch):
    calls = []
    real = native._MODULE.decode_minmax

    class Spy:
        def decode_minmax(self, *args):
            calls.append(args[1])
            return real(*args)

        __file__ = native._MODULE.__file__

    monkeypatch.setattr(native, "_MODULE", Spy())
    bits = np.array([[[2, 3, 2]], [[3, 3, 3]]])
    cache = RateQuantCache(KVQuantSpec(bits, get_quantizer("kivi"), 128))
    x = torch.randn(1, 3, 300, 64)
    cache.update(x, x, 0)
    calls.clear()
    cache.update(x[:, :, :1], x[:, :, :1], 0)
    assert sorted(calls) == [2, 3, 3]  # keys: the 2-bit pair and the 3-bit head; values: one 3-bit group


def test_a_stale_or_missing_build_is_refused_with_the_reason(monkeypatch):
    import sys
    import types

    stale = types.ModuleType("ratequant.kernels._native")
    stale.__file__ = "/somewhere/_native.so"
    from ratequant import kernels

    monkeypatch.setitem(sys.modules, "ratequant.kernels._native", stale)
    monkeypatch.setattr(kernels, "_native", stale, raising=False)
    module, why = native._load()
    assert module is None and "stale build at /somewhere/_native.so" in why and "reinstall" in why
    monkeypatch.setenv("RATEQUANT_NATIVE", "0")
    assert native._load() == (None, "switched off by RATEQUANT_NATIVE=0")
