import pytest

from ratequant.data import DEFAULT_CORPUS, load_corpus, paragraphs
from ratequant.errors import RateQuantError


def shingles(text: str, width: int) -> set[str]:
    return {text[i : i + width] for i in range(0, max(len(text) - width, 0) + 1)}


def test_default_split_is_deterministic_and_sized():
    a, b = load_corpus(), load_corpus("default")
    assert a == b and a.sha256 == b.sha256 and a.name == DEFAULT_CORPUS
    total = len(a.calibration) + len(a.evaluation)
    assert 250_000 < total < 500_000
    assert 0.15 < len(a.calibration) / total < 0.45


def test_default_calibration_and_evaluation_share_no_text():
    corpus = load_corpus()
    calibration, evaluation = paragraphs(corpus.calibration), paragraphs(corpus.evaluation)
    assert not set(calibration) & set(evaluation)
    # stronger: no evaluation paragraph of real length is contained in the calibration text, and vice versa
    long_eval = [p for p in evaluation if len(p) >= 200]
    long_cal = [p for p in calibration if len(p) >= 200]
    assert len(long_eval) > 100 and len(long_cal) > 30
    assert not any(p in corpus.calibration for p in long_eval)
    assert not any(p in corpus.evaluation for p in long_cal)


def test_text_file_split_is_disjoint_and_cut_at_paragraphs(tmp_path):
    paras = [f"Paragraph {i}:" + " word" * (10 + i) for i in range(40)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paras + paras[:5]), encoding="utf-8")  # repeated paragraphs are dropped
    corpus = load_corpus(str(path), calibration_fraction=0.25)
    cal, ev = paragraphs(corpus.calibration), paragraphs(corpus.evaluation)
    assert cal + ev == paras
    assert 0.2 < len(corpus.calibration) / (len(corpus.calibration) + len(corpus.evaluation)) < 0.35


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"   \n\n  \n", "empty"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "binary"),
        (b"caf\xe9 au lait\n\nsecond", "not valid UTF-8"),
        (b"only one paragraph of text", "single paragraph"),
    ],
)
def test_bad_text_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(RateQuantError, match=message):
        load_corpus(str(path))


def test_missing_corpus_file(tmp_path):
    with pytest.raises(RateQuantError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
