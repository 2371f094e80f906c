"""Strategies and checks shared by the quantizer tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ratequant.quantizers import QuantizedTensor

EPS32 = float(torch.finfo(torch.float32).eps)


@st.composite
def kv_tensors(draw, head_dims=(1, 2, 8, 16, 24), max_tokens=12, max_abs=1e4):
    """A float32 ``[B, H, T, D]`` tensor with adversarial values (ties, zeros, subnormals, wide ranges).

    Values are drawn in ``[-max_abs, max_abs]`` and then multiplied by ``10**k``, ``k`` in [-30, 20], so
    blocks range from tiny (subnormal float16 scales) to huge (beyond float16's range).
    """
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 2))
    t = draw(st.integers(1, max_tokens))
    d = draw(st.sampled_from(head_dims))
    elements = st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False)
    data = draw(arrays(np.float32, (b, h, t, d), elements=elements))
    k = draw(st.one_of(st.just(0), st.integers(-30, 20)))
    x = torch.from_numpy(data) * (10.0**k)
    return x


def assert_stored_exactly(q: QuantizedTensor) -> None:
    """Every stored tensor is contiguous and owns exactly its storage; ``nbytes`` is their sum."""
    total = 0
    for name, t in q.tensors.items():
        assert t.is_contiguous(), name
        assert t.storage_offset() == 0, name
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        total += t.numel() * t.element_size()
    assert q.nbytes() == total


def arithmetic_slack(*magnitudes: torch.Tensor) -> torch.Tensor:
    """A few float32 ulps of the largest magnitude involved: rounding of the float32 arithmetic."""
    m = magnitudes[0].abs()
    for other in magnitudes[1:]:
        m = torch.maximum(m, other.abs())
    return 8 * EPS32 * m + 1e-45
