"""RULER-style retrieval: puzzles, prompts (needles at their depth in corpus text), answer scoring, the Wilson
interval, scoring through a cache (agreement with plain greedy decoding), and every registered task end to end."""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from ratequant.compat import cache_argument, model_geometry
from ratequant.data import Corpus
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import FullPrecision, Streaming
from ratequant.evaluation.needles import KINDS, make_puzzle, make_retrieval_prompt, score_answer
from ratequant.evaluation.retrieval import run_retrieval, score_retrieval, trial_seed, wilson_interval
from ratequant.evaluation.tasks import TASKS, RetrievalTask, get_task
from ratequant.models import LoadedModel
from ratequant.prefill import prefill
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec

RETRIEVAL = [name for name in TASKS if isinstance(TASKS.get(name), type) and issubclass(TASKS.get(name), RetrievalTask)]
NEEDLES = {
    "niah-single": 1,
    "niah-single-word": 1,
    "niah-multikey": 4,
    "niah-multivalue": 4,
    "niah-multiquery": 4,
    "variable-tracking": 5,
}
ANSWERS = {**NEEDLES, "niah-multikey": 1}


def haystack(paragraphs: int = 80, seed: int = 0) -> str:
    """Short sentences in the tiny tokenizer's vocabulary (a few tokens a word), blank lines between paragraphs."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize() + "."  # noqa: E731
    return "\n\n".join(
        "\n".join(" ".join(sentence() for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(2, 5)))
        for _ in range(paragraphs)
    )


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    return tiny_tokenizer(bos=True)


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
# puzzles and prompts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(NEEDLES))
def test_puzzle_is_deterministic_and_shaped_as_ruler(kind):
    random.seed(1)
    a = make_puzzle(kind, 0.3, seed=5)
    random.seed(2)
    assert make_puzzle(kind, 0.3, seed=5) == a
    assert make_puzzle(kind, 0.3, seed=6) != a
    assert len(a.needles) == NEEDLES[kind] and len(a.answers) == ANSWERS[kind]
    assert a.needles[0].depth == 0.3 and a.needles[0].answer
    assert sum(n.answer for n in a.needles) == (1 if kind == "niah-multikey" else NEEDLES[kind])
    assert all(0.0 <= n.depth <= 1.0 for n in a.needles)
    for item in a.answers:  # every item is in an answer needle
        assert any(item in n.text for n in a.needles if n.answer)
    if kind.startswith("niah"):
        assert all(n.text.startswith("One of the special magic") for n in a.needles)
        assert a.question.endswith("mentioned in the provided text are")
    if kind in ("niah-single", "niah-multikey", "niah-multivalue", "niah-multiquery"):
        assert all(len(v) == 7 and v.isdigit() for v in a.answers)
    if kind == "niah-single-word":
        assert a.answers[0].isalpha() and a.answers[0].islower()
    if kind == "niah-multivalue":  # listed in text order
        depths = [next(n.depth for n in a.needles if v in n.text) for v in a.answers]
        assert depths == sorted(depths) and depths == pytest.approx([0.05, 0.3, 0.55, 0.8])
    if kind == "variable-tracking":
        value = a.needles[0].text.split("= ")[1].rstrip(".")
        assert a.needles[0].text == f"VAR {a.answers[0]} = {value}." and f"value {value}" in a.question
        for i in range(1, 5):
            assert a.needles[i].text == f"VAR {a.answers[i]} = {a.answers[i - 1]}."
            assert a.needles[i].depth > a.needles[i - 1].depth


@pytest.mark.parametrize("kind", sorted(NEEDLES))
def test_prompt_is_deterministic(tokenizer, text, kind):
    random.seed(1)
    torch.manual_seed(1)
    a = make_retrieval_prompt(tokenizer, text, kind, 700, 0.4, seed=11)
    random.seed(2)
    torch.manual_seed(2)
    b = make_retrieval_prompt(tokenizer, text, kind, 700, 0.4, seed=11)
    assert torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers and a.answer_ids == b.answer_ids
    assert a.needle_positions == b.needle_positions and a.seed == b.seed == 11
    c = make_retrieval_prompt(tokenizer, text, kind, 700, 0.4, seed=12)
    assert c.answers != a.answers and not torch.equal(c.input_ids[:, :600], a.input_ids[:, :600])


def _tokens(tok, s: str) -> int:
    return len(tok(s, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kind", sorted(NEEDLES))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_needles_and_answers_are_in_the_context_at_their_depth(tokenizer, text, kind, depth):
    context = 1024
    p = make_retrieval_prompt(tokenizer, text, kind, context, depth, seed=3)
    ids = p.input_ids[0].tolist()
    assert p.input_ids.shape == (1, p.context) and context - 4 <= p.context <= context
    puzzle = make_puzzle(kind, depth, seed=3)
    decoded = tokenizer.decode(ids)
    assert decoded.startswith(puzzle.head + "\n") and decoded.endswith("\n" + puzzle.question)
    assert len(p.needle_positions) == NEEDLES[kind] == len(p.needles)
    assert list(p.needle_positions) == sorted(p.needle_positions)
    sizes = [_tokens(tokenizer, "\n" + n.text + "\n") for n in p.needles]
    for i, (needle, position, target) in enumerate(zip(p.needles, p.needle_positions, p.targets)):
        # the needle starts at its stated token (the token holding its leading blank, if any)
        assert tokenizer.decode(ids[position:]).lstrip().startswith(needle.text)
        assert needle.text not in tokenizer.decode(ids[position + 1 :]) or kind == "variable-tracking"
        assert target == round(needle.depth * context)
        # ... at its depth where the haystack allows: after the description and the needles before it, before the
        # needles after it and the question; within half a haystack line (~10 tokens here) and the needles' slack
        lo = _tokens(tokenizer, puzzle.head + "\n") + sum(sizes[:i])
        hi = p.context - _tokens(tokenizer, "\n" + puzzle.question) - sum(sizes[i:])
        assert abs(position - min(max(target, lo), hi)) <= 16, (i, position, target, lo, hi)
    for item in p.answers:
        assert item in decoded
    assert tokenizer.decode(p.answer_ids) == " " + ", ".join(p.answers)
    assert tokenizer(decoded + " " + ", ".join(p.answers), add_special_tokens=False)["input_ids"] == ids + p.answer_ids
    assert not p.bos


def test_bos_and_errors(tokenizer, bos_tokenizer, text):
    plain = make_retrieval_prompt(tokenizer, text, "niah-multikey", 800, 0.5, seed=2)
    with_bos = make_retrieval_prompt(bos_tokenizer, text, "niah-multikey", 800, 0.5, seed=2)
    assert with_bos.bos and with_bos.input_ids[0, 0].item() == bos_tokenizer.bos_token_id
    assert (with_bos.input_ids[0] == bos_tokenizer.bos_token_id).sum() == 1
    assert with_bos.answers == plain.answers and with_bos.answer_ids == plain.answer_ids
    ids = with_bos.input_ids[0].tolist()
    for needle, position in zip(with_bos.needles, with_bos.needle_positions):
        assert bos_tokenizer.decode(ids[position:]).lstrip().startswith(needle.text)
    with pytest.raises(RateQuantError, match="too small"):
        make_retrieval_prompt(tokenizer, text, "variable-tracking", 100, 0.5, seed=0)
    with pytest.raises(RateQuantError, match="unknown retrieval task"):
        make_retrieval_prompt(tokenizer, text, "needle", 800, 0.5, seed=0)
    with pytest.raises(RateQuantError, match="depth"):
        make_retrieval_prompt(tokenizer, text, "niah-single", 800, 1.5, seed=0)
    with pytest.raises(RateQuantError, match="empty"):
        make_retrieval_prompt(tokenizer, "  \n\n ", "niah-single", 800, 0.5, seed=0)
    short = make_retrieval_prompt(tokenizer, "The dog.\n\nThe fox.", "niah-single", 600, 0.5, seed=0)
    assert 596 <= short.context <= 600  # a short corpus is repeated to fill the context


# ----------------------------------------------------------------------------------------------------------
# answers and the interval
# ----------------------------------------------------------------------------------------------------------


def test_score_answer_by_hand():
    assert score_answer(["4821937"], "4821937.", "first") == (True, 1.0)
    assert score_answer(["4821937"], "  4821937 is the number", "first") == (True, 1.0)
    assert score_answer(["4821937"], ":\n 4821937", "first") == (True, 1.0)  # leading punctuation skipped
    assert score_answer(["4821937"], "The number is 4821937", "first") == (False, 0.0)
    assert score_answer(["4821937"], "482193", "first") == (False, 0.0)
    values = ["1111111", "2222222", "3333333", "4444444"]
    assert score_answer(values, "4444444, 2222222, 1111111 and 3333333.", "all") == (True, 1.0)
    assert score_answer(values, "1111111, 3333333, 9999999", "all") == (False, 0.5)
    assert score_answer(values, "11111112, 2222222", "all") == (False, 0.25)  # not inside a longer number
    assert score_answer(["ABCDE", "FGHIJ"], "ABCDE, XFGHIJ", "all") == (False, 0.5)
    with pytest.raises(RateQuantError, match="match"):
        score_answer(values, "", "some")


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
    ("residual", "caches"),
    # None: a DynamicCache, rolled back exactly; 8: quantized chunks are cut by the roll-back, so the prompt is
    # prefilled again; 128: the sinks leave whole chunks before the answer, which then stays in the residual window
    [(None, 1), (8, 2), (128, 1)],
)
def test_scoring_agrees_with_plain_teacher_forcing_and_greedy_decoding(model, tokenizer, text, kind, residual, caches):
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
    assert len(made) == caches and not trial.correct  # a random model misses, so greedy decoding went on
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
    """A stand-in cache: the tokens it has seen (``crop`` drops the last ones, as a cache does)."""

    def __init__(self):
        self.tokens: list[int] = []

    def get_seq_length(self) -> int:
        return len(self.tokens)

    def crop(self, n: int) -> None:
        del self.tokens[n:]


class _NoCrop(_Tape):
    crop = None


class _Scripted(torch.nn.Module):
    """A fake causal LM that, after ``prompt_len`` tokens, puts logit 10 on ``script[step]`` (``step`` counted
    from the cache's tokens, so rolling back the cache rolls back the script)."""

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


@pytest.mark.parametrize("cache", [_Tape, _NoCrop])
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
