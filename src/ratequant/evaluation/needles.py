"""RULER-style retrieval tasks as text: the puzzles, the prompts that hide them in real text, and answer matching.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", COLM 2024)
extends the passkey test (:mod:`ratequant.evaluation.passkey`) to a family of needle-in-a-haystack tasks. Six
of them, with RULER's wording and default sizes, every prompt generated locally from a seed (nothing is
downloaded) and its haystack cut from the evaluation split of the chosen corpus (real text, not repeated filler):

* ``niah-single`` -- one needle "One of the special magic numbers for <key> is: <7-digit number>.", the key a
  word-like string; ``niah-single-word`` -- the same with a word-like value;
* ``niah-multikey`` -- the asked key among 3 distractor needles of other keys;
* ``niah-multivalue`` -- 4 needles of the same key: all 4 values are asked for;
* ``niah-multiquery`` -- 4 keys asked at once: all 4 values;
* ``variable-tracking`` -- a chain "VAR ABCDE = 12345.", "VAR FGHIJ = ABCDE.", ... (4 hops, 5 variables): every
  variable equal to the value.

A trial's ``depth`` places its first needle at that fraction of the context (token ``depth * context``,
snapped to the nearest line or sentence boundary of the haystack); the other needles of the trial are spread
over the context, ``(depth + i / n) mod 1`` for ``i = 1 .. n - 1`` (a variable chain keeps its order:
``depth + i * (1 - depth) / n``). The prompt is the task description, the haystack with the needles, and the
question, joined by newlines, at most ``context`` tokens (BOS first iff the tokenizer adds one).

A single-answer task is right when the greedy answer starts with the value (exact match); the others when every
expected item is in it (RULER's ``string_match_all``, whose fraction is recorded as ``recall``). Scoring through
a KV cache is :mod:`ratequant.evaluation.retrieval`.

One module of this size because the six tasks share one seeded generator, one prompt layout and one answer
matcher.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import MAX_TEXT_FACTOR, bos_token_id
from ratequant.evaluation.trials import check_context, check_depth
from ratequant.registry import Registry

MULTIKEY_KEYS = 4  # RULER niah_multikey_1: the asked key and 3 distractors
MULTIVALUE_VALUES = 4  # RULER niah_multivalue
MULTIQUERY_QUERIES = 4  # RULER niah_multiquery
CHAIN_HOPS = 4  # RULER vt: num_hops 4 (5 variables), num_chains 1
FIRST, ALL = "first", "all"
"""How an answer is matched: the greedy text starts with the one value, or holds every expected item."""

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------------------------------------
# puzzles: what a task hides and asks, before it meets a tokenizer
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """One sentence to hide, at ``depth`` in ``[0, 1]`` of the context; ``answer`` when it holds an answer item."""

    text: str
    depth: float
    answer: bool


@dataclass(frozen=True)
class Puzzle:
    """A task instance as text: ``head`` (the task description), ``needles``, the ``question`` that ends the
    prompt, the expected ``answers`` in the order the canonical answer lists them, and how they are matched."""

    head: str
    needles: tuple[Needle, ...]
    question: str
    answers: tuple[str, ...]
    match: str

    @property
    def answer_text(self) -> str:
        """The canonical answer, as it follows the question after a space."""
        return ", ".join(self.answers)


@dataclass(frozen=True)
class RetrievalKind:
    """A retrieval task: its registry ``name``, a one-line ``summary``, and ``build(rng, depth) -> Puzzle``."""

    name: str
    summary: str
    build: Callable[[random.Random, float], Puzzle]


KINDS: Registry[RetrievalKind] = Registry("retrieval task")


def _word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _distinct(make: Callable[[], str], n: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < n:
        item = make()
        if item not in seen:
            seen.append(item)
    return seen


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def spread(depth: float, n: int) -> list[float]:
    """``n`` depths evenly spread over the context, the first at ``depth``: ``(depth + i / n) mod 1``."""
    return [depth] + [(depth + i / n) % 1.0 for i in range(1, n)]


def _niah_head(noun: str) -> str:
    return (
        f"Some special magic {noun}s are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {noun}s afterwards."
    )


def _niah_needle(noun: str, key: str, value: str) -> str:
    return f"One of the special magic {noun}s for {key} is: {value}."


def _niah_question(noun: str, query: str) -> str:
    return (
        f"What are all the special magic {noun}s for {query} mentioned in the provided text? "
        f"The special magic {noun}s for {query} mentioned in the provided text are"
    )


def _niah(rng: random.Random, depth: float, *, keys: int, values: int, queries: int, noun: str = "number") -> Puzzle:
    """``keys`` keys of ``values`` values each; the first ``queries`` keys are asked for (RULER's niah family)."""
    value = (lambda: _word(rng)) if noun == "word" else (lambda: _number(rng))
    names = _distinct(lambda: _word(rng), keys)
    items = _distinct(value, keys * values)
    table = {k: items[i * values : (i + 1) * values] for i, k in enumerate(names)}
    # answer needles first (the first of them at ``depth``), then the distractors, all spread over the context
    order = [(k, v) for k in names[:queries] for v in table[k]] + [(k, v) for k in names[queries:] for v in table[k]]
    depths = spread(depth, len(order))
    needles = tuple(Needle(_niah_needle(noun, k, v), d, k in names[:queries]) for (k, v), d in zip(order, depths))
    asked = names[:queries]
    query = asked[0] if queries == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    if values > 1:  # one key's values: listed in the order they appear in the text
        answers = tuple(v for _, v in sorted(zip(depths, table[asked[0]]), key=lambda p: p[0]))
    else:
        answers = tuple(table[k][0] for k in asked)
    match = FIRST if len(answers) == 1 else ALL
    return Puzzle(_niah_head(noun), needles, _niah_question(noun, query), answers, match)


def _variable_tracking(rng: random.Random, depth: float, hops: int = CHAIN_HOPS) -> Puzzle:
    """RULER's variable tracking: ``VAR X1 = value``, then ``VAR X2 = X1`` ... ``hops`` times, in text order."""
    names = _distinct(lambda: "".join(rng.choice(_UPPER) for _ in range(5)), hops + 1)
    value = str(rng.randint(10_000, 99_999))
    texts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = {names[i - 1]}." for i in range(1, hops + 1)]
    depths = [depth + i * (1.0 - depth) / len(texts) for i in range(len(texts))]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above. Answer: According to "
        f"the chain(s) of variable assignment in the text above, {len(names)} variables are assigned the value "
        f"{value}, they are:"
    )
    needles = tuple(Needle(t, d, True) for t, d in zip(texts, depths))
    return Puzzle(head, needles, question, tuple(names), ALL)


