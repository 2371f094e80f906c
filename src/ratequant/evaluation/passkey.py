"""Passkey retrieval: a 5-digit key hidden in filler text, asked for at the end.

The long-context check that KIVI (Liu et al., ICML 2024) and KVQuant (Hooper et al., NeurIPS 2024) report
for quantized KV caches, in the wording of Landmark Attention (Mohtashami and Jaggi, 2023) that they ship:
a task description, the filler "The grass is green. The sky is blue. ..." repeated, the needle "The pass
key is 71432. Remember it. 71432 is the pass key." at a chosen depth, more filler, and the question "What
is the pass key? The pass key is", joined by newlines. Prompts are generated deterministically from a seed
for a given tokenizer (nothing is downloaded) and fit the requested context in tokens.

Scoring runs the prompt through a real KV cache (prefilled whole or in chunks), then teacher-forces the key
one token at a time through the same cache: the summed log-probability of the key's tokens, and whether
the argmax at every key position is the key token (exactly what greedy decoding producing the key means).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ratequant.cache.prefill import prefill
from ratequant.compat.placement import input_device
from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import bos_token_id
from ratequant.evaluation.trials import check_context, check_depth, check_positions, last_logprobs, run_trials
from ratequant.validation import check_int

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

_SENTENCES = [s if s.endswith(".") else s + "." for s in FILLER.split(". ")]
_WORDS = FILLER.split(" ")


@dataclass(frozen=True, eq=False)
class PasskeyPrompt:
    """One passkey prompt: ``input_ids`` LongTensor ``[1, context]``, ``key_ids`` the key's tokens after it.

    ``needle_position`` is the token index where the needle starts; ``bos`` whether ``input_ids`` begins with
    the tokenizer's BOS token (it does iff the tokenizer adds one); ``context`` the real length (at most the
    requested one, short of it by at most a few tokens); ``seed`` the seed the key was drawn from.
    """

    input_ids: torch.Tensor
    key: str
    key_ids: list[int]
    depth: float
    needle_position: int
    bos: bool
    context: int
    seed: int


@dataclass(frozen=True)
class PasskeyTrial:
    """The result of one prompt: ``logprob`` is ``sum_i log p(key_i | prompt, key_<i)`` in nats."""

    depth: float
    seed: int
    key: str
    logprob: float
    mean_token_logprob: float
    correct: bool
    greedy_text: str
    context: int
    seconds: float


@dataclass(frozen=True)
class PasskeyResult:
    """Passkey retrieval over depths and trials; ``per_depth[depth] = {"accuracy", "mean_logprob", "trials"}``."""

    context: int
    trials: int
    accuracy: float
    mean_logprob: float
    per_depth: dict[float, dict[str, float]]
    trials_detail: list[PasskeyTrial]
    seconds: float
    task: str = field(default="passkey")

    def to_dict(self) -> dict:
        """JSON-safe (floats, ints, strs, bools, lists and dicts with str keys)."""
        return {
            "task": self.task,
            "context": int(self.context),
            "trials": int(self.trials),
            "accuracy": float(self.accuracy),
            "mean_logprob": float(self.mean_logprob),
            "per_depth": {
                repr(float(d)): {k: (int(v) if k == "trials" else float(v)) for k, v in stats.items()}
                for d, stats in self.per_depth.items()
            },
            "trials_detail": [
                {
                    "depth": float(t.depth),
                    "seed": int(t.seed),
                    "key": str(t.key),
                    "logprob": float(t.logprob),
                    "mean_token_logprob": float(t.mean_token_logprob),
                    "correct": bool(t.correct),
                    "greedy_text": str(t.greedy_text),
                    "context": int(t.context),
                    "seconds": float(t.seconds),
                }
                for t in self.trials_detail
            ],
            "seconds": float(self.seconds),
        }


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _text(prefix_sentences: int, suffix_words: int, needle: str) -> tuple[str, str]:
    """``(text up to the needle, whole prompt text)`` with the filler cycled sentence- and word-wise."""
    prefix = " ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(prefix_sentences))
    suffix = " ".join(_WORDS[i % len(_WORDS)] for i in range(suffix_words))
    head = TASK_DESCRIPTION + "\n" + prefix + "\n"
    return head, head + needle + "\n" + suffix + "\n" + QUESTION


def make_passkey_prompt(tokenizer, context: int, depth: float, seed: int) -> PasskeyPrompt:
    """A passkey prompt of at most ``context`` tokens (question included) with the needle at ``depth``.

    The needle starts at the sentence boundary of the filler nearest token ``depth * context``, clamped to
    the filler: 0 puts it right after the task description, 1 right before the question. The key is drawn from
    ``random.Random(seed)`` (10000..99999), so the prompt depends only on ``(tokenizer, context, depth, seed)``.
    The filler after the needle is cut at word granularity so the prompt falls short of ``context`` by at
    most a few tokens. ``input_ids`` is ``[1, n]`` with ``n = prompt.context <= context``.
    """
    context = check_context(context)
    depth = check_depth(depth)
    key = str(random.Random(seed).randint(10000, 99999))
    needle = NEEDLE.format(key=key)
    bos_id = bos_token_id(tokenizer)
    extra = 0 if bos_id is None else 1

    def length(prefix_sentences: int, suffix_words: int) -> int:
        return extra + len(_encode(tokenizer, _text(prefix_sentences, suffix_words, needle)[1]))

    minimum = length(0, 0)
    if context < minimum:
        raise RateQuantError(
            f"passkey context {context} is too small: the task, needle and question alone take {minimum} tokens "
            f"with this tokenizer; use context >= {minimum}"
        )
    # Tokens per filler sentence, measured on a long stretch of filler.
    reps = 8
    per_sentence = len(_encode(tokenizer, " ".join([FILLER] * reps))) / (reps * len(_SENTENCES))
    budget = context - minimum
    head_tokens = extra + len(_encode(tokenizer, _text(0, 0, needle)[0]))
    prefix_sentences = int(round(max(0.0, depth * context - head_tokens) / per_sentence))
    while prefix_sentences > 0 and length(prefix_sentences, 0) > context:
        prefix_sentences -= 1
    # Largest suffix (in words) that still fits: binary search, then settle locally (tokenization of a
    # concatenation is monotone in practice, but never trust it for the "never above" guarantee).
    lo, hi = 0, int((budget / per_sentence + 2) * len(_WORDS) / len(_SENTENCES) * 2) + 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(prefix_sentences, mid) <= context:
            lo = mid
        else:
            hi = mid - 1
    suffix_words = lo
    while suffix_words > 0 and length(prefix_sentences, suffix_words) > context:
        suffix_words -= 1
    for more in range(1, 4):
        if length(prefix_sentences, suffix_words + more) <= context:
            suffix_words += more

    head, text = _text(prefix_sentences, suffix_words, needle)
    ids = _encode(tokenizer, text)
    # The needle starts at the first token that is not wholly part of the text before it.
    needle_position = _common_prefix(_encode(tokenizer, head), ids)
    while needle_position < len(ids) and head.startswith(tokenizer.decode(ids[: needle_position + 1])):
        needle_position += 1
    needle_position += extra
    answer_ids = _encode(tokenizer, text + " " + key)
    if answer_ids[: len(ids)] != ids or len(answer_ids) == len(ids):
        raise RateQuantError(
            "this tokenizer does not tokenize the prompt followed by the key as the prompt's tokens followed by "
            "the key's; passkey scoring needs a tokenizer whose tokens do not merge across that boundary"
        )
    key_ids = [int(t) for t in answer_ids[len(ids) :]]
    decoded = tokenizer.decode(key_ids).strip()
    if decoded != key:
        raise RateQuantError(f"the key's tokens decode to {decoded!r}, not {key!r}; this tokenizer cannot score it")
    if bos_id is not None:
        ids = [bos_id] + ids
    if len(ids) > context:  # unreachable by construction; the guarantee is part of the contract
        raise RateQuantError(f"internal error: passkey prompt has {len(ids)} tokens, more than the {context} asked for")
    return PasskeyPrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        key=key,
        key_ids=key_ids,
        depth=depth,
        needle_position=needle_position,
        bos=bos_id is not None,
        context=len(ids),
        seed=seed,
    )


# ----------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------


def score_passkey(
    model: torch.nn.Module,
    prompt: PasskeyPrompt,
    make_cache: Callable[[], object] | None = None,
    *,
    prefill_chunk: int | None = None,
    tokenizer=None,
) -> PasskeyTrial:
    """Score one prompt through a fresh cache from ``make_cache()`` (default ``transformers.DynamicCache()``).

    The prompt ``[1, n]`` is prefilled in pieces of ``prefill_chunk`` tokens after the cache's sink tokens
    (None: one pass; :func:`ratequant.cache.prefill.prefill`); the key is then
    teacher-forced one token at a time through the same cache, recording ``log p(key_i)`` and whether the
    argmax is ``key_i`` at each step. ``correct`` means every argmax is the key token (greedy decoding yields
    the key); ``greedy_text`` decodes the argmax tokens (with ``tokenizer``; their ids otherwise).
    """
    if prefill_chunk is not None:
        check_int(prefill_chunk, "prefill_chunk", lo=1)
    check_positions(model, prompt.context + len(prompt.key_ids) - 1)
    if make_cache is None:
        from transformers import DynamicCache

        make_cache = DynamicCache
    device = input_device(model)
    ids = prompt.input_ids.to(device)
    start = time.perf_counter()
    with torch.inference_mode():
        cache = make_cache()
        logprobs = torch.log_softmax(prefill(model, ids, cache, prefill_chunk)[0], dim=-1)
        total, argmax = 0.0, []
        for i, token in enumerate(prompt.key_ids):
            if i:
                logprobs = last_logprobs(model, torch.tensor([[prompt.key_ids[i - 1]]], device=device), cache)
            total += float(logprobs[token])
            argmax.append(int(logprobs.argmax()))
    seconds = time.perf_counter() - start
    greedy_text = tokenizer.decode(argmax) if tokenizer is not None else " ".join(map(str, argmax))
    return PasskeyTrial(
        depth=prompt.depth,
        seed=prompt.seed,
        key=prompt.key,
        logprob=total,
        mean_token_logprob=total / len(prompt.key_ids),
        correct=argmax == list(prompt.key_ids),
        greedy_text=greedy_text,
        context=prompt.context,
        seconds=seconds,
    )


def run_passkey(
    model: torch.nn.Module,
    tokenizer,
    *,
    context: int,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 2,
    seed: int = 0,
    make_cache: Callable[[], object] | None = None,
    prefill_chunk: int | None = None,
    progress: bool = False,
) -> PasskeyResult:
    """Passkey accuracy and key log-probability of ``model`` at ``context`` tokens over ``depths`` x ``trials``.

    Each trial builds its prompt with :func:`make_passkey_prompt` from :func:`trial_seed` and scores it with
    :func:`score_passkey` through a fresh cache from ``make_cache`` (None: ``DynamicCache``).
    """

    def trial(depth: float, prompt_seed: int) -> PasskeyTrial:
        prompt = make_passkey_prompt(tokenizer, context, depth, prompt_seed)
        return score_passkey(model, prompt, make_cache, prefill_chunk=prefill_chunk, tokenizer=tokenizer)

    detail, depths, seconds = run_trials(
        model, "passkey", trial, context=context, depths=depths, trials=trials, seed=seed, progress=progress
    )
    per_depth = {}
    for depth in depths:
        rows = [t for t in detail if t.depth == depth]
        per_depth[depth] = {
            "accuracy": sum(t.correct for t in rows) / len(rows),
            "mean_logprob": sum(t.logprob for t in rows) / len(rows),
            "trials": len(rows),
        }
    return PasskeyResult(
        context=context,
        trials=len(detail),
        accuracy=sum(t.correct for t in detail) / len(detail),
        mean_logprob=sum(t.logprob for t in detail) / len(detail),
        per_depth=per_depth,
        trials_detail=detail,
        seconds=seconds,
    )


__all__ = [
    "DEFAULT_DEPTHS",
    "PasskeyPrompt",
    "PasskeyResult",
    "PasskeyTrial",
    "make_passkey_prompt",
    "run_passkey",
    "score_passkey",
]
