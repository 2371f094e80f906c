"""Writing and reading the JSON artifacts users keep (results, plans): atomic, versioned, never pickled."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from ratequant.errors import RateQuantError

MAX_JSON_BYTES = 64 * 2**20


def write_json(path: str | os.PathLike, obj: dict, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`write_text_atomic`).

    NaN and infinities are refused (they are not JSON).
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise RateQuantError(f"refusing to write {path}: {exc}") from exc
    return write_text_atomic(path, text, overwrite=overwrite)


def write_text_atomic(
    path: str | os.PathLike, text: str, *, overwrite: bool = False, what: str = "", error=RateQuantError
) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, synced, then renamed.

    Refuses to replace an existing file unless ``overwrite``; a failure or an interrupt leaves no partial
    file behind (an existing file stays as it was). The file gets the usual permissions (``0o666`` less
    the umask). Errors are ``error`` (a :class:`RateQuantError` subclass) naming ``what`` and the path.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise error(f"{path} is a directory; pass a file path" + (f" for the {what}" if what else ""))
    if path.exists() and not overwrite:
        raise error(f"{path} already exists; pass --force to overwrite it")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise error(f"cannot write {name}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not publish a file whose data is not on disk yet
        publish(tmp, path)
    except BaseException as exc:  # including KeyboardInterrupt: never leave a partial file behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"cannot write {name}: {exc.strerror or exc}; nothing was written") from exc
        raise
    return path


def publish(tmp: str | os.PathLike, path: Path) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it 0600) and rename it to ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, *, what: str = "file", error=RateQuantError) -> dict:
    """Read a JSON object from ``path``: UTF-8, at most 64 MiB, no NaN/Infinity, no duplicate keys.

    Every failure is ``error`` (a :class:`RateQuantError` subclass) naming ``what`` and the path.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{what} {path} is {size} bytes, over the {MAX_JSON_BYTES // 2**20} MiB limit")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start})") from None

    def refuse_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON (finite numbers only)")

    def refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate field {key[:60]!r} (a field must not repeat)")
            out[key] = value
        return out

    try:
        data = json.loads(text, parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be a valid {what}") from None
    except ValueError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a JSON object, found {type(data).__name__}")
    return data


def finite(x: float) -> float | None:
    """``x`` as a JSON-safe float (None for NaN or infinity)."""
    return float(x) if math.isfinite(x) else None