for _name, _summary, _build in (
    (
        "niah-single",
        "one needle (a word key, a 7-digit value) hidden in corpus text, asked for at the end (RULER)",
        lambda rng, d: _niah(rng, d, keys=1, values=1, queries=1),
    ),
    (
        "niah-single-word",
        "one needle whose value is a word-like string, hidden in corpus text (RULER)",
        lambda rng, d: _niah(rng, d, keys=1, values=1, queries=1, noun="word"),
    ),
    (
        "niah-multikey",
        f"the asked key's needle among {MULTIKEY_KEYS - 1} distractor keys in corpus text (RULER)",
        lambda rng, d: _niah(rng, d, keys=MULTIKEY_KEYS, values=1, queries=1),
    ),
    (
        "niah-multivalue",
        f"all {MULTIVALUE_VALUES} values of one key, spread over corpus text (RULER)",
        lambda rng, d: _niah(rng, d, keys=1, values=MULTIVALUE_VALUES, queries=1),
    ),
    (
        "niah-multiquery",
        f"{MULTIQUERY_QUERIES} keys asked at once, their needles spread over corpus text (RULER)",
        lambda rng, d: _niah(rng, d, keys=MULTIQUERY_QUERIES, values=1, queries=MULTIQUERY_QUERIES),
    ),
    (
        "variable-tracking",
        f"a chain of {CHAIN_HOPS} variable assignments in corpus text; name every variable equal to the value (RULER)",
        _variable_tracking,
    ),
):
    KINDS.register(RetrievalKind(_name, _summary, _build))


def make_puzzle(kind: str, depth: float, seed: int) -> Puzzle:
    """The puzzle of task ``kind`` with its first needle at ``depth``, drawn from ``random.Random(seed)``."""
    return KINDS.get(kind).build(random.Random(seed), check_depth(depth))


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RetrievalPrompt:
    """One prompt: ``input_ids`` LongTensor ``[1, context]`` and ``answer_ids``, the canonical answer's tokens
    after it. ``needle_positions[i]`` is the token index where ``needles[i]`` (in text order) starts, ``targets[i]``
    the token index its depth asked for; ``context`` is the real length (at most the requested one)."""

    kind: str
    input_ids: torch.Tensor
    answers: tuple[str, ...]
    answer_ids: list[int]
    match: str
    needles: tuple[Needle, ...]
    needle_positions: tuple[int, ...]
    targets: tuple[int, ...]
    depth: float
    bos: bool
    context: int
    seed: int


