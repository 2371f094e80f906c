"""Text corpora split into disjoint calibration and evaluation parts (windows: :mod:`ratequant.evaluation.protocol`).

The embedded default corpus is the Python language reference that every CPython ships in
``pydoc_data.topics`` (about 465 kB of English prose and grammar). Its split is deterministic:

1. topics are taken in sorted order and cut into paragraphs (blank-line separated);
2. a paragraph that already appeared earlier is dropped (topics quote each other, e.g. ``augassign``
   repeats ``assignment``), so no paragraph occurs twice;
3. topic number ``i`` (0-based, in sorted order) goes to calibration when ``i % 4 == 0``, else to
   evaluation: a quarter of the topics calibrate, three quarters evaluate, and no text is shared.

The second corpus, of another domain, is Debian's ``fortunes`` package (``apt-get install fortunes``: about
2.6 MB of quotations, jokes and verse in ``/usr/share/games/fortunes``; ``$RATEQUANT_FORTUNES_DIR`` points
elsewhere). Its files are read in sorted order (``ascii-art`` left out: pictures, not text), cut into entries at
the lines holding ``%``, deduplicated, and entry ``i`` (counted over all files) calibrates when ``i % 4 == 0``.

A user's UTF-8 text file is deduplicated the same way and cut at a paragraph boundary: the first
``calibration_fraction`` of its characters calibrate, the rest evaluates. A file over :data:`LARGE_FILE_BYTES`
is not read whole: its calibration part is the first :data:`PART_BYTES` of the file and its evaluation part the
:data:`PART_BYTES` from ``calibration_fraction`` of its size on (each cut at paragraph breaks; millions of
tokens, far more than any run needs), so memory stays bounded whatever the file's size. A Hugging Face dataset
(``hf:NAME[:CONFIG]``, needs the ``datasets`` package and network) uses its train split for calibration
and its test split (or validation) for evaluation.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ratequant.errors import RateQuantError
from ratequant.validation import finite_real, show_value

DEFAULT_CORPUS = "pydoc-topics"
FORTUNES = "fortunes"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIPPED = ("ascii-art",)
CALIBRATION_EVERY = 4
LARGE_FILE_BYTES = 64 << 20
PART_BYTES = 8 << 20
_PARAGRAPH_BREAK = re.compile(rb"\r?\n\r?\n")  # what :func:`paragraphs` splits at


@dataclass(frozen=True)
class Corpus:
    """Calibration and evaluation text of one corpus; ``sha256`` identifies the exact text of both."""

    name: str
    calibration: str
    evaluation: str

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in (self.calibration, self.evaluation):
            digest.update(part.encode("utf-8"))
            digest.update(b"\0")
        return digest.hexdigest()

    def split(self, which: str) -> str:
        if which not in ("calibration", "evaluation"):
            raise RateQuantError(f"corpus split must be 'calibration' or 'evaluation', got {which!r}")
        return getattr(self, which)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "calibration_chars": len(self.calibration),
            "evaluation_chars": len(self.evaluation),
        }


def load_corpus(spec: str | os.PathLike | None = None, *, calibration_fraction: float = 0.25) -> Corpus:
    """Load ``spec``: None or ``"default"`` (pydoc topics), ``"fortunes"`` (Debian's fortunes), a UTF-8 text file
    path (a string or a :class:`~pathlib.Path`), or ``hf:NAME[:CONFIG]``."""
    if not finite_real(calibration_fraction) or not 0.0 < calibration_fraction < 1.0:
        raise RateQuantError(f"calibration_fraction must be between 0 and 1, got {show_value(calibration_fraction)}")
    if isinstance(spec, os.PathLike):
        return _file_corpus(Path(spec).expanduser(), calibration_fraction)
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"load_corpus needs a corpus name or a file path (str or Path), got {type(spec).__name__}")
    spec = spec or "default"
    if spec in ("default", DEFAULT_CORPUS):
        return _pydoc_corpus()
    if spec == FORTUNES:
        return _fortunes_corpus()
    if spec.startswith("hf:"):
        return _hf_corpus(spec[3:])
    return _file_corpus(Path(spec).expanduser(), calibration_fraction)


def paragraphs(text: str) -> list[str]:
    """Non-empty, stripped, blank-line separated paragraphs of ``text``."""
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _dedup(parts: list[list[str]]) -> list[list[str]]:
    """Drop every paragraph already seen in an earlier position (across all parts)."""
    seen: set[str] = set()
    kept = []
    for part in parts:
        fresh = [p for p in part if not (p in seen or seen.add(p))]
        kept.append(fresh)
    return kept


def _pydoc_corpus() -> Corpus:
    from pydoc_data.topics import topics

    names = sorted(topics)
    per_topic = _dedup([paragraphs(topics[name]) for name in names])
    calibration = [p for i, ps in enumerate(per_topic) if i % CALIBRATION_EVERY == 0 for p in ps]
    evaluation = [p for i, ps in enumerate(per_topic) if i % CALIBRATION_EVERY != 0 for p in ps]
    return Corpus(DEFAULT_CORPUS, "\n\n".join(calibration), "\n\n".join(evaluation))


def fortunes_dir() -> Path:
    """Where Debian's fortunes are (``$RATEQUANT_FORTUNES_DIR`` or ``/usr/share/games/fortunes``)."""
    return Path(os.environ.get("RATEQUANT_FORTUNES_DIR") or FORTUNES_DIR)


def fortune_entries(folder: Path | None = None) -> list[str]:
    """The deduplicated fortunes of ``folder`` (default :func:`fortunes_dir`), in file then entry order."""
    folder = fortunes_dir() if folder is None else folder
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.suffix and p.name not in FORTUNES_SKIPPED)
    if not files:
        raise RateQuantError(
            f"the fortunes corpus is not installed (no fortune files in {folder}); install Debian's package with "
            "`apt-get install fortunes`, or set RATEQUANT_FORTUNES_DIR"
        )
    entries = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RateQuantError(f"cannot read fortune file {path}: {exc.strerror or exc}") from None
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
        entries += [e.strip("\n") for e in re.split(r"^%$", text, flags=re.M) if e.strip()]
    return _dedup([entries])[0]


