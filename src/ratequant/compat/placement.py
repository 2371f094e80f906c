"""Where a model's weights live: one device, or spread over several devices and disk.

A *device map* (accelerate's) assigns each module to ``"cpu"``, a CUDA index, ``"mps"`` or ``"disk"``:
``"auto"`` fills the first GPU, then the next, then CPU memory, then disk; ``"balanced"`` spreads the layers
evenly over the GPUs (``"balanced_low_0"`` keeps GPU 0 lighter for generation; ``"sequential"`` fills them in
order); an explicit map is a JSON object ``{"model.layers.0": 0, "model.layers.1": "disk", ...}`` or the path
of a file holding one. Everything downstream follows each layer's device: capture stacks what it records on
the main device, the simulated attention builds its masks on the query's device and each cache layer keeps
its codes where its first update came from. Disk-offloaded weights are read through accelerate's hooks.

The model is loaded on the CPU first and then dispatched, so it must fit in CPU memory once (GGUF files are
always read whole); disk offload then frees the memory of the offloaded layers, and a map with GPUs moves
them there. Loading straight into the map, for checkpoints larger than memory, is not implemented.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ratequant.errors import RateQuantError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
PLACES = ("cpu", "disk", "mps")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has; one clear error otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise RateQuantError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RateQuantError(
            f"device {device!r} asked for, but this torch build or machine has no CUDA; use --device cpu"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise RateQuantError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RateQuantError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise RateQuantError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return parsed


def parse_device_map(text: str | dict) -> str | dict[str, str | int]:
    """A ``--device-map`` value: a strategy name, a JSON object, or the path of a JSON file holding one.

    Returns the strategy name or the map with every place checked (``"cpu"``, ``"disk"``, ``"mps"``, a CUDA
    index or ``"cuda:N"``); the modules it names are checked against the model by :func:`dispatch`.
    """
    if isinstance(text, str):
        stripped = text.strip()
        if stripped in STRATEGIES:
            return stripped
        if not stripped.startswith("{"):
            path = Path(stripped).expanduser()
            if not path.is_file():
                raise RateQuantError(
                    f"--device-map {text!r} is neither one of {', '.join(STRATEGIES)}, a JSON object, nor a JSON file"
                )
            try:
                stripped = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise RateQuantError(f"cannot read the device map {path}: {e}") from None
        try:
            text = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise RateQuantError(f"the device map is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(text, dict) or not text:
        raise RateQuantError('a device map must be a non-empty JSON object {"module name": place, ...}')
    out: dict[str, str | int] = {}
    for name, place in text.items():
        if not isinstance(name, str):
            raise RateQuantError(f"device map key {name!r} must be a module name")
        out[name] = _check_place(name, place)
    return out


def _check_place(name: str, place) -> str | int:
    if isinstance(place, bool) or not isinstance(place, (int, str)):
        raise RateQuantError(f"device map: {name!r} -> {place!r}; use 'cpu', 'disk', 'mps', a CUDA index or 'cuda:N'")
    if isinstance(place, str) and place in PLACES:
        if place == "mps":
            check_device("mps")
        return place
    if isinstance(place, str) and not place.startswith("cuda"):
        raise RateQuantError(f"device map: {name!r} -> {place!r}; use 'cpu', 'disk', 'mps', a CUDA index or 'cuda:N'")
    index = place if isinstance(place, int) else (check_device(place).index or 0)
    if index < 0:
        raise RateQuantError(f"device map: {name!r} -> {place!r}; a CUDA index is 0 or more")
    check_device(f"cuda:{index}")
    return index


def dispatch(model: nn.Module, device_map: str | dict, offload_folder: str | None = None) -> nn.Module:
    """Spread ``model`` (loaded on the CPU) over the places of ``device_map`` (see :func:`parse_device_map`).

    Weights mapped to ``"disk"`` are written under ``offload_folder`` (a temporary folder, removed at exit,
    when None) and loaded into memory one module at a time while it runs.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import check_device_map, get_balanced_memory

    device_map = parse_device_map(device_map)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        memory = None
        if device_map.startswith("balanced"):
            memory = get_balanced_memory(model, no_split_module_classes=no_split, low_zero=device_map.endswith("_0"))
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(device_map) - names)
    if unknown:
        raise RateQuantError(
            f"the device map names {unknown[0]!r}, which is not a module of this model "
            f"(modules look like {_example_names(model)})"
        )
    try:
        check_device_map(model, device_map)
    except ValueError as e:
        raise RateQuantError(f"the device map does not place every weight: {e}") from None
    if "disk" in device_map.values() and offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="ratequant-offload-")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
    model.hf_device_map = dict(device_map)
    return model


def _example_names(model: nn.Module) -> str:
    children = [name for name, _ in model.named_modules() if name and name.count(".") <= 2][:4]
    return ", ".join(repr(n) for n in children)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the first accelerator its device map names (the CPU when it names none),
    or the device of its parameters when it has no device map."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for place in device_map.values():
            if place not in ("cpu", "disk"):
                return torch.device(place if isinstance(place, str) else f"cuda:{place}")
        return torch.device("cpu")
    return next(model.parameters()).device


def module_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` detached, read through accelerate's offload hook when the weight lives on disk."""
    tensor = getattr(module, name)
    if tensor.device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is None or name not in weights:
            raise RateQuantError(f"the {name} of {type(module).__name__} is offloaded and cannot be read")
        tensor = weights[name]
    return tensor.detach()


def describe_placement(model: nn.Module) -> str:
    """``"cpu"``, ``"cuda:0"``, or for a spread model the places and their module counts, e.g. ``"0:12, disk:18"``."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(input_device(model))
    counts: dict[str, int] = {}
    for place in device_map.values():
        counts[str(place)] = counts.get(str(place), 0) + 1
    return ", ".join(f"{place}:{n}" for place, n in counts.items())


__all__ = [
    "STRATEGIES",
    "check_device",
    "describe_placement",
    "dispatch",
    "input_device",
    "module_weight",
    "parse_device_map",
]
