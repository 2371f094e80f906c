"""The long-context section of a comparison: which conditions it runs, the paired log-probability change, the
peer cache and the checks made before any work."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ratequant.cache.prefill import DEFAULT_PREFILL_CHUNK
from ratequant.compat import cache_argument, model_geometry
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import FullPrecision, PeerCache, Simulated
from ratequant.evaluation.tasks import get_task
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.lab.config import CompareConfig
from ratequant.lab.long_context import (
    HQQ_TOKEN_MULTIPLE,
    hqq_cache_factory,
    pad_quantized_tokens,
    paired_change,
    study_methods,
    study_tasks,
    two_bit_condition,
)
from ratequant.lab.methods import Method
from ratequant.lab.report.tables import long_context_of, long_context_table
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec
from tests.conftest import tiny_model, tiny_tokenizer
from tests.evaluation.test_needles import haystack


def trial(depth: float, seed: int, logprob: float, correct: bool = True) -> dict:
    return {"depth": depth, "seed": seed, "logprob": logprob, "correct": correct}


def test_paired_change_by_hand():
    reference = [trial(0.1, 1, -1.0), trial(0.5, 2, -2.0), trial(0.9, 3, -0.5)]
    # changes -0.5, -1.0, 0.0 (the prompt of seed 4 has no reference and is left out): mean -0.5,
    # sample standard deviation 0.5, standard error 0.5 / sqrt(3)
    trials = [trial(0.1, 1, -1.5), trial(0.5, 2, -3.0), trial(0.9, 3, -0.5), trial(0.9, 4, -9.0)]
    change = paired_change(trials, reference)
    assert change["prompts"] == 3
    assert change["mean"] == pytest.approx(-0.5) and change["se"] == pytest.approx(0.5 / math.sqrt(3))
    assert paired_change(trials[:1], reference) == {"mean": pytest.approx(-0.5), "se": 0.0, "prompts": 1}
    assert paired_change(trials, [])["prompts"] == 0 and math.isnan(paired_change(trials, [])["mean"])


def method(name: str, label: str, budget: float, widths: tuple[int, int], design: str = "kivi") -> Method:
    bits = np.zeros((2, 2, 2), dtype=int)
    bits[0], bits[1] = widths
    spec = KVQuantSpec(bits, get_quantizer(design), residual_length=128)
    return Method(name, label, design, budget, sum(widths) / 2, widths[0], widths[1], 1.0, Simulated(spec), bits=bits)


def test_the_study_runs_the_best_fixed_split_ratequant_the_default_plan_and_2_bits():
    methods = [
        method("uniform", "uniform 2", 2.0, (2, 2)),
        k3v2 := method("kv-split", "K3V2", 2.5, (3, 2)),
        method("kv-split", "K2V3", 2.5, (2, 3)),
        rq := method("ratequant", "RateQuant", 2.5, (3, 2)),
        default := method("default", "default plan (RateQuant)", 2.5, (3, 2)),
        method("layerwise", "layerwise", 2.5, (2, 3)),
        method("kv-split", "K3V2", 2.5, (3, 2), design="uniform"),
    ]
    kl = dict.fromkeys(methods, 0.1) | {k3v2: 0.05}
    config = CompareConfig(budgets=(2.0, 2.5), designs=("kivi", "uniform"), long_context_budgets=(2.5,))
    chosen = study_methods(config, methods, kl)
    assert [(role, m.label) for role, m in chosen] == [
        ("best fixed", "K3V2"),
        ("ratequant", "RateQuant"),
        ("default", "default plan (RateQuant)"),
    ]
    assert chosen[1][1] is rq and chosen[2][1] is default and all(m.design == "kivi" for _, m in chosen)
    kl[methods[2]] = 0.01  # K2V3 now has the least KL
    assert study_methods(config, methods, kl)[0][1].label == "K2V3"
    # the 2-bit budget's own method runs as the 2-bit row
    assert two_bit_condition(config, methods, chosen) == ("uniform 2 (2 bits)", methods[0].condition)
    # without a 2-bit budget the study stores the design's uniform 2 bits as its other conditions are
    config = CompareConfig.from_options(
        budgets=(2.5, 3.0), designs=("kivi",), long_context_budgets=(2.5,), sink_tokens=4
    )
    chosen = study_methods(config, methods[1:], kl)
    label, condition = two_bit_condition(config, methods[1:], chosen)
    spec = condition.spec
    assert label == "uniform 2 (2 bits)" and isinstance(condition, Simulated) and (spec.bits == 2).all()
    assert spec.policy == k3v2.condition.spec.policy and spec.quantizer.name == "kivi"
    assert two_bit_condition(config, methods[1:], []) is None


def test_bad_long_context_settings_are_refused_in_one_line(monkeypatch):
    for tasks in (("perplexity",), ("passkey", "passkey"), ("niah-everything",), ()):
        with pytest.raises(RateQuantError, match="long_context_tasks must be distinct names among passkey"):
            CompareConfig(long_context_tasks=tasks)
    assert study_tasks(CompareConfig(peers=("hqq",))) == []  # the study is off: nothing to check
    monkeypatch.setitem(sys.modules, "hqq", None)  # import hqq now raises ImportError
    with pytest.raises(RateQuantError, match=r"the hqq peer needs the hqq package: pip install -e '\.\[bench\]'"):
        study_tasks(CompareConfig(peers=("hqq",), long_context_tokens=512, long_context_budgets=(2.0,)))
    tasks = study_tasks(
        CompareConfig(long_context_tokens=512, long_context_budgets=(2.0,), long_context_tasks=("niah-single",))
    )
    assert [(t.name, t.context, t.prefill_chunk) for t in tasks] == [("niah-single", 512, DEFAULT_PREFILL_CHUNK)]


def test_a_peer_cache_runs_the_retrieval_tasks_as_its_own_cache_does():
    """A peer condition decodes through the cache it makes: with ``DynamicCache`` it is full precision exactly."""
    model = tiny_model("llama", max_position_embeddings=1024)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", "memory", model_geometry(model))
    corpus = Corpus("test", haystack(10, seed=1), haystack())
    made = []

    def make_cache():
        made.append(DynamicCache())
        return made[-1]

    task = get_task("niah-single", context=400, depths=(0.5,), trials=2, prefill_chunk=64)
    outcome = task.run(loaded, corpus, {"fp": FullPrecision(), "peer": PeerCache(make_cache)}, progress=False)
    full, peer = outcome.scores["fp"], outcome.scores["peer"]
    assert len(made) >= 2  # a fresh cache per prompt
    assert [t.logprob for t in peer.trials_detail] == pytest.approx([t.logprob for t in full.trials_detail], abs=1e-5)
    window = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))  # one pass through it
    expected = FullPrecision().log_probs(model, window, 20)
    assert PeerCache(DynamicCache).log_probs(model, window, 20).sub(expected).abs().max() < 1e-4


def test_the_report_reads_results_saved_with_a_passkey_study():
    detail = [trial(0.5, 7, -0.2), trial(0.5, 8, -0.4, correct=False)]
    old = {"settings": {"context": 4096, "depths": [0.5], "trials_per_depth": 2, "seed": 0}, "results": {}}
    old["results"]["full precision"] = {"trials": 2, "mean_logprob": -0.3, "trials_detail": detail}
    worse = [trial(0.5, 7, -1.2, correct=False), trial(0.5, 8, -0.4, correct=False)]
    old["results"]["uniform 2 (2 bits)"] = {"trials": 2, "mean_logprob": -0.8, "trials_detail": worse}
    study = long_context_of(SimpleNamespace(extra={"passkey": old}))
    assert list(study["tasks"]) == ["passkey"] and study["settings"]["context"] == 4096
    table = long_context_table(study, "passkey")
    assert "| full precision |  | 50% (9%–91%) | -0.300 | — | 2 |" in table
    assert "| uniform 2 (2 bits) |  | 0% (0%–66%) | -0.800 | -0.500 ± 0.500 | 2 |" in table
    assert long_context_of(SimpleNamespace(extra={})) is None


def test_the_command_line_sets_the_tasks_and_the_peer():
    """``--long-context-tasks`` and ``--peers hqq`` make the config, and the config's command gives them back."""
    import argparse
    import shlex

    from ratequant.cli.compare import config_from, configure_compare

    parser = argparse.ArgumentParser()
    configure_compare(parser)
    line = "--passkey-context 4096 --long-context-tasks passkey,niah-multikey --peers hqq --out out"
    config = config_from(parser.parse_args(shlex.split(line)))
    assert config.long_context_tasks == ("passkey", "niah-multikey") and config.peers == ("hqq",)
    assert config.command("out") == (
        "ratequant compare --long-context 4096 --peers hqq --long-context-tasks passkey,niah-multikey --out out"
    )  # the old name of --long-context still reads