def _fortunes_corpus() -> Corpus:
    entries = fortune_entries()
    calibration = [e for i, e in enumerate(entries) if i % CALIBRATION_EVERY == 0]
    evaluation = [e for i, e in enumerate(entries) if i % CALIBRATION_EVERY != 0]
    return Corpus(FORTUNES, "\n\n".join(calibration), "\n\n".join(evaluation))


def _file_corpus(path: Path, calibration_fraction: float) -> Corpus:
    if not path.exists():
        raise RateQuantError(f"corpus file not found: {path}")
    if not path.is_file():
        raise RateQuantError(f"corpus path is not a regular file: {path}")
    try:
        size = path.stat().st_size
        if size > LARGE_FILE_BYTES:
            return _large_file_corpus(path, size, calibration_fraction)
        with path.open("rb") as f:
            raw = f.read(LARGE_FILE_BYTES + 1)  # a file that claims a small size (/proc) is read in bounds too
    except OSError as exc:
        raise RateQuantError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    if len(raw) > LARGE_FILE_BYTES:
        raise RateQuantError(f"corpus file {path} grew past {LARGE_FILE_BYTES >> 20} MiB while it was read")
    (paras,) = _dedup([paragraphs(_decode(raw, path, 0))])
    if not paras:
        raise RateQuantError(f"corpus file {path} is empty; pass a file with text in it")
    if len(paras) < 2:
        raise RateQuantError(
            f"corpus file {path} has a single paragraph; separate its text into paragraphs with blank "
            "lines so it can be split into calibration and evaluation parts"
        )
    total = sum(len(p) for p in paras)
    cut, running = 1, len(paras[0])
    while cut < len(paras) - 1 and running < calibration_fraction * total:
        running += len(paras[cut])
        cut += 1
    return Corpus(str(path), "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:]))


def _decode(raw: bytes, path: Path, offset: int) -> str:
    """``raw`` (read from ``path`` at byte ``offset``) as text; one clear error for binary or non-UTF-8 data."""
    if b"\0" in raw:
        raise RateQuantError(f"corpus file {path} holds NUL bytes: it looks binary; pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RateQuantError(
            f"corpus file {path} is not valid UTF-8 (byte {offset + exc.start}); pass a UTF-8 text file"
        ) from None
    return text.removeprefix("\ufeff") if offset == 0 else text  # a byte-order mark is not text


def _large_file_corpus(path: Path, size: int, calibration_fraction: float) -> Corpus:
    """The corpus of a file too large to read whole: :data:`PART_BYTES` from its start, and as much from
    ``calibration_fraction`` of its size on, each cut at paragraph breaks."""
    with path.open("rb") as f:
        offsets = (0, max(int(calibration_fraction * size), PART_BYTES))  # the parts never overlap
        parts = [_read_part(f, path, offset, size) for offset in offsets]
    calibration, evaluation = _dedup([paragraphs(part) for part in parts])
    if not calibration or not evaluation:
        raise RateQuantError(f"corpus file {path} has no text in its calibration or evaluation part")
    return Corpus(
        f"{path} (sampled: {PART_BYTES >> 20} MiB per part)", "\n\n".join(calibration), "\n\n".join(evaluation)
    )


def _read_part(f, path: Path, offset: int, size: int) -> str:
    """Up to :data:`PART_BYTES` of ``f`` (``size`` bytes long) from the first paragraph break after ``offset``
    (from the start when ``offset`` is 0), ending at the last paragraph break they hold unless the file ends."""
    f.seek(offset)
    raw = f.read(PART_BYTES)
    if offset:
        start = _PARAGRAPH_BREAK.search(raw)
        raw, offset = (raw[start.end() :], offset + start.end()) if start else (b"", offset)
    if f.tell() < size:
        ends = [m.start() for m in _PARAGRAPH_BREAK.finditer(raw)]
        if not ends:
            raise RateQuantError(
                f"corpus file {path} has no paragraph break within {PART_BYTES >> 20} MiB of byte {offset}; "
                "separate its text into paragraphs with blank lines"
            )
        raw = raw[: ends[-1]]
    return _decode(raw, path, offset)


def _hf_corpus(ref: str) -> Corpus:
    name, _, config = ref.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise RateQuantError(
            "Hugging Face datasets need the 'datasets' package: pip install 'ratequant[datasets]'"
        ) from exc
    try:
        data = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the datasets library raises many types for network and naming problems
        raise RateQuantError(f"could not load dataset {ref!r} (is the network reachable?): {exc}") from exc
    evaluation_split = next((s for s in ("test", "validation") if s in data), None)
    if "train" not in data or evaluation_split is None:
        raise RateQuantError(f"dataset {ref!r} needs a 'train' and a 'test' or 'validation' split, has {list(data)}")
    column = next((c for c in ("text", "content") if c in data["train"].column_names), None)
    if column is None:
        raise RateQuantError(f"dataset {ref!r} has no 'text' column; columns: {data['train'].column_names}")
    join = lambda split: "\n\n".join(t for t in data[split][column] if t.strip())  # noqa: E731
    return Corpus(f"hf:{ref}", join("train"), join(evaluation_split))
