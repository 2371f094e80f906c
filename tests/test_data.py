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


FORTUNES_INSTALLED = __import__("ratequant.data", fromlist=["fortunes_dir"]).fortunes_dir().is_dir()


@pytest.mark.skipif(
    not FORTUNES_INSTALLED, reason="Debian's fortunes package is not installed (apt-get install fortunes)"
)
def test_fortunes_is_a_second_corpus_split_without_shared_entries():
    from ratequant.data import fortune_entries

    a, b = load_corpus("fortunes"), load_corpus("fortunes")
    assert a == b and a.name == "fortunes"
    entries = fortune_entries()
    assert len(entries) == len(set(entries)) > 4000  # deduplicated
    calibration, evaluation = entries[::4], [e for i, e in enumerate(entries) if i % 4]
    assert a.calibration == "\n\n".join(calibration) and a.evaluation == "\n\n".join(evaluation)
    assert not set(calibration) & set(evaluation)
    assert "%" not in {line.strip() for line in a.evaluation.splitlines()}  # the separators are gone
    assert a.sha256 != load_corpus().sha256


def test_fortunes_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RATEQUANT_FORTUNES_DIR", str(tmp_path / "none"))
    with pytest.raises(RateQuantError, match="apt-get install fortunes"):
        load_corpus("fortunes")


def test_fortunes_from_a_folder_of_entries(tmp_path, monkeypatch):
    (tmp_path / "quotes").write_text("\n%\n".join(f"saying number {i}\n  -- someone" for i in range(12)) + "\n%\n")
    (tmp_path / "quotes.dat").write_bytes(b"\x00binary index")  # the index files are not text: left out
    monkeypatch.setenv("RATEQUANT_FORTUNES_DIR", str(tmp_path))
    corpus = load_corpus("fortunes")
    assert corpus.calibration.split("\n\n") == [f"saying number {i}\n  -- someone" for i in (0, 4, 8)]
    assert len(corpus.evaluation.split("\n\n")) == 9
