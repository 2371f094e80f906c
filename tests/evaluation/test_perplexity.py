import contextlib
import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ratequant.cache import RateQuantCache
from ratequant.compat import model_geometry
from ratequant.evaluation import REFERENCE, Within, perplexity, score_conditions
from ratequant.evaluation.protocol import WindowProtocol, Windows
from ratequant.spec import KVQuantSpec
from tests.cache.helpers import DTYPES, KIVI4, generate, ids_of, make_plan, mixed_bits
from tests.conftest import tiny_model


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


def windows_of(ids: torch.Tensor, scoring: str = "all") -> Windows:
    return Windows(ids, WindowProtocol(ids.shape[1], ids.shape[0], "no", scoring), None)


def by_hand(model, ids, first, factor=None):
    """Per-token NLL and KL against full precision for predictions of tokens first..S-1, computed directly."""
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits[:, first - 1 : -1].float(), -1)
        with scaled_lm_head(model, factor) if factor else contextlib.nullcontext():
            q = torch.log_softmax(model(ids).logits[:, first - 1 : -1].float(), -1)
    nll = -q.gather(-1, ids[:, first:, None]).squeeze(-1)
    return nll, (p.exp() * (p - q)).sum(-1)


def test_reference_matches_perplexity_and_kl_is_exact():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    windows = windows_of(ids)
    conditions = {"same": Within(contextlib.nullcontext), "scaled": Within(lambda: scaled_lm_head(model, 3.0))}
    results = score_conditions(model, windows, conditions, progress=False)["all"]
    reference = perplexity(model, windows, progress=False)
    assert list(results) == [REFERENCE, "same", "scaled"]
    assert results[REFERENCE].ppl == pytest.approx(reference.ppl, rel=1e-9)
    assert results[REFERENCE].kl == 0.0 and results["same"].kl == pytest.approx(0.0, abs=1e-6)
    assert results["same"].ppl == pytest.approx(reference.ppl, rel=1e-6) and results["same"].top1 == 1.0
    nll, kl = by_hand(model, ids, 1, 3.0)
    scaled = results["scaled"]
    assert scaled.kl == pytest.approx(kl.mean().item(), rel=1e-4) and scaled.kl > 0.01
    assert scaled.kl_se == pytest.approx((kl.std() / math.sqrt(kl.numel())).item(), rel=1e-3)
    assert scaled.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert scaled.tokens == 3 * 23 and len(scaled.window_kl) == 3
    assert scaled.window_kl == pytest.approx(kl.mean(dim=1).tolist(), rel=1e-4)
    assert math.isfinite(scaled.ppl) and scaled.ppl != pytest.approx(reference.ppl)
    # the model is back to normal after its condition
    assert perplexity(model, windows, progress=False).ppl == pytest.approx(reference.ppl, rel=1e-9)


def test_second_half_scores_the_second_half_from_the_same_passes():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    conditions = {"scaled": Within(lambda: scaled_lm_head(model, 2.0))}
    both = score_conditions(
        model, windows_of(ids, "second-half"), conditions, scorings=("all", "second-half"), progress=False
    )
    nll, kl = by_hand(model, ids, 16, 2.0)
    half = both["second-half"]["scaled"]
    assert half.tokens == 2 * 16
    assert half.kl == pytest.approx(kl.mean().item(), rel=1e-4)
    assert half.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert both["all"]["scaled"].tokens == 2 * 31
    alone = score_conditions(model, windows_of(ids, "second-half"), conditions, progress=False)
    assert list(alone) == ["second-half"] and alone["second-half"]["scaled"].kl == pytest.approx(half.kl, rel=1e-9)


def test_scoring_records_no_autograd_graph():
    """Every pass runs without autograd: a graph kept across windows would hold every window's activations."""
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    seen = []

    @contextlib.contextmanager
    def recording():
        seen.append(torch.is_grad_enabled())
        yield

    assert any(p.requires_grad for p in model.parameters())
    score_conditions(model, windows_of(ids), {"probe": Within(recording)}, progress=False)
    assert seen == [False, False]


@pytest.mark.parametrize("residual", [0, 8, 32])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("prefill_chunk", [1, 16])
def test_quantized_predictions_agree_with_the_simulation_masks(residual, sinks, prefill_chunk):
    """The count eval prints (predictions that read quantized storage) against the masks simulated quantization
    applies: a scored query counts when either of its masks has a key or value in quantized storage."""
    import numpy as np

    from ratequant.cache.simulate import quantized_masks
    from ratequant.evaluation.conditions import quantized_predictions
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    spec = KVQuantSpec(np.full((2, 1, 1), 2), get_quantizer("kivi", group_size=8), residual, sinks)
    if prefill_chunk != 1 and any(prefill_chunk % f and f % prefill_chunk for f in spec.chunks):
        pytest.skip("a prefill chunk the spec refuses")
    for seq_len in (2, 9, 40, 64):
        keys, values = quantized_masks(seq_len, seq_len, spec.policy, "cpu", prefill_chunk)
        reads = (keys | values).any(dim=1)
        for first in (1, seq_len // 2):
            expected = int(reads[first - 1 : seq_len - 1].sum())
            assert quantized_predictions(spec, seq_len, first, prefill_chunk) == expected, (seq_len, first)
    # the first query that reads quantized storage sits one chunk after the sinks: a window ending before it has none
    first_chunk = min(max(f, prefill_chunk) for f in spec.chunks)
    assert quantized_predictions(spec, sinks + first_chunk + 1, 1, prefill_chunk) == 0
    assert quantized_predictions(spec, sinks + first_chunk + 2, 1, prefill_chunk) == 1


# float16, bfloat16 and float32 models: streaming equals simulated evaluation in perplexity to within the dtype's
# own rounding noise (the logits and the cache: tests/cache/test_layer.py)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_models_in_every_dtype_generate_and_evaluate(dtype):
    from ratequant.evaluation import Simulated, Streaming, WindowProtocol, Windows, score_conditions

    model = tiny_model("llama", seed=2).to(dtype)
    g = model_geometry(model)
    ids = ids_of(8, seed=2)
    eight = np.full(g.shape, 8)
    assert torch.equal(
        generate(model, ids, RateQuantCache(KVQuantSpec(eight, KIVI4, 4)), n=12),
        generate(model, ids, DynamicCache(config=model.config), n=12),
    )
    bits = mixed_bits(model, seed=2)
    plan = make_plan(model, bits, KIVI4)
    windows = Windows(ids_of(24, batch=2, seed=3), WindowProtocol(24, 2), None)
    spec = plan.resolve(model)
    scores = score_conditions(model, windows, {"sim": Simulated(spec), "stream": Streaming(spec)}, progress=False)[
        "all"
    ]
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert scores["stream"].ppl == pytest.approx(scores["sim"].ppl, rel=tolerance)
    assert math.isfinite(scores["sim"].ppl) and scores["sim"].tokens == scores["stream"].tokens == 2 * 23
