"""Windows as the field cuts them: BOS where the tokenizer adds one, consecutive text, second-half scoring."""

import pytest
import torch

from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import WindowProtocol, bos_token_id, make_windows
from tests.conftest import tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def test_windows_without_bos_are_consecutive_slices_of_the_token_stream():
    tok = tiny_tokenizer()
    assert bos_token_id(tok) is None
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    windows = make_windows(tok, TEXT, WindowProtocol(16, 1000))
    assert windows.ids.dtype == torch.long and windows.ids.shape == (len(ids) // 16, 16)
    assert windows.ids.flatten().tolist() == ids[: windows.ids.numel()]
    assert make_windows(tok, TEXT, WindowProtocol(16, 3)).ids.tolist() == windows.ids[:3].tolist()
    assert windows.bos_token_id is None and windows.describe()["bos"] is False


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    tok = tiny_tokenizer(bos=True)
    bos = tok.bos_token_id
    assert bos_token_id(tok) == bos
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    windows = make_windows(tok, TEXT, WindowProtocol(16, 5))
    assert windows.ids.shape == (5, 16)
    assert (windows.ids[:, 0] == bos).all()
    # each window holds the next 15 text tokens: no text token is lost or overwritten
    assert windows.ids[:, 1:].flatten().tolist() == ids[: 5 * 15]
    described = windows.describe()
    assert described["bos"] is True and described["bos_token_id"] == bos
    # "no" turns it off, "yes" forces it on a tokenizer that adds none
    assert (make_windows(tok, TEXT, WindowProtocol(16, 5, bos="no")).ids[:, 0] != bos).any()
    forced = make_windows(tiny_tokenizer(), TEXT, WindowProtocol(16, 2, bos="yes"))
    assert (forced.ids[:, 0] == bos).all()


def test_second_half_scoring_counts_the_tokens_llama_cpp_scores():
    tok = tiny_tokenizer()
    all_tokens = make_windows(tok, TEXT, WindowProtocol(32, 3, scoring="all"))
    half = make_windows(tok, TEXT, WindowProtocol(32, 3, scoring="second-half"))
    assert all_tokens.first_target == 1 and all_tokens.describe()["scored_tokens"] == 3 * 31
    assert half.first_target == 16 and half.describe()["scored_tokens"] == 3 * 16
    assert torch.equal(all_tokens.ids, half.ids)


@pytest.mark.parametrize("seq_len", [0, -5, 1])
def test_non_positive_window_length_is_refused(seq_len):
    with pytest.raises(RateQuantError, match="window length"):
        WindowProtocol(seq_len, 1)


def test_corpus_too_short_for_one_window():
    with pytest.raises(RateQuantError, match="fewer than one window of 512"):
        make_windows(tiny_tokenizer(), "too short", WindowProtocol(512, 1))


def test_bad_protocol_choices_are_refused():
    with pytest.raises(RateQuantError, match="scoring must be one of"):
        WindowProtocol(16, 1, scoring="half")
    with pytest.raises(RateQuantError, match="bos must be one of"):
        WindowProtocol(16, 1, bos="maybe")
