"""Helpers shared by the benchmarks: the machine record, resident memory, JSON output, and a few inputs.

Benchmarks run as scripts (``python benchmarks/X.py``), so this file's folder is on ``sys.path`` and they
``import _common`` as a sibling module. Only the standard library is imported at module level (``run_all.py``
uses :func:`subprocess_env` without loading torch); torch, numpy and transformers are imported where needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import sys
import threading
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"hqq": "hqq", "optimum.quanto": "optimum-quanto"}
"""The optional peer packages whose versions every result records: {key in the JSON: distribution name}."""
FLOAT16_BYTES = 2
KEYS_WIDER_SPLITS = {2.5: (3, 2), 3.0: (4, 2)}
"""The fixed key/value split of each budget with keys wider (the best fixed scheme on the default model), as
``{average bits: (key bits, value bits)}``."""


# ---------------------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------------------
def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else None


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` (read from its metadata, without importing it)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


def machine_info(threads: int | None = None) -> dict:
    """What a result must record about where it ran: platform, CPU model and cores, torch threads (``threads``,
    default torch's current count), and the versions of python, torch, transformers, numpy, ratequant and
    the peer packages (:data:`PEERS`)."""
    import numpy as np
    import torch
    import transformers

    import ratequant

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if threads is None else int(threads),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "ratequant": ratequant.__version__,
    }
    for key, distribution in PEERS.items():
        info[key] = package_version(distribution)
    model = cpu_model()
    if model:
        info["cpu_model"] = model
    return info


def args_dict(args) -> dict:
    """``vars(args)`` in JSON form (paths as strings, torch dtypes by name)."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        elif type(value).__module__ == "torch" and type(value).__name__ == "dtype":
            value = str(value).removeprefix("torch.")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# resident memory
# ---------------------------------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    """Resident set size of this process now (``/proc/self/statm``; None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def rss_or_peak() -> int:
    """:func:`rss_bytes`, or the process's peak RSS so far (``ru_maxrss``) where there is no /proc."""
    now = rss_bytes()
    if now is not None:
        return now
    import resource  # Unix only

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def trim() -> None:
    """Collect garbage and return freed heap memory to the OS (glibc ``malloc_trim``), so that the next
    measurement starts from a clean level."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident memory while the ``with`` block runs, sampled every ``interval`` seconds in a thread.

    ``start`` is the level when the block began (after :func:`trim` when ``trim_first``), ``peak`` the highest
    level seen, ``extra`` their difference; all None where ``read`` (default :func:`rss_bytes`) gives None.
    """

    def __init__(self, interval: float = 0.002, *, trim_first: bool = True, read=rss_bytes):
        self.interval, self.trim_first, self.read = interval, trim_first, read
        self.start = self.peak = None

    def __enter__(self) -> PeakRSS:
        if self.trim_first:
            trim()
        self.start = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._see(self.read())

    def _see(self, now) -> None:
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._see(self.read())

    @property
    def extra(self) -> int | None:
        return None if self.start is None or self.peak is None else int(self.peak - self.start)


def held_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (tensors, tensor subclasses that flatten,
    lists, tuples, dicts and plain objects, to depth 8); a storage shared by several views counts once."""
    import torch

    seen_obj, storages = set(), {}

    def visit(o, depth):
        if id(o) in seen_obj or depth > 8:
            return
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            if hasattr(o, "__tensor_flatten__") and type(o) is not torch.Tensor:  # e.g. quanto's packed tensors
                names, _ = o.__tensor_flatten__()
                for name in names:
                    visit(getattr(o, name), depth + 1)
                return
            storage = o.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return
        if isinstance(o, dict):
            items = o.values()
        elif isinstance(o, (list, tuple)):
            items = o
        elif hasattr(o, "__dict__") and not isinstance(o, (type, torch.nn.Module)):
            items = vars(o).values()
        else:
            return
        for item in items:
            visit(item, depth + 1)

    visit(obj, 0)
    return int(sum(storages.values()))


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_result(path: str | os.PathLike, result: dict, *, overwrite: bool = True) -> Path:
    """Write a benchmark's ``result`` as indented JSON to ``path`` (folders made, written atomically; NaN and
    infinities become null so that a long run never fails at its last step). Refuses to replace an existing
    file unless ``overwrite``. Returns the path."""
    from ratequant.jsonio import write_json

    return write_json(path, _finite(result), overwrite=overwrite)


def subprocess_env(threads: int) -> dict:
    """The environment for a benchmark's child process: ``threads`` OpenMP/MKL threads and this checkout's
    ``src`` first on ``PYTHONPATH``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def kv_split(like, key_bits: int, value_bits: int):
    """Widths ``[2, L, H]`` shaped like ``like``: every key at ``key_bits``, every value at ``value_bits`` (a fixed
    key/value split such as :data:`KEYS_WIDER_SPLITS`' K3V2)."""
    import numpy as np

    bits = np.empty_like(like)
    bits[0], bits[1] = key_bits, value_bits
    return bits


