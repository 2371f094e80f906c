"""Plans other tools read: KVTuner's per-head width table, and a per-layer key/value width table.

**KVTuner** (Li et al., ICML 2025; ``FlexibleQuantizedCacheConfig(per_head_quant=True, per_head_config=...)``
in github.com/KexuanZhang/KVTuner) takes one key and one value width per (layer, kv head)::

    {"0": {"0": {"nbits_key": 4, "nbits_value": 2}, "1": {...}}, "1": {...}, ...}

:func:`export_kvtuner` gives that table with string keys (JSON has no other); :func:`kvtuner_text` writes it
as JSON or, for ``.yaml``/``.yml`` paths, as YAML with integer keys, which is what KVTuner's
``per_head_config_path`` loader (``yaml.safe_load``, then ``per_head_config[layer_idx]`` with an integer
index) needs. :func:`import_kvtuner` validates such a table strictly (every layer and head exactly once,
integer widths 1..8, nothing else) and turns it into a :class:`~ratequant.plan.Plan` for a given geometry.

**Per-layer tables** (:func:`export_layers`): engines that take one key width and one value width per layer
get the best such widths under the plan's own fitted curves at the plan's average, with the distortion the
coarser grouping is predicted to cost::

    {"format": "ratequant-layers", "format_version": 1, "model": {...}, "quantizer": {...},
     "strategy": "layer-kind", "layers": [{"layer": 0, "key_bits": 4, "value_bits": 2}, ...],
     "avg_bits": 2.5, "plan_avg_bits": 2.5,
     "predicted_distortion": {"per_head": 1.2e-3, "per_layer": 1.5e-3, "ratio": 1.25}}
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from ratequant.allocation import Budget, Curves, allocate, get_strategy
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.jsonio import read_json, read_text
from ratequant.plan import Plan
from ratequant.plan_fields import bounded_geometry
from ratequant.spec import DEFAULT_RESIDUAL_LENGTH
from ratequant.validation import show_value

KVTUNER_ALLOCATOR = "kvtuner-import"
"""The ``allocator`` of a plan made from a KVTuner file."""

LAYERS_FORMAT = "ratequant-layers"
LAYERS_FORMAT_VERSION = 1
LAYER_STRATEGIES = ("layer-kind", "layerwise")
"""Groupings :func:`export_layers` can use: a width per layer and kind, or one per layer for both kinds."""

YAML_SUFFIXES = (".yaml", ".yml")
_FIELDS = ("nbits_key", "nbits_value")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")


def _check_plan(plan: object, what: str) -> Plan:
    if not isinstance(plan, Plan):
        raise PlanError(f"{what} needs a Plan, got {type(plan).__name__}")
    return plan


# ---------------------------------------------------------------------------------------------------------
# KVTuner per-head tables
# ---------------------------------------------------------------------------------------------------------
def export_kvtuner(plan: Plan) -> dict:
    """The plan's widths as KVTuner's ``per_head_config``: ``{layer: {head: {"nbits_key", "nbits_value"}}}``
    with string keys ``"0", "1", ...`` in order (kv heads, as KVTuner's cache indexes them)."""
    bits = _check_plan(plan, "export_kvtuner").bits
    return {
        str(layer): {
            str(head): {"nbits_key": int(k), "nbits_value": int(v)}
            for head, (k, v) in enumerate(zip(keys, values, strict=True))
        }
        for layer, (keys, values) in enumerate(zip(bits["key"], bits["value"], strict=True))
    }


def kvtuner_text(plan: Plan, *, yaml: bool = False) -> str:
    """The KVTuner table as file text: indented JSON (string keys), or with ``yaml`` block-style YAML with
    integer keys (the form of KVTuner's own config files and the one its ``per_head_config_path`` reads)."""
    table = export_kvtuner(plan)
    if not yaml:
        import json

        return json.dumps(table, indent=2) + "\n"
    lines = []
    for layer, heads in table.items():
        lines.append(f"{layer}:")
        for head, widths in heads.items():
            lines.append(f"  {head}:")
            lines.extend(f"    {name}: {widths[name]}" for name in _FIELDS)
    return "\n".join(lines) + "\n"


def _index(key: object, what: str) -> int:
    """A layer or head index: an integer (YAML) or a canonical decimal string (JSON) ``>= 0``."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and _INDEX.match(key):
        return int(key)
    raise PlanError(f"{what} index must be an integer or a decimal string such as '0', got {show_value(key)}")


def _indexed(d: object, what: str, count: int, unit: str) -> dict[int, object]:
    """``d`` (an object keyed by index) as ``{index: value}``, refusing anything but exactly ``0..count-1``."""
    if not isinstance(d, dict):
        raise PlanError(f"{what} must be an object keyed by {unit} index, got {show_value(d)}")
    if len(d) > count:
        raise PlanError(f"{what} has {len(d)} {unit}s but the model has {count} ({unit}s 0..{count - 1})")
    out: dict[int, object] = {}
    for key, value in d.items():
        i = _index(key, f"{what}: {unit}")
        if i in out:
            raise PlanError(f"{what}: {unit} {i} appears twice")
        if i >= count:
            raise PlanError(f"{what} has {unit} {i} but the model has {count} {unit}s (0..{count - 1})")
        out[i] = value
    if len(out) < count:
        missing = [i for i in range(count) if i not in out]
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise PlanError(
            f"{what} has {len(out)} {unit}s but the model has {count}: {unit} {shown} missing (KVTuner needs one "
            f"entry per {unit})"
        )
    return out


def _width(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{what} must be an integer width from 1 to 8, got {show_value(v)}")
    if not 1 <= v <= 8:
        raise PlanError(f"{what} must be a width from 1 to 8, got {v}")
    return v


def kvtuner_bits(data: object, geometry: Geometry) -> np.ndarray:
    """The widths ``[2, L, H]`` of a KVTuner per-head table checked against ``geometry`` (PlanError otherwise)."""
    if not isinstance(geometry, Geometry):
        raise PlanError(f"a KVTuner table is read against a Geometry, got {type(geometry).__name__}")
    bounded_geometry(*geometry.to_dict().values(), name="geometry")  # a plan's limits, before anything is allocated
    num_layers, num_heads = geometry.num_layers, geometry.num_kv_heads
    layers = _indexed(data, "KVTuner table", num_layers, "layer")
    bits = np.empty((2, num_layers, num_heads), dtype=np.int64)
    for layer in range(num_layers):
        heads = _indexed(layers[layer], f"KVTuner table layer {layer}", num_heads, "head")
        for head in range(num_heads):
            entry = heads[head]
            where = f"KVTuner table layer {layer} head {head}"
            if not isinstance(entry, dict):
                raise PlanError(f"{where} must be an object with nbits_key and nbits_value, got {show_value(entry)}")
            missing = [f for f in _FIELDS if f not in entry]
            extra = [k for k in entry if k not in _FIELDS]
            if missing or extra:
                problem = f"lacks {', '.join(missing)}" if missing else f"has unknown field {show_value(extra[0])}"
                raise PlanError(f"{where} {problem}; it must hold exactly nbits_key and nbits_value")
            for k, name in enumerate(_FIELDS):
                bits[k, layer, head] = _width(entry[name], f"{where} {name}")
    return bits


def import_kvtuner(
    data: object,
    *,
    model_name: str,
    geometry: Geometry,
    quantizer_config,
    residual_length: int = DEFAULT_RESIDUAL_LENGTH,
    sink_tokens: int = 0,
) -> Plan:
    """A plan holding the widths of KVTuner table ``data`` for a model of ``geometry``.

    ``data`` must list every layer ``0..L-1`` and in each every kv head ``0..H-1`` exactly once (string or
    integer keys), each with exactly ``nbits_key`` and ``nbits_value``, integers 1..8; anything else is a
    :class:`PlanError` naming the entry. ``quantizer_config`` is a quantizer design (with ``to_config()``) or
    ``{"name", "params"}``; it must be able to store the widths at ``geometry.head_dim`` with
    ``residual_length``. The plan's allocator is ``"kvtuner-import"``, its budget and ``avg_bits`` the mean
    width it holds; it carries no fit (KVTuner files hold none).
    """
    bits = kvtuner_bits(data, geometry)
    avg = float(bits.mean())
    qconf = quantizer_config.to_config() if hasattr(quantizer_config, "to_config") else quantizer_config
    try:
        plan = Plan(
            model={"name": model_name, **geometry.to_dict()},
            quantizer=qconf,
            budget=Budget.avg_bits(avg).to_dict(),
            allocator=KVTUNER_ALLOCATOR,
            avg_bits=avg,
            bits={"key": bits[0].tolist(), "value": bits[1].tolist()},
            residual_length=residual_length,
            sink_tokens=sink_tokens,
        )
    except PlanError:
        raise
    except (RateQuantError, TypeError) as exc:
        raise PlanError(f"cannot make a plan from the KVTuner table: {exc}") from None
    plan.design()  # the quantizer must build and store these widths at this head_dim and residual window
    return plan


def read_kvtuner(path: str | os.PathLike) -> object:
    """Parse a KVTuner table file: JSON, or YAML for ``.yaml``/``.yml`` (safe loading, no duplicate keys).

    Returns the parsed data for :func:`import_kvtuner`; every failure is a :class:`PlanError` naming ``path``.
    """
    path = Path(path)
    if path.suffix.lower() not in YAML_SUFFIXES:
        return read_json(path, what="KVTuner file", error=PlanError)
    text = read_text(path, what="KVTuner file", error=PlanError)  # bounded, UTF-8, a leading BOM dropped as in JSON
    try:
        import yaml
    except ImportError:
        raise PlanError(f"reading YAML ({path}) needs PyYAML (pip install pyyaml); or pass the table as JSON") from None
    try:
        loader = _strict_loader(yaml)(text)  # a SafeLoader subclass: plain data only, never Python objects
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except RecursionError:
        raise PlanError(f"KVTuner file {path} is nested too deeply to be a KVTuner table") from None
    except (yaml.YAMLError, TypeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise PlanError(f"KVTuner file {path} is not valid YAML: {first}") from None


def _strict_loader(yaml):
    """A ``yaml.SafeLoader`` that refuses a key repeated in a mapping (PyYAML keeps the last silently)."""

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                repeated = key in out
            except TypeError:
                raise ValueError(f"a mapping key must be a scalar, got {type(key).__name__}") from None
            if repeated:
                raise ValueError(f"duplicate key {show_value(key)} (a key must not repeat)")
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def load_kvtuner(
    path: str | os.PathLike,
    *,
    model_name: str,
    geometry: Geometry,
    quantizer_config,
    residual_length: int = DEFAULT_RESIDUAL_LENGTH,
    sink_tokens: int = 0,
) -> Plan:
    """:func:`import_kvtuner` of the file at ``path`` (:func:`read_kvtuner`); errors name the path."""
    data = read_kvtuner(path)
    try:
        return import_kvtuner(
            data,
            model_name=model_name,
            geometry=geometry,
            quantizer_config=quantizer_config,
            residual_length=residual_length,
            sink_tokens=sink_tokens,
        )
    except PlanError as exc:
        raise PlanError(f"KVTuner file {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# Per-layer key/value tables
# ---------------------------------------------------------------------------------------------------------
def _constant_per_group(bits: np.ndarray, groups: np.ndarray) -> bool:
    """Whether every group of ``groups`` holds one width in ``bits``."""
    n = int(groups.max()) + 1
    low, high = np.full(n, 9, dtype=np.int64), np.zeros(n, dtype=np.int64)
    np.minimum.at(low, groups.reshape(-1), bits.reshape(-1))
    np.maximum.at(high, groups.reshape(-1), bits.reshape(-1))
    return bool((low == high).all())


def _reachable_total(options: list[list[int]], target: int) -> int | None:
    """The largest sum of one width per group (``options[g]``: the widths group ``g`` may take) that is at most
    ``target``; None when none is. (All groups have as many components, so sums count widths.)"""
    mask = 1  # bit s set: a sum of s width-units is reachable
    for widths in options:
        mask = _or_shifts(mask, widths)
    mask &= (1 << (target + 1)) - 1
    return mask.bit_length() - 1 if mask else None


def _or_shifts(mask: int, widths: list[int]) -> int:
    out = 0
    for b in widths:
        out |= mask << b
    return out


def _layer_allocation(plan: Plan, strategy: str) -> tuple[np.ndarray, float | None, float | None]:
    """Widths constant per group of ``strategy`` for ``plan``: ``(bits, per_head, per_layer)`` distortions."""
    fit = plan.fit_object()
    bits = plan.bits_array()
    groups = get_strategy(strategy).groups(bits.shape)
    if _constant_per_group(bits, groups):
        if fit is None:
            return bits, None, None
        total = float(fit.predict(bits).sum())
        return bits, total, total
    if fit is None:
        raise PlanError(
            f"this {plan.allocator} plan has no fitted curves to choose per-layer widths with, and its widths "
            f"differ within a layer{' and kind' if strategy == 'layer-kind' else ''}; export a calibrated plan"
        )
    # Widths the per-head plan could have used: within its own range for each kind, among the fitted widths
    # and its own (so no width the calibration left out comes back, and the per-head plan stays feasible).
    used = sorted({int(b) for b in np.unique(bits)})
    floors = (int(bits[0].min()), int(bits[1].min()))
    widths = tuple(sorted({b for b in fit.bitset if used[0] <= b <= used[-1]} | set(used)))
    curves = Curves.from_fit(fit, widths, design=(plan.fit or {}).get("design"), min_bits=floors)
    n_groups = int(groups.max()) + 1
    weight = bits.size // n_groups
    member_floor = np.where(np.arange(2)[:, None, None] == 0, floors[0], floors[1]) * np.ones_like(bits)
    group_floor = np.zeros(n_groups, dtype=np.int64)
    np.maximum.at(group_floor, groups.reshape(-1), member_floor.reshape(-1))
    options = [[b for b in widths if b >= group_floor[g]] for g in range(n_groups)]
    target = _reachable_total(options, int(bits.sum()) // weight)
    if target is None:  # cannot happen: the floors come from the plan's own widths
        raise PlanError(f"no {strategy} widths reach at most the plan's average of {plan.avg_bits:g} bits")
    budget = Budget.avg_bits(target / n_groups)
    try:
        alloc = allocate(curves, budget, strategy)
    except RateQuantError as exc:
        raise PlanError(f"cannot choose {strategy} widths for this plan: {exc}") from None
    return alloc.bits, curves.total(bits), alloc.predicted_distortion


def export_layers(plan: Plan, *, strategy: str = "layer-kind") -> dict:
    """A per-layer key/value width table for engines that take one width per layer (and kind).

    With ``strategy="layer-kind"`` every layer gets one key width and one value width; with ``"layerwise"``
    one width for both. A plan whose widths already have that form is exported as it is. Otherwise the widths
    are chosen by the exact optimum of the plan's own fitted curves (``Curves.from_fit``) at the plan's
    average (or, when the coarser grouping cannot meet it exactly, the nearest average below it: ``avg_bits``
    and ``plan_avg_bits`` say which), using only widths within the plan's range for each kind. The predicted
    distortion of both allocations under that fit, and their ratio (per-layer over per-head), say what the
    coarser grouping costs. A plan without a fit whose widths vary within a layer raises :class:`PlanError`.
    """
    plan = _check_plan(plan, "export_layers")
    if strategy not in LAYER_STRATEGIES:
        raise PlanError(f"per-layer tables use strategy {' or '.join(LAYER_STRATEGIES)}, got {show_value(strategy)}")
    bits, per_head, per_layer = _layer_allocation(plan, strategy)
    ratio = None
    if per_head is not None and per_layer is not None:
        ratio = per_layer / per_head if per_head > 0 else (1.0 if per_layer == 0 else None)
    return {
        "format": LAYERS_FORMAT,
        "format_version": LAYERS_FORMAT_VERSION,
        "model": dict(plan.model),
        "quantizer": plan.to_dict()["quantizer"],
        "residual_length": plan.residual_length,
        "sink_tokens": plan.sink_tokens,
        "strategy": strategy,
        "layers": [
            {"layer": layer, "key_bits": int(bits[0, layer, 0]), "value_bits": int(bits[1, layer, 0])}
            for layer in range(bits.shape[1])
        ],
        "avg_bits": float(bits.mean()),
        "plan_avg_bits": plan.avg_bits,
        "predicted_distortion": {
            "per_head": _finite(per_head),
            "per_layer": _finite(per_layer),
            "ratio": _finite(ratio),
        },
    }


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


__all__ = [
    "KVTUNER_ALLOCATOR",
    "LAYERS_FORMAT",
    "LAYERS_FORMAT_VERSION",
    "LAYER_STRATEGIES",
    "export_kvtuner",
    "export_layers",
    "import_kvtuner",
    "kvtuner_bits",
    "kvtuner_text",
    "load_kvtuner",
    "read_kvtuner",
]