def test_a_peer_that_fails_gets_a_row_saying_so_and_the_study_goes_on(monkeypatch):
    import types

    from ratequant.lab import long_context
    from ratequant.progress import Stages

    model = tiny_model("llama", max_position_embeddings=1024)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", "memory", model_geometry(model))
    corpus = Corpus("test", haystack(10, seed=1), haystack())

    def refuses():
        raise RuntimeError("The size of tensor a (3070) must match the size of tensor b (3072)\nmore lines")

    monkeypatch.setitem(sys.modules, "hqq", types.ModuleType("hqq"))
    monkeypatch.setattr(long_context, "hqq_cache_factory", lambda loaded, residual: refuses)
    config = CompareConfig(long_context_tokens=400, long_context_depths=(0.5,), long_context_trials=1,
                           long_context_budgets=(2.0,), long_context_tasks=("niah-single",), peers=("hqq",),
                           prefill_chunk=64)  # fmt: skip
    study = long_context.long_context_study(loaded, corpus, config, [], {}, Stages(False))
    results = study["tasks"]["niah-single"]["results"]
    assert results["HF QuantizedCache HQQ 2-bit"] == {
        "error": "RuntimeError: The size of tensor a (3070) must match the size of tensor b (3072)"
    }
    assert results["full precision"]["trials"] == 1 and results["full precision"]["logprob_change"]["mean"] == 0
    table = long_context_table(study, "niah-single")
    assert "| HF QuantizedCache HQQ 2-bit | peer | failed | — | RuntimeError: The size of tensor a" in table