def design_scores(by_condition: dict, design: str, names) -> dict:
    """``{name: {"kl", "kl_se", "ppl"}}`` of the conditions ``"{design}/{name}"`` of a ``score_conditions`` result
    (one scoring)."""
    return {
        name: {key: getattr(by_condition[f"{design}/{name}"], key) for key in ("kl", "kl_se", "ppl")} for name in names
    }


def recovered(kl: dict, fixed: str, names) -> dict:
    """``{name: share of the fixed scheme's KL damage recovered}`` (1 - KL / KL of ``fixed``) from ``{name: KL}``."""
    return {name: 1 - kl[name] / kl[fixed] for name in names}


def print_recovered(rows: list[dict], budget: float, fixed: str, method: str, wheres) -> None:
    """Print, per design row, the share of ``fixed``'s KL damage that RateQuant and ``method`` recover on each text
    of ``wheres`` (``row[f"recovered_{where}"]``), then the evaluation's KL, perplexity and widths of each."""
    for row in rows:
        print(f"{row['design']} at {budget:g} bits (share of {fixed}'s KL damage recovered):")
        for where in wheres:
            rec = row[f"recovered_{where}"]
            print(f"  {where:11s} RateQuant {rec['RateQuant']:+.0%}  {method} {rec[method]:+.0%}")
        for name, e in row["evaluation"].items():
            print(f"  {name:15s} KL {e['kl']:.4f} ± {e['kl_se']:.4f}  PPL {e['ppl']:.3f}  {row['widths'][name]}")


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def float16_bytes_per_token(geometry) -> int:
    """Bytes per token of a float16 ``DynamicCache`` of a model of ``geometry`` (``2 * L * H * D * 2``)."""
    return 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * FLOAT16_BYTES


def alternating_bits(geometry, low: int = 2):
    """Components alternate ``low`` and ``low + 1`` bits (flattened ``[2, L, H]`` order): mean ``low + 0.5``."""
    import numpy as np

    return low + (np.arange(geometry.num_components) % 2).reshape(geometry.shape)


def key_channel_scales(generator, num_kv_heads: int, head_dim: int):
    """Per-channel scales ``[1, H, 1, D]`` of realistic keys: lognormal, with two outlier channels 8x larger
    (as observed in real models)."""
    import torch

    channel = torch.exp(torch.randn(1, num_kv_heads, 1, head_dim, generator=generator) * 0.5)
    channel[..., :2] *= 8.0
    return channel


def corpus_windows(tokenizer, text: str, seq_len: int, count: int):
    """The first ``count`` windows ``[n, seq_len]`` of ``text`` by the evaluation protocol's rule
    (:func:`ratequant.evaluation.protocol.make_windows`, BOS as the tokenizer adds it, every token scored)."""
    from ratequant.evaluation import WindowProtocol, make_windows

    return make_windows(tokenizer, text, WindowProtocol(seq_len, count)).ids
