"""Passkey retrieval: prompt construction, scoring through a cache, and the run summary."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ratequant.errors import RateQuantError
from ratequant.evaluation.passkey import (
    NEEDLE,
    QUESTION,
    PasskeyPrompt,
    make_passkey_prompt,
    run_passkey,
    score_passkey,
)
from ratequant.evaluation.trials import trial_seed
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny tokenizer, made to prepend ``<s>`` by default."""
    tok = tiny_tokenizer(bos=True)
    assert tok("the fox")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", max_position_embeddings=2048)


def _minimum(tokenizer) -> int:
    with pytest.raises(RateQuantError, match=r"use context >= (\d+)") as info:
        make_passkey_prompt(tokenizer, 10, 0.5, 0)
    return int(info.value.args[0].rsplit(">= ", 1)[1])


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [400, 777, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_prompt_length_needle_and_key(tokenizer, context, depth):
    p = make_passkey_prompt(tokenizer, context, depth, seed=7)
    ids = p.input_ids[0].tolist()
    assert p.input_ids.dtype == torch.long and p.input_ids.shape == (1, p.context)
    assert context - 4 <= p.context <= context
    assert len(p.key) == 5 and 10000 <= int(p.key) <= 99999
    text = tokenizer.decode(ids)
    assert text.endswith(QUESTION)
    # the needle starts exactly at needle_position
    assert tokenizer.decode(ids[p.needle_position :]).startswith(NEEDLE.format(key=p.key))
    assert NEEDLE.format(key=p.key) not in tokenizer.decode(ids[p.needle_position + 1 :])
    # ... at the requested depth, where the filler allows (clamped to the task description / the question)
    head = make_passkey_prompt(tokenizer, context, 0.0, seed=7).needle_position
    tail = make_passkey_prompt(tokenizer, context, 1.0, seed=7).needle_position
    target = min(max(depth * context, head), tail)
    assert abs(p.needle_position - target) <= 12  # half a filler sentence of this byte-level tokenizer
    assert tail > context - 120  # depth 1: needle (~70 tokens) and question (~37) end the prompt
    # key_ids: the key's tokens as they follow the prompt (leading space included)
    assert tokenizer.decode(p.key_ids).strip() == p.key
    assert tokenizer(text + " " + p.key, add_special_tokens=False)["input_ids"] == ids + p.key_ids
    assert not p.bos and ids[0] != tokenizer.bos_token_id


def test_prompt_is_deterministic_and_ignores_global_rng(tokenizer):
    random.seed(1)
    torch.manual_seed(1)
    a = make_passkey_prompt(tokenizer, 500, 0.4, seed=11)
    random.seed(2)
    torch.manual_seed(2)
    b = make_passkey_prompt(tokenizer, 500, 0.4, seed=11)
    assert torch.equal(a.input_ids, b.input_ids) and a.key == b.key and a.key_ids == b.key_ids
    assert a.needle_position == b.needle_position and a.seed == b.seed == 11
    assert a.key == str(random.Random(11).randint(10000, 99999))
    keys = {make_passkey_prompt(tokenizer, 500, 0.4, seed=s).key for s in range(6)}
    assert len(keys) >= 5
    c = make_passkey_prompt(tokenizer, 500, 0.4, seed=12)
    assert c.key != a.key and not torch.equal(c.input_ids[:, : c.context], a.input_ids[:, : c.context])


def test_bos_is_added_iff_the_tokenizer_adds_one(tokenizer, bos_tokenizer):
    plain = make_passkey_prompt(tokenizer, 600, 0.5, seed=3)
    with_bos = make_passkey_prompt(bos_tokenizer, 600, 0.5, seed=3)
    assert not plain.bos and with_bos.bos
    assert with_bos.input_ids[0, 0].item() == bos_tokenizer.bos_token_id
    assert (plain.input_ids[0] == tokenizer.bos_token_id).sum() == 0
    assert (with_bos.input_ids[0] == bos_tokenizer.bos_token_id).sum() == 1
    assert 596 <= with_bos.context <= 600 and with_bos.key == plain.key
    assert with_bos.key_ids == plain.key_ids
    ids = with_bos.input_ids[0].tolist()
    assert bos_tokenizer.decode(ids[with_bos.needle_position :]).startswith(NEEDLE.format(key=with_bos.key))
    assert _minimum(bos_tokenizer) == _minimum(tokenizer) + 1


def test_prompt_errors(tokenizer):
    minimum = _minimum(tokenizer)
    p = make_passkey_prompt(tokenizer, minimum, 0.5, seed=0)  # the minimum itself fits (no filler)
    assert p.context == minimum
    with pytest.raises(RateQuantError, match=f"too small.*use context >= {minimum}"):
        make_passkey_prompt(tokenizer, minimum - 1, 0.5, seed=0)
    for depth in (-0.1, 1.5, math.nan, "half"):
        with pytest.raises(RateQuantError, match="depth"):
            make_passkey_prompt(tokenizer, 500, depth, seed=0)
    for context in (0, -5, 3.5, True):
        with pytest.raises(RateQuantError, match="context"):
            make_passkey_prompt(tokenizer, context, 0.5, seed=0)


# ----------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------


def _reference(model, prompt: PasskeyPrompt) -> tuple[float, list[int]]:
    """Teacher-forced key log-prob and argmaxes from one full-sequence forward, no cache."""
    ids = torch.cat([prompt.input_ids, torch.tensor([prompt.key_ids])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    n = prompt.context
    rows = torch.log_softmax(logits[n - 1 : n - 1 + len(prompt.key_ids)], dim=-1)
    total = sum(rows[i, t].item() for i, t in enumerate(prompt.key_ids))
    return total, rows.argmax(-1).tolist()


@pytest.mark.parametrize("tok_name", ["tokenizer", "bos_tokenizer"])
def test_logprob_matches_chunked_prefill_and_full_forward(model, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    prompt = make_passkey_prompt(tok, 333, 0.5, seed=5)
    whole = score_passkey(model, prompt, tokenizer=tok)
    chunked = score_passkey(model, prompt, prefill_chunk=16, tokenizer=tok)
    reference, argmax = _reference(model, prompt)
    assert whole.logprob < 0 and math.isfinite(whole.logprob)
    assert whole.logprob == pytest.approx(chunked.logprob, abs=1e-4)
    assert whole.logprob == pytest.approx(reference, abs=1e-4)
    assert whole.mean_token_logprob == pytest.approx(whole.logprob / len(prompt.key_ids))
    assert whole.correct == (argmax == prompt.key_ids) == chunked.correct
    assert whole.greedy_text == tok.decode(argmax)
    assert (whole.depth, whole.seed, whole.key, whole.context) == (0.5, 5, prompt.key, prompt.context)


class _Oracle(torch.nn.Module):
    """A fake causal LM whose next-token distribution puts most mass on ``answer[step]`` (cache ignored)."""

    def __init__(self, prompt_len: int, answer: list[int], vocab: int = 300):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_position_embeddings": 1 << 20})()
        self.prompt_len, self.answer, self.vocab, self.seen = prompt_len, answer, vocab, 0

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        self.seen += input_ids.shape[1]
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        step = self.seen - self.prompt_len
        if 0 <= step < len(self.answer):
            logits[0, -1, self.answer[step]] = 10.0
        return type("Out", (), {"logits": logits})()


def test_correct_means_every_argmax_is_the_key_token(tokenizer):
    prompt = make_passkey_prompt(tokenizer, 300, 0.5, seed=9)
    right = score_passkey(_Oracle(prompt.context, prompt.key_ids), prompt, tokenizer=tokenizer)
    assert right.correct and right.greedy_text.strip() == prompt.key
    per_token = 10.0 - math.log(math.exp(10.0) + 299)
    assert right.logprob == pytest.approx(per_token * len(prompt.key_ids), abs=1e-4)
    wrong_answer = list(prompt.key_ids)
    wrong_answer[2] = (wrong_answer[2] + 1) % 300
    wrong = score_passkey(_Oracle(prompt.context, wrong_answer), prompt, prefill_chunk=50, tokenizer=tokenizer)
    assert not wrong.correct and wrong.greedy_text.strip() != prompt.key
    # teacher forcing continues past the miss: that token scores -log(e^10 + 299), the rest as before
    assert wrong.logprob == pytest.approx(per_token * (len(prompt.key_ids) - 1) + per_token - 10.0, abs=1e-4)


def test_run_passkey_summary_and_json(model, tokenizer):
    calls = []

    def make_cache():
        from transformers import DynamicCache

        calls.append(1)
        return DynamicCache()

    result = run_passkey(model, tokenizer, context=320, depths=(0.2, 0.8), trials=2, seed=4, make_cache=make_cache)
    assert result.task == "passkey" and result.context == 320 and result.trials == 4 and len(calls) == 4
    assert [t.seed for t in result.trials_detail] == [
        trial_seed("passkey", 4, i, j) for i in range(2) for j in range(2)
    ]
    assert [t.depth for t in result.trials_detail] == [0.2, 0.2, 0.8, 0.8]
    assert result.accuracy == sum(t.correct for t in result.trials_detail) / 4
    assert result.mean_logprob == pytest.approx(sum(t.logprob for t in result.trials_detail) / 4)
    assert set(result.per_depth) == {0.2, 0.8} and result.per_depth[0.8]["trials"] == 2
    assert result.per_depth[0.2]["mean_logprob"] == pytest.approx(sum(t.logprob for t in result.trials_detail[:2]) / 2)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == result.to_dict() and set(data["per_depth"]) == {"0.2", "0.8"}
    again = run_passkey(model, tokenizer, context=320, depths=(0.2, 0.8), trials=2, seed=4)
    strip = lambda d: {k: v for k, v in d.items() if "seconds" not in k}  # noqa: E731
    assert [strip(t) for t in again.to_dict()["trials_detail"]] == [strip(t) for t in data["trials_detail"]]


def test_run_errors_and_position_bound(tokenizer):
    small = tiny_model("llama", max_position_embeddings=300)
    with pytest.raises(RateQuantError, match="max_position_embeddings is 300"):
        run_passkey(small, tokenizer, context=400, depths=(0.5,), trials=1)
    prompt = make_passkey_prompt(tokenizer, 300, 0.5, seed=0)  # 300 tokens + the key exceed 300 positions
    with pytest.raises(RateQuantError, match="max_position_embeddings"):
        score_passkey(small, prompt)
    with pytest.raises(RateQuantError, match="trials"):
        run_passkey(small, tokenizer, context=280, trials=0)
    with pytest.raises(RateQuantError, match="depth"):
        run_passkey(small, tokenizer, context=280, depths=(0.5, 1.2))
    with pytest.raises(RateQuantError, match="prefill_chunk"):
        score_passkey(small, make_passkey_prompt(tokenizer, 280, 0.5, seed=0), prefill_chunk=0)
