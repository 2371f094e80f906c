"""Measured damage of each component alone, and the allocation curves built from it."""

import numpy as np
import pytest
import torch

from ratequant.allocation import Curves
from ratequant.measure.headroom import DamageTable, measure_component_damage, measured_curves
from ratequant.quantizers import get_quantizer
from tests.conftest import tiny_model


def test_damage_is_measured_per_component_and_does_not_depend_on_the_batching():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(2, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("uniform")
    one = measure_component_damage(model, ids, quantizer, (1, 2, 8), batch=1, progress=False)
    many = measure_component_damage(model, ids, quantizer, (1, 2, 8), batch=5, progress=False)
    assert one.values.shape == (2, 2, 2, 3) and one.tokens == 39
    np.testing.assert_allclose(one.values, many.values, rtol=1e-4, atol=1e-9)
    assert (one.values[..., 0] > one.values[..., 2]).all()  # 1 bit hurts far more than 8
    assert (one.values[..., 2] < 1e-4).all()
    # a component whose keys are quantized with a sink kept aside: damage measured after the sinks only
    sunk = measure_component_damage(model, ids, quantizer, (1,), sink_tokens=39, progress=False)
    assert (sunk.values == 0).all()  # nothing after 39 sink tokens but the last, whose key no query reads


def test_measured_curves_continue_the_measurement_with_the_fit_and_never_rise():
    fitted = Curves(np.array([[[[8.0, 4.0, 2.0, 1.0]]], [[[8.0, 4.0, 2.0, 1.0]]]]), (2, 3, 4, 5), min_bits=(3, 2))
    damage = DamageTable(np.array([[[[6.0, 6.5]]], [[[3.0, 1.0]]]]), (2, 3), "kivi", 10, 0.0)
    curves = measured_curves(damage, fitted)
    assert curves.source == "measured" and curves.min_bits == (3, 2) and curves.bitset == (2, 3, 4, 5)
    # keys: 6.5 at 3 bits rises above 6.0 at 2 (noise): made flat; above 3 bits the fit (2, 1) scaled by 6.5 / 4
    np.testing.assert_allclose(curves.values[0, 0, 0], [6.0, 6.0, 3.25, 1.625])
    np.testing.assert_allclose(curves.values[1, 0, 0], [3.0, 1.0, 0.5, 0.25])
    with pytest.raises(Exception, match="widths"):
        measured_curves(DamageTable(np.ones((2, 1, 1, 1)), (1,), "kivi", 1, 0.0), fitted)
