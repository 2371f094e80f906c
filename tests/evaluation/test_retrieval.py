"""RULER-style retrieval through a cache: the Wilson interval, scoring through a cache (agreement with plain greedy
decoding), and every registered task end to end (the tasks' text: tests/evaluation/test_needles.py)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from ratequant.cache.prefill import prefill
from ratequant.compat import cache_argument, model_geometry
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import FullPrecision, Streaming
from ratequant.evaluation.needles import KINDS, make_retrieval_prompt, score_answer
from ratequant.evaluation.retrieval import run_retrieval, score_retrieval, wilson_interval
from ratequant.evaluation.tasks import TASKS, RetrievalTask, get_task
from ratequant.evaluation.trials import trial_seed
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec
from tests.conftest import tiny_model, tiny_tokenizer
from tests.evaluation.test_needles import ANSWERS, NEEDLES, haystack

RETRIEVAL = [name for name in TASKS if isinstance(TASKS.get(name), type) and issubclass(TASKS.get(name), RetrievalTask)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def text():
    return haystack()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", max_position_embeddings=2048)


def test_every_kind_is_a_registered_task():
    assert sorted(RETRIEVAL) == sorted(KINDS) == sorted(NEEDLES)
    for name in RETRIEVAL:
        task = get_task(name, context=1024, trials=1)
        assert task.name == name and task.summary == KINDS.get(name).summary
    with pytest.raises(RateQuantError, match="niah-single trials"):
        get_task("niah-single", trials=0)
    with pytest.raises(RateQuantError, match="variable-tracking depth"):
        get_task("variable-tracking", depths=(0.5, 1.5))


# ----------------------------------------------------------------------------------------------------------
# the interval
# ----------------------------------------------------------------------------------------------------------


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: center (0.8 + 0.19208) / 1.38416, half 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4901625, abs=1e-6) and high == pytest.approx(0.9433178, abs=1e-6)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(0, 5)[1] == pytest.approx(0.4344825, abs=1e-6)
    assert wilson_interval(5, 5) == pytest.approx((1 - 0.4344825, 1.0), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.4038315, 0.5961685), abs=1e-6)
    for args in ((1, 0), (3, 2), (-1, 4)):
        with pytest.raises(RateQuantError):
            wilson_interval(*args)


# ----------------------------------------------------------------------------------------------------------
# scoring through a cache
# ----------------------------------------------------------------------------------------------------------


def spec_for(model, residual: int, sinks: int = 1) -> KVQuantSpec:
    bits = np.random.default_rng(1).integers(2, 5, size=model_geometry(model).shape)
    return KVQuantSpec(bits, get_quantizer("kivi", group_size=4), residual_length=residual, sink_tokens=sinks)


def _plain(model, prompt, make_cache, chunk, tok, budget) -> tuple[float, str]:
    """Teacher-forced answer log-prob and greedy first line, each from its own fresh cache, step by step."""
    from ratequant.evaluation.conditions import forward_log_probs

    def step(cache, token):
        return forward_log_probs(model, torch.tensor([[token]]), 1, **cache_argument(model, cache), use_cache=True)[0]

    with torch.inference_mode():
        cache = make_cache()
        logprobs, total = torch.log_softmax(prefill(model, prompt.input_ids, cache, chunk)[0], -1), 0.0
        for i, token in enumerate(prompt.answer_ids):
            logprobs = step(cache, prompt.answer_ids[i - 1]) if i else logprobs
            total += float(logprobs[token])
        cache = make_cache()
        greedy = [int(prefill(model, prompt.input_ids, cache, chunk)[0].argmax())]
        line = lambda: re.sub(r"^[^0-9A-Za-z]+", "", tok.decode(greedy))  # noqa: E731
        while len(greedy) < budget and "\n" not in line():
            greedy.append(int(step(cache, greedy[-1]).argmax()))
    return total, line().split("\n", 1)[0]


@pytest.mark.parametrize("kind", ["niah-multivalue", "variable-tracking"])
@pytest.mark.parametrize(
    "residual",
    # None: a DynamicCache; 8: quantized chunks fill while the answer is read; 128: the answer stays in the
    # residual window. Greedy decoding goes on from a copy of the cache, never from a second prefill.
    [None, 8, 128],
)
def test_scoring_agrees_with_plain_teacher_forcing_and_greedy_decoding(model, tokenizer, text, kind, residual):
    from transformers import DynamicCache

    from ratequant.cache import RateQuantCache

    prompt = make_retrieval_prompt(tokenizer, text, kind, 640, 0.5, seed=4)
    chunk, made = 16, []
    if residual is None:
        base = DynamicCache
    else:
        spec = spec_for(model, residual, sinks=prompt.context % 128 if residual == 128 else 1)
        base = lambda: RateQuantCache(spec, model=model)  # noqa: E731

    def make():
        made.append(base())
        return made[-1]

    trial = score_retrieval(model, prompt, make, prefill_chunk=chunk, tokenizer=tokenizer, max_new_tokens=24)
    assert len(made) == 1 and not trial.correct  # a random model misses, so greedy decoding went on
    logprob, greedy = _plain(model, prompt, base, chunk, tokenizer, 24)
    assert trial.logprob == pytest.approx(logprob, abs=1e-4) and math.isfinite(trial.logprob)
    assert trial.greedy_text == greedy
    assert (trial.correct, trial.recall) == score_answer(prompt.answers, greedy, prompt.match)
    assert trial.mean_token_logprob == pytest.approx(trial.logprob / len(prompt.answer_ids))
    assert trial.answer_tokens == len(prompt.answer_ids) and trial.needle_positions == prompt.needle_positions
    if residual is None:  # without a cache: one full forward pass gives the same teacher-forced log-prob
        ids = torch.cat([prompt.input_ids, torch.tensor([prompt.answer_ids])], dim=1)
        with torch.inference_mode():
            rows = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        n = prompt.context
        reference = sum(rows[n - 1 + i, t].item() for i, t in enumerate(prompt.answer_ids))
        assert trial.logprob == pytest.approx(reference, abs=1e-4)


class _Tape:
    """A stand-in cache: the tokens it has seen."""

    def __init__(self):
        self.tokens: list[int] = []

    def get_seq_length(self) -> int:
        return len(self.tokens)


class _NoCopy(_Tape):
    """A cache that cannot be copied: greedy decoding goes on from a second prefill."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot copy")


