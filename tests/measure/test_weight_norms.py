"""The norms of W_K and W_V per layer ("Quantize What Counts") and the weight-norm allocation model."""

import numpy as np
import pytest
import torch

from ratequant.allocation import Budget, allocate
from ratequant.compat import kv_projections
from ratequant.measure.weight_norms import norm_curves, weight_norms
from tests.conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_norms_are_those_of_the_key_and_value_projections(family):
    model = tiny_model(family)
    norms = weight_norms(model)
    layers = len(kv_projections(model))
    assert norms.spectral.shape == norms.frobenius.shape == (2, layers)
    for layer, (wk, wv) in enumerate(kv_projections(model)):
        assert norms.spectral[0, layer] == pytest.approx(float(torch.linalg.matrix_norm(wk.double(), ord=2)))
        assert norms.frobenius[1, layer] == pytest.approx(float(torch.linalg.matrix_norm(wv.double())))
    assert (norms.frobenius >= norms.spectral * (1 - 1e-12)).all()
    assert (norms.head_spectral <= norms.spectral[..., None] * (1 + 1e-12)).all()  # a head is a slice of rows


def test_gpt2_fused_projection_is_split_into_its_key_and_value_thirds():
    model = tiny_model("gpt2")
    attention = model.transformer.h[0].attn
    wk, wv = kv_projections(model)[0]
    hidden = attention.split_size
    assert torch.equal(wk, attention.c_attn.weight.T[hidden : 2 * hidden])
    assert torch.equal(wv, attention.c_attn.weight.T[2 * hidden :])


def test_norm_curves_decay_by_four_per_bit_and_favour_the_larger_norm():
    model = tiny_model("llama")
    norms = weight_norms(model)
    norms.spectral[0] *= 10  # keys with far larger norms than values
    curves = norm_curves(norms, (2, 3, 4))
    np.testing.assert_allclose(curves.values[..., 0] / curves.values[..., 1], 4.0)
    alloc = allocate(curves, Budget.avg_bits(3.0), "layer-kind")
    assert alloc.bits[0].mean() > alloc.bits[1].mean()