def _haystack_source(corpus_text: str, rng: random.Random, chars: int) -> str:
    """At least ``chars`` characters of ``corpus_text`` from a paragraph start drawn from ``rng`` (wrapping round)."""
    text = corpus_text.strip()
    if not text:
        raise RateQuantError("the corpus's evaluation split is empty; retrieval tasks hide their needles in it")
    at = text.find("\n\n", rng.randrange(len(text)))
    start = 0 if at < 0 else at + 2
    source = text[start:]
    while len(source) < chars:
        source += "\n\n" + text
    return source[: chars + 1]


def _boundaries(text: str) -> list[int]:
    """Character offsets where a needle may go: the start, after each line break and sentence end, the end."""
    cuts = {0, len(text)}
    cuts.update(m.end() for m in re.finditer(r"\n|(?<=[.!?]) ", text))
    return sorted(cuts)


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assemble(hay: str, places: list[int], needles: Sequence[Needle]) -> tuple[str, list[int]]:
    """``hay`` with ``needles[i]`` inserted at character ``places[i]`` (sorted); ``(text, needle char starts)``."""
    parts, starts, last = [], [], 0
    for at, needle in zip(places, needles):
        parts.append(hay[last:at])
        before = hay[at - 1] if at else "\n"
        lead = "" if before.isspace() else "\n"
        tail = "" if at == len(hay) else (before if before.isspace() else "\n")
        starts.append(sum(map(len, parts)) + len(lead))
        parts.append(lead + needle.text + tail)
        last = at
    parts.append(hay[last:])
    return "".join(parts), starts


def _layout(tokenizer, source, source_offsets, hay_tokens, needles, context, head_tokens, needle_tokens):
    """The haystack of its first ``hay_tokens`` tokens, with each needle at the boundary nearest its target."""
    hay_tokens = max(0, min(hay_tokens, len(source_offsets)))
    hay = source[: source_offsets[hay_tokens - 1][1]] if hay_tokens else ""
    cuts = _boundaries(hay)
    starts = [s for s, _ in source_offsets[:hay_tokens]]
    cut_tokens = [bisect.bisect_left(starts, c) for c in cuts]  # haystack tokens before each boundary
    places, targets, before = [], [], 0
    for needle, n in zip(needles, needle_tokens):
        target = int(round(needle.depth * context))
        want = target - head_tokens - before  # haystack tokens wanted before this needle
        i = bisect.bisect_left(cut_tokens, want)
        options = [j for j in (i - 1, i) if 0 <= j < len(cuts)]
        best = min(options, key=lambda j: (abs(cut_tokens[j] - want), j))
        if places and cuts[best] < places[-1]:  # keep text order (snapping is monotone; guard rounding)
            best = cuts.index(places[-1])
        places.append(cuts[best])
        targets.append(target)
        before += n
    return hay, places, targets


