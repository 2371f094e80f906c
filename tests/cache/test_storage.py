"""Packed storage (:mod:`ratequant.cache.storage`): evenly spaced heads are found, to be read as one strided slice."""

from __future__ import annotations

from ratequant.cache.storage import _progression


def test_progression_detects_evenly_spaced_heads():
    assert _progression((0, 1, 2)) == slice(0, 3, 1)
    assert _progression((1, 3, 5)) == slice(1, 6, 2)
    assert _progression((4,)) == slice(4, 5, 1)
    assert _progression((0, 1, 3)) is None