class _Scripted(torch.nn.Module):
    """A fake causal LM that, after ``prompt_len`` tokens, puts logit 10 on ``script[step]`` (``step`` counted
    from the cache's tokens, so a copy of the cache or a second prefill follows the script from there)."""

    def __init__(self, prompt_len: int, script: list[int], vocab: int = 300):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_position_embeddings": 1 << 20})()
        self.prompt_len, self.script, self.vocab = prompt_len, script, vocab

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        cache.tokens += input_ids[0].tolist()
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        step = len(cache.tokens) - self.prompt_len
        logits[0, -1, self.script[step] if 0 <= step < len(self.script) else 1] = 10.0  # 1 = EOS after it
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("cache", [_Tape, _NoCopy])
def test_greedy_answer_in_another_order_is_right_and_a_wrong_value_is_partial(tokenizer, text, cache):
    prompt = make_retrieval_prompt(tokenizer, text, "niah-multivalue", 640, 0.5, seed=9)
    a = prompt.answers
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    lse = math.log(math.exp(10.0) + 299)
    # the same values in another order: teacher forcing misses at once, greedy decoding still names all four
    script = enc(" " + ", ".join([a[1], a[0], a[2], a[3]]) + "\nmore")
    trial = score_retrieval(_Scripted(prompt.context, script), prompt, cache, tokenizer=tokenizer)
    assert trial.correct and trial.recall == 1.0 and trial.greedy_text == ", ".join([a[1], a[0], a[2], a[3]])
    hits = sum(s == t for s, t in zip(script, prompt.answer_ids))
    assert trial.logprob == pytest.approx(-lse * len(prompt.answer_ids) + 10.0 * hits, abs=1e-3)
    # one value wrong: three of four found
    script = enc(" " + ", ".join([a[0], a[1], "1234567", a[3]]))
    trial = score_retrieval(_Scripted(prompt.context, script), prompt, cache, tokenizer=tokenizer)
    assert not trial.correct and trial.recall == 0.75 and trial.greedy_text == ", ".join([a[0], a[1], "1234567", a[3]])
    # the answer itself: right, log-prob the best the script allows
    trial = score_retrieval(_Scripted(prompt.context, prompt.answer_ids), prompt, cache, tokenizer=tokenizer)
    assert trial.correct and trial.logprob == pytest.approx((10.0 - lse) * len(prompt.answer_ids), abs=1e-3)


def test_single_needle_is_exact_match(tokenizer, text):
    prompt = make_retrieval_prompt(tokenizer, text, "niah-single", 500, 0.2, seed=1)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    right = score_retrieval(
        _Scripted(prompt.context, enc(f" {prompt.answers[0]}.")), prompt, _Tape, tokenizer=tokenizer
    )
    assert right.correct and right.recall == 1.0
    late = score_retrieval(
        _Scripted(prompt.context, enc(f" it is {prompt.answers[0]}")), prompt, _Tape, tokenizer=tokenizer
    )
    assert not late.correct and late.greedy_text.startswith("it is")