class _FourRows:
    """A stand-in quantized cache layer that, like hqq's 2-bit packing, fails on a token count not divisible by 4."""

    def _quantize(self, tensor, axis):
        if tensor.shape[-2] % 4:
            raise RuntimeError("The size of tensor a (22) must match the size of tensor b (24)")
        return tensor.round()

    def _dequantize(self, stored):
        return stored


def test_the_peer_layers_quantize_any_number_of_tokens_padded_to_a_multiple_of_four():
    layer = _FourRows()
    pad_quantized_tokens(layer, HQQ_TOKEN_MULTIPLE)
    for n in (1, 4, 6, 30):
        x = torch.randn(1, 3, n, 8) * 4
        assert torch.equal(layer._dequantize(layer._quantize(x, 1)), x.round())  # the real tokens, nothing more


def test_the_hqq_peer_runs_on_sequence_lengths_hqq_alone_refuses():
    pytest.importorskip("hqq")
    model = tiny_model("llama", num_key_value_heads=3, num_attention_heads=3, head_dim=64, hidden_size=192)
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    make = hqq_cache_factory(SimpleNamespace(model=model), residual=8)
    bare = make()
    for layer in bare.layers:  # the layers as transformers makes them
        del layer._quantize, layer._dequantize
    with torch.inference_mode(), pytest.raises(RuntimeError):
        model(ids, **cache_argument(model, bare), use_cache=True)
    cache = make()
    with torch.inference_mode():
        logits = model(ids, **cache_argument(model, cache), use_cache=True).logits
        step = model(ids[:, :1], **cache_argument(model, cache), use_cache=True).logits
    assert torch.isfinite(logits).all() and torch.isfinite(step).all() and cache.get_seq_length() == 31
