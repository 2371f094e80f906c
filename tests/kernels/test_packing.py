"""Bit-packing: the layout table, exhaustive round trips for every width, the documented bit order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ratequant.errors import RateQuantError
from ratequant.kernels.packing import LAYOUTS, layout, pack, packed_size, unpack

WIDTHS = range(1, 9)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented rule, one bit at a time: code i occupies stream bits [i*b, (i+1)*b), LSB first."""
    stream = []
    for c in codes:
        stream += [(c >> k) & 1 for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * i + k] << k for k in range(8)) for i in range(len(stream) // 8)]


def test_layout_table_is_the_documented_one():
    expected = {1: (8, 1), 2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 7: (8, 7), 8: (1, 1)}
    assert {b: (lay.codes_per_word, lay.bytes_per_word) for b, lay in LAYOUTS.items()} == expected
    for b, lay in LAYOUTS.items():
        assert lay.codes_per_word * b == 8 * lay.bytes_per_word  # no wasted bit inside a word


def test_worked_example_from_the_docs():
    codes = torch.tensor([5, 1, 7, 0, 2, 6, 3, 4], dtype=torch.uint8)
    assert pack(codes, 3).tolist() == [0xCD, 0x21, 0x8F]
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10001101]
    assert pack(torch.tensor([3, 0, 2, 1], dtype=torch.uint8), 2).tolist() == [0b01100011]


@pytest.mark.parametrize("bits", WIDTHS)
def test_every_code_at_every_position_round_trips(bits):
    """Exhaustive over code values x positions inside a word x row lengths (incl. non multiples of 8)."""
    lay = layout(bits)
    values = torch.arange(1 << bits, dtype=torch.uint8)
    for n in range(1, 2 * lay.codes_per_word + 2):
        for pos in range(n):
            rows = torch.zeros(values.numel(), n, dtype=torch.uint8)
            rows[:, pos] = values
            if n > 1:  # fill the other positions with the complement to exercise neighbours
                rows[:, (pos + 1) % n] = (1 << bits) - 1 - values
            packed = pack(rows, bits)
            assert packed.shape == (values.numel(), math.ceil(n * bits / 8))
            assert torch.equal(unpack(packed, bits, n), rows)


@pytest.mark.parametrize("bits", WIDTHS)
def test_matches_the_bit_stream_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 3, 7, 8, 9, 16, 23, 64):
        codes = torch.randint(0, 1 << bits, (5, n), generator=gen, dtype=torch.int64).to(torch.uint8)
        packed = pack(codes, bits)
        for row, out in zip(codes.tolist(), packed.tolist()):
            assert out == reference_pack(row, bits)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), bits=st.integers(1, 8))
def test_round_trip_property(data, bits):
    shape = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple))
    n = data.draw(st.integers(0, 70))
    codes = data.draw(arrays(np.uint8, (*shape, n), elements=st.integers(0, (1 << bits) - 1)))
    codes = torch.from_numpy(codes)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape, packed_size(n, bits))
    assert packed_size(n, bits) == -(-n * bits // 8)
    assert packed.untyped_storage().nbytes() == packed.numel()  # owns exactly its bytes
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", WIDTHS)
def test_non_contiguous_input(bits):
    codes = torch.randint(0, 1 << bits, (20, 6), dtype=torch.int64).to(torch.uint8)
    view = codes.T  # [6, 20], not contiguous
    assert torch.equal(unpack(pack(view, bits), bits, 20), view)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", WIDTHS)
def test_cuda_matches_cpu(bits):
    codes = torch.randint(0, 1 << bits, (4, 3, 77), dtype=torch.int64).to(torch.uint8)
    on_gpu = pack(codes.cuda(), bits)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), pack(codes, bits))
    assert torch.equal(unpack(on_gpu, bits, 77).cpu(), codes)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "4", None])
def test_bad_widths_raise(bad):
    with pytest.raises(RateQuantError, match="bit width"):
        pack(torch.zeros(8, dtype=torch.uint8), bad)
    with pytest.raises(RateQuantError, match="bit width"):
        unpack(torch.zeros(1, dtype=torch.uint8), bad, 8)


def test_bad_inputs_raise():
    with pytest.raises(RateQuantError, match="uint8"):
        pack(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(RateQuantError, match="exceeds 7"):
        pack(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(RateQuantError, match="take 3 bytes"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3, 8)
    with pytest.raises(RateQuantError, match="non-negative"):
        unpack(torch.zeros(0, dtype=torch.uint8), 3, -1)


# --------------------------------------------------------------------------------------------------------
# Fast path: ``unpack`` (broadcast-shift extraction of multi-byte words) agrees with a bit-by-bit reference
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# Fuzzing: ``unpack`` on arbitrary bytes never yields an out-of-range code and round-trips
# --------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 70), rows=st.integers(1, 3), data=st.data())
def test_unpack_of_arbitrary_bytes_is_in_range_and_round_trips(bits, n, rows, data):
    size = packed_size(n, bits)
    raw = data.draw(st.binary(min_size=rows * size, max_size=rows * size))
    packed = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(rows, size)
        if size
        else torch.zeros(rows, 0, dtype=torch.uint8)
    )
    codes = unpack(packed, bits, n)
    assert codes.shape == (rows, n) and (codes.numel() == 0 or int(codes.max()) < 2**bits)
    again = pack(codes, bits)
    if size:  # the unused high bits of the last byte come back as zeros, every other bit exactly
        spare = size * 8 - n * bits
        keep = torch.full((size,), 0xFF, dtype=torch.uint8)
        keep[-1] = 0xFF >> spare
        assert torch.equal(again, packed & keep)
    with pytest.raises(RateQuantError, match="take"):
        unpack(torch.zeros(rows, size + 1, dtype=torch.uint8), bits, n)
