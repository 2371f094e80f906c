"""Writing a comparison report into a folder, atomically, and redrawing it from ``results.json``.

:func:`write_report` writes ``results.json`` (every number), ``config.json`` (to repeat the run with
``ratequant compare --config``), ``report.md``, ``summary.md`` and the figures. Files are staged in a temporary
folder inside the target and moved into place at the end, so a failure leaves no half-written report. When a
report is replaced, the files of the old report that the new one does not write are removed only if this
program wrote them: their names match the report's own patterns and their content still has the SHA-256 that
the old ``results.json`` recorded. Anything else in the folder is left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ratequant.errors import RateQuantError
from ratequant.jsonio import publish, read_json, write_json
from ratequant.lab.report.figures import draw_figures
from ratequant.lab.report.markdown import report_markdown, summary_markdown
from ratequant.lab.results import CompareResults
from ratequant.validation import inert, show_value

CORE_FILES = ("results.json", "config.json", "report.md", "summary.md")
OWN_NAMES = re.compile(r"^(?:(?:kl|ppl)_vs_bits|quant_vs_rank|curves_[A-Za-z0-9_-]{1,64}|bits_[0-9.]{1,16})\.png$")
"""Names of the figures a report may hold: the only files besides the core ones it ever removes."""


@dataclass(frozen=True)
class ReportFiles:
    """Where the report went: the folder and every file written (relative names)."""

    folder: Path
    files: tuple[str, ...]

    @property
    def report(self) -> Path:
        return self.folder / "report.md"

    @property
    def results(self) -> Path:
        return self.folder / "results.json"


def repeat_command(out_dir: str | Path) -> str:
    """The one command that repeats a run whose report is in ``out_dir``."""
    out = Path(out_dir).as_posix()
    return f"ratequant compare --config {out}/config.json --out {out} --force"


def check_output(out_dir: str | Path, overwrite: bool) -> None:
    """Before any work: refuse to replace an existing report unless ``overwrite``, and make sure the folder
    can be written (it is created, and a probe file written and removed)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RateQuantError(f"{out} exists and is not a folder; pass a folder for --out")
    existing = [name for name in CORE_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise RateQuantError(f"{out} already holds a report ({', '.join(existing)}); pass --force to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RateQuantError(
            f"cannot write the report into {out}: {exc.strerror or exc}; choose another --out"
        ) from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _previous_files(out: Path) -> dict[str, str]:
    """``{name: sha256}`` of the files the old report in ``out`` says it wrote (nothing when unreadable)."""
    if not (out / "results.json").is_file():
        return {}
    try:
        listed = read_json(out / "results.json").get("report", {}).get("files", {})
    except RateQuantError:
        return {}
    if not isinstance(listed, dict):
        return {}
    return {k: v for k, v in listed.items() if isinstance(k, str) and isinstance(v, str)}


def _remove_stale(out: Path, previous: dict[str, str], keep: set[str]) -> None:
    for name, digest in previous.items():
        path = out / name
        if name in keep or not OWN_NAMES.match(name) or path.is_symlink() or not path.is_file():
            continue
        if _sha256(path) == digest:  # still exactly what this program wrote
            path.unlink()


def write_report(
    results: CompareResults,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    command: str | None = None,
    image_prefix: str = "",
    summary_image_prefix: str | None = None,
) -> ReportFiles:
    """Write the whole report into ``out_dir`` (see the module docstring); refuses to replace one unless
    ``overwrite``. ``command`` is the command line that made it (recorded); ``summary_image_prefix``
    (default ``image_prefix``) prefixes the image links of ``summary.md``, e.g. the folder relative to a README."""
    out = Path(out_dir)
    check_output(out, overwrite)
    previous = _previous_files(out)
    try:
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".report-"))
    except OSError as exc:
        raise RateQuantError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    try:
        figures = draw_figures(results, staging)
        repeat = repeat_command(out)
        (staging / "report.md").write_text(
            report_markdown(results, image_prefix=image_prefix, command=command, repeat=repeat, files=figures),
            encoding="utf-8",
        )
        prefix = image_prefix if summary_image_prefix is None else summary_image_prefix
        (staging / "summary.md").write_text(
            summary_markdown(results, image_prefix=prefix, command=command), encoding="utf-8"
        )
        results.config.to_json(staging / "config.json")
        written = {name: _sha256(staging / name) for name in (*figures, "report.md", "summary.md", "config.json")}
        payload = results.to_dict()
        payload["report"] = {"files": written, "repeat": repeat, "command": command}
        write_json(staging / "results.json", payload)
        names = ["results.json", *written]
        _remove_stale(out, previous, set(names))
        # without overwrite, results.json is published exclusively first: it claims the folder, so of two runs
        # racing for one new report folder exactly one writes it
        publish(staging / "results.json", out / "results.json", overwrite=overwrite)
        for name in names[1:]:
            os.replace(staging / name, out / name)
    except FileExistsError:
        raise RateQuantError(
            f"{out} already holds a report (written meanwhile by another run); pass --force to overwrite it"
        ) from None
    except OSError as exc:
        raise RateQuantError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReportFiles(folder=out, files=tuple(names))


def rebuild_report(
    results_json: str | Path, out_dir: str | Path | None = None, *, summary_image_prefix: str | None = None
) -> ReportFiles:
    """Redraw the report from a saved ``results.json`` (into its own folder unless ``out_dir``)."""
    data = read_json(results_json, what="compare results")
    out = Path(results_json).parent if out_dir is None else Path(out_dir)
    try:  # the file is someone's: a field missing or of the wrong type anywhere is one clear error
        results = CompareResults.from_dict(data)
        command = (data.get("report") or {}).get("command")
        if command is not None and not isinstance(command, str):
            raise TypeError(f"report.command must be a string, got {type(command).__name__}")
        return write_report(results, out, overwrite=True, command=command, summary_image_prefix=summary_image_prefix)
    except (KeyError, IndexError) as exc:
        raise RateQuantError(
            f"compare results {results_json} lack the field {inert(show_value(exc.args[0] if exc.args else '?'))}; "
            "rewrite them with ratequant compare"
        ) from None
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, RateQuantError):
            raise
        raise RateQuantError(
            f"compare results {results_json} hold a malformed value ({inert(str(exc)[:200])}); "
            "rewrite them with ratequant compare"
        ) from None


__all__ = ["CORE_FILES", "ReportFiles", "check_output", "rebuild_report", "repeat_command", "write_report"]