# ----------------------------------------------------------------------------------------------------------
# runs and tasks
# ----------------------------------------------------------------------------------------------------------


def test_run_retrieval_summary_and_json(model, tokenizer, text):
    result = run_retrieval(
        model, tokenizer, text, kind="niah-multiquery", context=700, depths=(0.2, 0.8), trials=2, seed=4
    )
    detail = result.trials_detail
    assert result.task == "niah-multiquery" and result.context == 700 and result.trials == 4
    assert [t.seed for t in detail] == [trial_seed("niah-multiquery", 4, i, j) for i in range(2) for j in range(2)]
    assert [t.depth for t in detail] == [0.2, 0.2, 0.8, 0.8]
    assert result.accuracy == sum(t.correct for t in detail) / 4
    assert (result.accuracy_low, result.accuracy_high) == wilson_interval(sum(t.correct for t in detail), 4)
    assert result.recall == pytest.approx(sum(t.recall for t in detail) / 4)
    assert result.mean_token_logprob == pytest.approx(sum(t.mean_token_logprob for t in detail) / 4)
    assert result.per_depth[0.8]["mean_logprob"] == pytest.approx(sum(t.logprob for t in detail[2:]) / 2)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == result.to_dict() and set(data["per_depth"]) == {"0.2", "0.8"}
    with pytest.raises(RateQuantError, match="distinct"):
        run_retrieval(model, tokenizer, text, kind="niah-single", context=700, depths=(0.5, 0.5))
    with pytest.raises(RateQuantError, match="max_position_embeddings"):
        run_retrieval(model, tokenizer, text, kind="niah-single", context=4096, depths=(0.5,))


@pytest.mark.parametrize("name", RETRIEVAL)
def test_every_task_runs_end_to_end_through_the_cache(name, text):
    model = tiny_model("llama", max_position_embeddings=2048)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", "memory", model_geometry(model))
    corpus = Corpus("test", haystack(10, seed=1), text)
    task = get_task(name, context=640, depths=(0.25, 0.75), trials=1, seed=2, prefill_chunk=16)
    conditions = {"full-precision": FullPrecision(), "plan": Streaming(spec_for(model, residual=8))}
    outcome = task.run(loaded, corpus, conditions, progress=False)
    data = json.loads(json.dumps(outcome.to_dict()))
    assert data["task"] == name and data["context"] == 640 and data["trials_per_depth"] == 1
    assert data["depths"] == [0.25, 0.75] and data["corpus"] == "test" and set(data["results"]) == set(conditions)
    for result in outcome.scores.values():
        assert result.task == name and result.trials == 2 and len(result.trials_detail) == 2
        assert result.accuracy_low <= result.accuracy <= result.accuracy_high
        assert set(result.per_depth) == {0.25, 0.75} and all(s["trials"] == 1 for s in result.per_depth.values())
        for t in result.trials_detail:
            assert len(t.needle_positions) == NEEDLES[name] and len(t.answers) == ANSWERS[name]
            assert 636 <= t.context <= 640 and t.logprob < 0 and 0.0 <= t.recall <= 1.0
            assert t.mean_token_logprob * t.answer_tokens == pytest.approx(t.logprob)
            assert not t.correct or t.recall == 1.0
    full, plan = outcome.scores["full-precision"], outcome.scores["plan"]
    assert [t.answers for t in full.trials_detail] == [t.answers for t in plan.trials_detail]
    assert full.mean_logprob != pytest.approx(plan.mean_logprob, abs=1e-4)  # the plan's cache changes the numbers


def test_the_eval_command_runs_every_retrieval_task(tmp_path, tiny_model_dir, capsys):
    """``ratequant eval --task NAME`` for a retrieval task: its settings, one summary line, the JSON record."""
    import json

    from ratequant.cli import main

    corpus = tmp_path / "text.txt"
    corpus.write_text(haystack())
    out = tmp_path / "niah.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--task", "niah-single"]
    assert main([*argv, "--context", "400", "--depths", "0.5", "--trials", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "niah-single at 400 tokens (full-precision): accuracy" in printed and "95%" in printed
    record = json.loads(out.read_text())
    assert record["task"] == "niah-single" and record["trials"] == 1 and 0.0 <= record["accuracy"] <= 1.0
    assert main([*argv, "--windows", "3"]) == 2
    assert "niah-single takes --context" in capsys.readouterr().err
