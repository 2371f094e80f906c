"""Writing and reading the JSON artifacts users keep (results, plans): atomic, versioned, never pickled.

:class:`JsonDocument` is the one serialiser of the versioned files users exchange (plans, compare configurations,
compare results): the file, its version check and the errors that name the path; each class gives only its
``to_dict`` and ``from_dict``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import ClassVar

from ratequant.errors import RateQuantError

MAX_JSON_BYTES = 64 * 2**20
BOM = "\ufeff"
"""A UTF-8 byte-order mark, which some editors put at the start of a text file: skipped when reading."""


def json_text(obj: object, *, what: str, error=RateQuantError) -> str:
    """``obj`` as indented JSON text, newline-terminated; NaN and infinities (not JSON) are refused with ``error``
    naming ``what``."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise error(f"refusing to write {what}: {exc}") from exc


def write_json(path: str | os.PathLike, obj: dict, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`json_text`, :func:`write_text_atomic`)."""
    return write_text_atomic(path, json_text(obj, what=str(path)), overwrite=overwrite)


def write_text_atomic(
    path: str | os.PathLike, text: str, *, overwrite: bool = False, what: str = "", error=RateQuantError
) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, synced, then published.

    Refuses to replace an existing file (or a link, even a dangling one) unless ``overwrite``; without
    ``overwrite`` the file is published exclusively (:func:`publish`), so of two writers racing for the same new
    path exactly one succeeds. A failure or an interrupt leaves no partial file behind (an existing file stays
    as it was). The file gets the usual permissions (``0o666`` less the umask). Errors are ``error`` (a
    :class:`RateQuantError` subclass) naming ``what`` and the path.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise error(f"{path} is a directory; pass a file path" + (f" for the {what}" if what else ""))
    if (path.exists() or path.is_symlink()) and not overwrite:
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
            os.fsync(handle.fileno())  # publishing must not show a file whose data is not on disk yet
        publish(tmp, path, overwrite=overwrite)
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"{path} already exists (written meanwhile); pass --force to overwrite it") from None
    except BaseException as exc:  # including KeyboardInterrupt: never leave a partial file behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"cannot write {name}: {exc.strerror or exc}; nothing was written") from exc
        raise
    return path


def publish(tmp: str | os.PathLike, path: Path, *, overwrite: bool = True) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it 0600) and move it to ``path``.

    With ``overwrite`` it is renamed over whatever is there; without, it is hard-linked to ``path``, which fails
    with :class:`FileExistsError` when anything, even a dangling link, holds that name (no check-then-rename
    race), and the temporary name is then removed. Where the file system has no hard links, an empty file is
    created exclusively at ``path`` and renamed over.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # claims the name, or FileExistsError
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(path)  # the empty claim, never a file of someone else's
            raise
        return
    os.unlink(tmp)


def read_text(
    path: str | os.PathLike, *, what: str = "file", error=RateQuantError, max_bytes: int = MAX_JSON_BYTES
) -> str:
    """The UTF-8 text of the regular file ``path`` (at most ``max_bytes``; a leading BOM is dropped).

    Every failure (missing, not a regular file, too large, unreadable, not UTF-8) is ``error`` naming ``what``
    and the path. At most ``max_bytes + 1`` bytes are ever read, whatever the file claims its size is.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}" + (" (not a regular file)" if path.exists() else ""))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {path} is {size} bytes, over the {max_bytes // 2**20} MiB limit")
        with path.open("rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise error(f"{what} {path} is over the {max_bytes // 2**20} MiB limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    return text.removeprefix(BOM)


def parse_json(text: str, *, what: str = "file", error=RateQuantError) -> object:
    """Parse JSON ``text`` strictly: no NaN/Infinity, no duplicate keys, no integer longer than Python converts,
    bounded nesting; a leading BOM is dropped. Every failure is ``error`` naming ``what``."""

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
        return json.loads(text.removeprefix(BOM), parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)
    except RecursionError:
        raise error(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a refused constant or key, or an integer too long to convert
        first = " ".join(str(exc).split())[:200]
        raise error(f"{what} is not valid JSON: {first}") from None


def read_json(path: str | os.PathLike, *, what: str = "file", error=RateQuantError) -> dict:
    """Read a JSON object from ``path``: UTF-8, at most 64 MiB, no NaN/Infinity, no duplicate keys.

    Every failure is ``error`` (a :class:`RateQuantError` subclass) naming ``what`` and the path.
    """
    text = read_text(path, what=what, error=error)
    data = parse_json(text, what=f"{what} {Path(path)}", error=error)
    if not isinstance(data, dict):
        raise error(f"{what} {Path(path)} must be a JSON object, found {type(data).__name__}")
    return data


class JsonDocument:
    """A versioned JSON file: a subclass names its ``DOCUMENT`` (``"plan"``), the ``FORMAT_VERSIONS`` it reads (the
    last is the one it writes), its ``ERROR`` class, and defines ``to_dict()`` and ``from_dict(d)`` (which calls
    :meth:`check_format` first)."""

    DOCUMENT: ClassVar[str] = "file"
    FORMAT_VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    ERROR: ClassVar[type[RateQuantError]] = RateQuantError

    @classmethod
    def check_format(cls, d: object) -> dict:
        """``d`` when it is a JSON object with a ``format_version`` this class reads; otherwise :attr:`ERROR` says
        which of the three it is not."""
        if not isinstance(d, dict):
            raise cls.ERROR(f"a {cls.DOCUMENT} must be a JSON object, got {type(d).__name__}")
        if "format_version" not in d:
            raise cls.ERROR(f"this is not a ratequant {cls.DOCUMENT}: it has no format_version field")
        cls.check_version(d["format_version"])
        return d

    @classmethod
    def check_version(cls, version: object) -> int:
        """``version`` when it is one of :attr:`FORMAT_VERSIONS`; otherwise :attr:`ERROR` says to upgrade (a newer
        one) or to re-create the file (an older one)."""
        what, newest = cls.DOCUMENT, cls.FORMAT_VERSIONS[-1]
        if isinstance(version, bool) or not isinstance(version, int):
            raise cls.ERROR(f"{what} format_version must be an integer, got {version!r:.40}")
        if version > newest:
            raise cls.ERROR(
                f"{what} format_version {version} is newer than this ratequant reads ({newest}); upgrade ratequant "
                f"to use this {what}"
            )
        if version not in cls.FORMAT_VERSIONS:
            raise cls.ERROR(
                f"{what} format_version {version} is no longer read (this ratequant reads "
                f"{', '.join(map(str, cls.FORMAT_VERSIONS))}); re-create it with this version"
            )
        return version

    def to_json_text(self) -> str:
        """The file's text (:func:`json_text`)."""
        return json_text(self.to_dict(), what=f"a {self.DOCUMENT}", error=self.ERROR)

    def to_json(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically (:func:`write_text_atomic`); refuse to replace a file unless ``overwrite``."""
        return write_text_atomic(path, self.to_json_text(), overwrite=overwrite, what=self.DOCUMENT, error=self.ERROR)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read and validate the file at ``path``; every failure is an :attr:`ERROR` that names the path."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{cls.__name__}.load needs a file path (str or os.PathLike), got {type(path).__name__}")
        data = read_json(path, what=f"{cls.DOCUMENT} file", error=cls.ERROR)
        try:
            return cls.from_dict(data)
        except cls.ERROR as exc:
            raise cls.ERROR(f"{cls.DOCUMENT} file {path}: {exc}") from None


def finite(x: float) -> float | None:
    """``x`` as a JSON-safe float (None for NaN or infinity)."""
    return float(x) if math.isfinite(x) else None
