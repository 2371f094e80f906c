"""RULER-style tasks as text: puzzles shaped as RULER's, prompts that place the needles at their depth in corpus text
(deterministic, BOS handling, errors), and answer matching."""

from __future__ import annotations

import random

import pytest
import torch

from ratequant.errors import RateQuantError
from ratequant.evaluation.needles import make_puzzle, make_retrieval_prompt, score_answer
from tests.conftest import tiny_tokenizer

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