def make_retrieval_prompt(tokenizer, corpus_text: str, kind: str, context: int, depth: float, seed: int):
    """A prompt of task ``kind`` of at most ``context`` tokens, its first needle at ``depth``.

    The puzzle and the haystack's starting paragraph in ``corpus_text`` come from ``seed``, so the prompt depends
    only on ``(tokenizer, corpus_text, kind, context, depth, seed)``. The haystack is filled to within a few
    tokens of ``context``; each needle goes to the line or sentence boundary nearest its target token.
    """
    context = check_context(context)
    depth = check_depth(depth)
    puzzle = make_puzzle(kind, depth, seed)
    rng = random.Random(f"haystack:{seed}")
    bos_id = bos_token_id(tokenizer)
    extra = 0 if bos_id is None else 1
    needles = sorted(puzzle.needles, key=lambda n: n.depth)  # text order (stable: a chain keeps its order)
    head = puzzle.head + "\n"
    tail = "\n" + puzzle.question
    needle_tokens = [len(_encode(tokenizer, "\n" + n.text + "\n")) for n in needles]
    head_tokens = extra + len(_encode(tokenizer, head))
    minimum = head_tokens + len(_encode(tokenizer, tail)) + sum(needle_tokens)
    if context < minimum:
        raise RateQuantError(
            f"{kind} context {context} is too small: the task, needles and question alone take about {minimum} "
            f"tokens with this tokenizer; use context >= {minimum + 16}"
        )
    source = _haystack_source(corpus_text, rng, MAX_TEXT_FACTOR * context + 64)
    source_offsets = _offsets(tokenizer, source)
    if len(source_offsets) < context:  # a tokenizer of more than MAX_TEXT_FACTOR tokens per character...
        source = _haystack_source(corpus_text, rng, 4 * len(source))
        source_offsets = _offsets(tokenizer, source)

    def build(hay_tokens: int):
        hay, places, targets = _layout(
            tokenizer, source, source_offsets, hay_tokens, needles, context, head_tokens, needle_tokens
        )
        body, starts = _assemble(hay, places, needles)
        text = head + body + tail
        return text, [len(head) + s for s in starts], targets, extra + len(_encode(tokenizer, text))

    hay_tokens = context - minimum
    best = None
    for _ in range(12):  # settle the haystack so the prompt ends within a few tokens of ``context``, never above
        built = build(hay_tokens)
        n = built[3]
        if n <= context and (best is None or n > best[3]):
            best = built
        if context - 2 <= n <= context:
            break
        hay_tokens += context - n
    while best is None:
        hay_tokens -= max(1, hay_tokens // 16)
        built = build(max(hay_tokens, 0))
        if built[3] <= context or hay_tokens <= 0:
            best = built
    text, starts, targets, _ = best
    offsets = _offsets(tokenizer, text)
    ids = _encode(tokenizer, text)
    ends = [e for _, e in offsets]
    positions = tuple(extra + bisect.bisect_right(ends, s) for s in starts)  # first token ending past the start
    with_answer = _encode(tokenizer, text + " " + puzzle.answer_text)
    if with_answer[: len(ids)] != ids or len(with_answer) == len(ids):
        raise RateQuantError(
            "this tokenizer does not tokenize the prompt followed by the answer as the prompt's tokens followed by "
            "the answer's; retrieval scoring needs a tokenizer whose tokens do not merge across that boundary"
        )
    answer_ids = [int(t) for t in with_answer[len(ids) :]]
    if bos_id is not None:
        ids = [bos_id] + ids
    if len(ids) > context:
        raise RateQuantError(
            f"{kind} prompt has {len(ids)} tokens, more than the {context} asked for; use a larger context"
        )
    return RetrievalPrompt(
        kind=kind,
        input_ids=torch.tensor([ids], dtype=torch.long),
        answers=puzzle.answers,
        answer_ids=answer_ids,
        match=puzzle.match,
        needles=tuple(needles),
        needle_positions=positions,
        targets=tuple(targets),
        depth=depth,
        bos=bos_id is not None,
        context=len(ids),
        seed=seed,
    )


# ----------------------------------------------------------------------------------------------------------
# answers
# ----------------------------------------------------------------------------------------------------------


_LEAD = re.compile(r"^[^0-9A-Za-z]+")


def answer_line(text: str) -> str:
    """The answer in a continuation: leading blanks and punctuation dropped (a base model often writes ": 123"
    or a line break first), up to the next line break."""
    return _LEAD.sub("", text).split("\n", 1)[0]


def answer_complete(text: str) -> bool:
    """True once a continuation's answer line has ended (a line break after the leading blanks and punctuation)."""
    return "\n" in _LEAD.sub("", text)


def score_answer(expected: Sequence[str], text: str, match: str) -> tuple[bool, float]:
    """``(correct, recall)`` of a greedy ``text`` against the ``expected`` items.

    ``match == "first"``: correct when the text (leading blanks and punctuation dropped) starts with the one
    expected item (exact match, as passkey). ``"all"``: recall is the fraction of items found in the text as whole
    tokens (not inside a longer number or word: "123" is not found in "1234"), correct when all are (RULER's
    ``string_match_all``).
    """
    if not expected:
        raise RateQuantError("an answer needs at least one expected item")
    if match == FIRST:
        ok = _LEAD.sub("", text).startswith(expected[0])
        return ok, float(ok)
    if match != ALL:
        raise RateQuantError(f"answer match must be {FIRST!r} or {ALL!r}, got {match!r}")
    found = [re.search(rf"(?<![0-9A-Za-z]){re.escape(item)}(?![0-9A-Za-z])", text) is not None for item in expected]
    return all(found), sum(found) / len(found)


__all__ = [
    "ALL",
    "FIRST",
    "KINDS",
    "Needle",
    "Puzzle",
    "RetrievalKind",
    "RetrievalPrompt",
    "answer_complete",
    "answer_line",
    "make_puzzle",
    "make_retrieval_prompt",
    "score_answer",
    "spread",
]
