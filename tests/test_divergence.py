import contextlib
import math

import pytest
import torch

from ratequant.evaluation import perplexity
from ratequant.evaluation.divergence import evaluate_conditions

from conftest import tiny_model


@contextlib.contextmanager
def scaled_lm_head(model, factor):
    """A stand-in 'quantized' condition: scale the output logits."""
    weight = model.lm_head.weight
    original = weight.data.clone()
    weight.data.mul_(factor)
    try:
        yield
    finally:
        weight.data.copy_(original)


def test_reference_matches_perplexity_and_kl_is_exact():
    model = tiny_model("llama")
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    results = evaluate_conditions(
        model, windows, {"same": contextlib.nullcontext, "scaled": lambda: scaled_lm_head(model, 3.0)}, progress=False
    )
    reference = perplexity(model, windows, progress=False)
    assert results["full-precision"].ppl == pytest.approx(reference.ppl, rel=1e-9)
    assert results["full-precision"].kl == 0.0 and results["same"].kl == pytest.approx(0.0, abs=1e-6)
    assert results["same"].ppl == pytest.approx(reference.ppl, rel=1e-6)
    # KL computed by hand for the scaled condition
    with torch.no_grad():
        p = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
        with scaled_lm_head(model, 3.0):
            q = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert results["scaled"].kl == pytest.approx(expected, rel=1e-4) and results["scaled"].kl > 0.01
    assert results["scaled"].tokens == 3 * 23
    assert math.isfinite(results["scaled"].ppl) and results["scaled"].ppl != pytest.approx(reference.ppl)
    # the model is back to normal after its condition
    assert perplexity(model, windows, progress=False).ppl == pytest.approx(reference.ppl, rel=1e-9)
