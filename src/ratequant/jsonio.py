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
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file in the same folder, then rename).

    Refuses to replace an existing file unless ``overwrite``; a failure leaves no partial file behind.
    NaN and infinities are refused (they are not JSON).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RateQuantError(f"{path} already exists; pass --force to overwrite it")
    if path.is_dir():
        raise RateQuantError(f"{path} is a directory; pass a file path")
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise RateQuantError(f"refusing to write {path}: {exc}") from exc
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike, *, what: str = "file") -> dict:
    """Read a JSON object from ``path``; every failure is a :class:`RateQuantError` naming the path."""
    path = Path(path)
    if not path.is_file():
        raise RateQuantError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise RateQuantError(f"{what} {path} is larger than {MAX_JSON_BYTES // 2**20} MiB; refusing to read it")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RateQuantError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc

    def refuse_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=refuse_constant)
    except RecursionError as exc:
        raise RateQuantError(f"{what} {path} is nested too deeply to be a valid {what}") from exc
    except ValueError as exc:
        raise RateQuantError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RateQuantError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def finite(x: float) -> float | None:
    """``x`` as a JSON-safe float (None for NaN or infinity)."""
    return float(x) if math.isfinite(x) else None
