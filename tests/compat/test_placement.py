"""Models spread with a device map: explicit CPU maps and disk offload give the same numbers as one device.

This machine has no GPU, so the maps place modules on ``"cpu"`` and ``"disk"``; what is tested is that every
path (plain forward, capture, simulated quantization, the packed cache, weight norms, the CLI) works through
accelerate's hooks and offloaded weights, which is what a multi-GPU map exercises too.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from ratequant.cache import RateQuantCache
from ratequant.cache.simulate import simulated_quantization
from ratequant.compat import cache_argument, model_geometry
from ratequant.compat.placement import describe_placement, dispatch, input_device, parse_device_map
from ratequant.errors import RateQuantError
from ratequant.measure.capture import capture
from ratequant.measure.weight_norms import weight_norms
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec
from tests.conftest import tiny_model

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture
def pair(tmp_path):
    """(the tiny Llama on one device, a copy of it with two of its three layers offloaded to disk)."""
    model = tiny_model("llama", seed=3, tie_word_embeddings=False)
    spread = dispatch(copy.deepcopy(model), SPLIT, str(tmp_path / "offload"))
    return model, spread


def ids(seed=0, batch=2, tokens=24):
    return torch.randint(0, 300, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def spec_for(model, seed=0):
    bits = np.random.default_rng(seed).integers(2, 5, size=model_geometry(model).shape)
    return KVQuantSpec(bits=bits, quantizer=get_quantizer("kivi", group_size=4), residual_length=4, sink_tokens=1)


def test_offloaded_layers_really_live_on_disk(pair, tmp_path):
    _, spread = pair
    weight = spread.model.layers[1].self_attn.k_proj.weight
    assert weight.device.type == "meta"
    assert any((tmp_path / "offload").iterdir())
    assert input_device(spread) == torch.device("cpu")
    assert describe_placement(spread) == "cpu:5, disk:2"


@torch.no_grad()
def test_forward_and_simulated_quantization_match_one_device(pair):
    model, spread = pair
    x = ids()
    torch.testing.assert_close(spread(x).logits, model(x).logits, rtol=0, atol=1e-5)
    spec = spec_for(model)
    with simulated_quantization(model, spec, prefill_chunk=1):
        want = model(x).logits
    with simulated_quantization(spread, spec, prefill_chunk=1):
        got = spread(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - model(x).logits).abs().max() > 1e-3  # the quantization is really applied


@torch.no_grad()
def test_packed_cache_decodes_the_same_through_offloaded_layers(pair):
    model, spread = pair
    x = ids(1, batch=1, tokens=16)
    spec = spec_for(model, seed=1)
    outs = []
    for m in (model, spread):
        cache = RateQuantCache(spec, model=m)
        steps = [m(x[:, t : t + 1], **cache_argument(m, cache), use_cache=True).logits for t in range(x.shape[1])]
        outs.append(torch.cat(steps, dim=1))
        assert cache.nbytes().total > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_capture_and_weight_norms_read_offloaded_layers(pair):
    model, spread = pair
    x = ids(2)
    want, got = capture(model, x), capture(spread, x)
    for name in ("keys", "values", "queries", "key_grads", "value_grads"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    assert abs(got.loss_sum - want.loss_sum) < 1e-4
    np.testing.assert_allclose(weight_norms(spread).spectral, weight_norms(model).spectral, rtol=1e-12)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("everywhere", "neither one of auto"),
        ("{not json", "not valid JSON"),
        ("{}", "non-empty JSON object"),
        ('{"model.layers.0": "tpu"}', "use 'cpu', 'disk'"),
        ('{"model.layers.0": true}', "use 'cpu', 'disk'"),
        ('{"model.layers.0": 0}', "no CUDA"),
        ('{"model.layers.0": -1}', "0 or more"),
    ],
)
def test_bad_device_maps_are_refused(value, fragment):
    if "no CUDA" in fragment and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RateQuantError, match=fragment):
        parse_device_map(value)


def test_a_map_that_misses_or_invents_modules_is_refused():
    model = tiny_model("llama")
    with pytest.raises(RateQuantError, match="not a module of this model"):
        dispatch(copy.deepcopy(model), {**SPLIT, "model.layers.7": "cpu"})
    partial = {k: v for k, v in SPLIT.items() if k != "lm_head"}
    with pytest.raises(RateQuantError, match="does not place every weight"):
        dispatch(copy.deepcopy(model), partial)


def test_strategies_place_everything_on_this_machine():
    spread = dispatch(tiny_model("llama"), "auto")
    assert set(spread.hf_device_map.values()) <= {"cpu", 0}
    with torch.no_grad():
        assert torch.isfinite(spread(ids()).logits).all()


def test_cli_eval_and_calibrate_with_a_device_map_file(tmp_path, capsys, tiny_model_dir):
    from ratequant.cli import main

    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps(SPLIT))
    common = ["--model", str(tiny_model_dir), "--device-map", str(device_map), "--offload-folder", str(tmp_path / "o")]
    corpus = tmp_path / "corpus.txt"
    paragraph = "Paragraph {}: the quick brown fox jumps over the lazy dog. " * 8
    corpus.write_text("\n\n".join(paragraph.format(*[i] * 8) for i in range(40)))
    plan = tmp_path / "plan.json"
    common += ["--corpus", str(corpus)]
    calibrate = ["calibrate", *common, "--avg-bits", "3", "--seq-len", "32", "--sequences", "2", "--out", str(plan)]
    assert main(calibrate) == 0
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        *common,
        "--plan",
        str(plan),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--residual",
        "0",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu:5, disk:2"
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--device", "cuda", "--device-map", "auto"]) == 2
    assert "--device" in capsys.readouterr().err
