import os

import pytest

from ratequant.errors import RateQuantError
from ratequant.inputs.corpora import DEFAULT_CORPUS, load_corpus, paragraphs
from tests.conftest import deny_reading


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


FORTUNES_INSTALLED = __import__("ratequant.inputs.corpora", fromlist=["fortunes_dir"]).fortunes_dir().is_dir()


@pytest.mark.skipif(
    not FORTUNES_INSTALLED, reason="Debian's fortunes package is not installed (apt-get install fortunes)"
)
def test_fortunes_is_a_second_corpus_split_without_shared_entries():
    from ratequant.inputs.corpora import fortune_entries

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


def test_a_large_file_is_sampled_at_paragraph_breaks(tmp_path, monkeypatch):
    from ratequant.inputs import corpora as data

    monkeypatch.setattr(data, "LARGE_FILE_BYTES", 1000)
    monkeypatch.setattr(data, "PART_BYTES", 400)
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(f"paragraph {i:04d} " + "é" * 20 for i in range(200)), encoding="utf-8")
    corpus = load_corpus(str(path))
    assert "sampled" in corpus.name
    calibration, evaluation = paragraphs(corpus.calibration), paragraphs(corpus.evaluation)
    assert calibration[0].startswith("paragraph 0000") and len(corpus.calibration.encode()) <= 400
    first_eval = int(evaluation[0].split()[1])
    assert 45 <= first_eval <= 56  # from a quarter of the file on (200 paragraphs of 58 bytes)
    assert len(corpus.evaluation.encode()) <= 400
    assert all(p.endswith("é" * 20) for p in calibration + evaluation)  # whole paragraphs only
    small_cut = load_corpus(str(path), calibration_fraction=0.05)  # the parts never overlap
    assert int(paragraphs(small_cut.evaluation)[0].split()[1]) > int(calibration[-1].split()[1])
    (tmp_path / "no-breaks.txt").write_text("x" * 5000)
    with pytest.raises(RateQuantError, match="no paragraph break"):
        load_corpus(str(tmp_path / "no-breaks.txt"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_a_300_mb_corpus_file_is_read_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "huge.txt"
    text = "Paragraph {}: ordinary text that goes on for a while, and on, and on, until it stops.\n\n" * 1000
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, 3_200_000, 1000):
            f.write(text.format(*range(start, start + 1000)))  # 3.2 million distinct paragraphs, 300 MB
    probe = (  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, inherited at fork)
        "import re, sys; from ratequant.inputs.corpora import load_corpus; c = load_corpus(sys.argv[1]); "
        "print(len(c.evaluation), re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
    chars, peak_kib = map(int, out.stdout.split())
    assert chars > 1_000_000
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB for a 300 MB file"


def corpus_text(n: int = 12) -> str:
    return "\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog" for i in range(n))


def test_a_path_object_loads_like_its_string_and_other_types_are_refused(tmp_path):
    from pathlib import Path

    path = tmp_path / "text.txt"
    path.write_text(corpus_text())
    assert load_corpus(path) == load_corpus(str(path)) == load_corpus(Path(str(path)))
    for bad in (123, b"text.txt", ["text.txt"]):
        with pytest.raises(TypeError, match="load_corpus needs a corpus name or a file path"):
            load_corpus(bad)
    with pytest.raises(RateQuantError, match="calibration_fraction"):
        load_corpus(path, calibration_fraction="half")


def test_a_byte_order_mark_is_not_text(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(corpus_text(), encoding="utf-8")
    marked.write_text(corpus_text(), encoding="utf-8-sig")
    assert load_corpus(marked).calibration == load_corpus(plain).calibration


def test_unreadable_files_are_one_clear_error(tmp_path, monkeypatch):
    from pathlib import Path

    if Path("/proc/self/mem").is_file():  # claims 0 bytes and fails on read
        with pytest.raises(RateQuantError, match="cannot read corpus file /proc/self/mem: Input/output error"):
            load_corpus("/proc/self/mem")
    path = tmp_path / "secret.txt"
    path.write_text(corpus_text())
    deny_reading(monkeypatch, path)
    with pytest.raises(RateQuantError, match=f"cannot read corpus file {path}: Permission denied"):
        load_corpus(path)
