"""The fields of a plan file: their limits and the check of each one.

Every check takes the raw JSON value and returns its canonical form, or raises a
:class:`~ratequant.errors.PlanError` naming the field; :class:`ratequant.plan.Plan` runs them on construction,
so a damaged or hostile file never becomes a plan.
"""

from __future__ import annotations

import re

import numpy as np

from ratequant.allocation import Budget
from ratequant.allocation.fitting import DistortionFit
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import KINDS, Geometry
from ratequant.validation import (
    check_float,
    check_int,
    check_json_value,
    check_keys,
    check_object,
    check_str,
    finite_real,
    show_value,
)

MAX_PLAN_BYTES = 64 * 2**20
MAX_LAYERS = 4096
MAX_KV_HEADS = 4096
MAX_COMPONENTS_PER_KIND = 2**20
MAX_HEAD_DIM = 2**16
MAX_EXTRA_FIELDS = 64
MAX_PARAM_DEPTH = 4
MAX_PARAM_ITEMS = 4096
FULL_PRECISION_ITEMSIZES = (2, 4, 8)
"""Bytes per value of the dtypes a model may hold its full-precision tokens in (float16 and bfloat16, float32,
float64): a plan does not record its model's dtype, so its ``bytes_per_token`` must match one of them."""

TOP_LEVEL = (
    "format_version",
    "created_by",
    "model",
    "quantizer",
    "budget",
    "allocator",
    "avg_bits",
    "bytes_per_token",
    "residual_length",
    "sink_tokens",
    "bits",
    "fit",
    "calibration",
)
REQUIRED = ("format_version", "model", "quantizer", "budget", "allocator", "avg_bits", "bits")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------------------
# Field checks: each returns a canonical value or raises PlanError naming the field
# ---------------------------------------------------------------------------------------------------------
def int_field(v: object, name: str, lo: int, hi: int) -> int:
    return check_int(v, f"plan field {name}", lo=lo, hi=hi, error=PlanError)


def float_field(
    v: object, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    return check_float(v, f"plan field {name}", lo=lo, hi=hi, lo_open=lo_open, error=PlanError)


def str_field(v: object, name: str, *, empty: bool = False) -> str:
    return check_str(v, f"plan field {name}", empty=empty, error=PlanError)


def dict_field(v: object, name: str) -> dict:
    return check_object(v, f"plan field {name}", error=PlanError)


def keys_field(d: dict, name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    check_keys(d, f"plan field {name}", required, optional, error=PlanError)


def scalar_extras(d: dict, name: str, known: tuple[str, ...]) -> dict:
    """Extra descriptive fields (scalars only) allowed in ``model`` and ``calibration``; sorted by key."""
    extras = {k: d[k] for k in d if k not in known}
    if len(extras) > MAX_EXTRA_FIELDS:
        raise PlanError(f"plan field {name} has more than {MAX_EXTRA_FIELDS} extra fields")
    out = {}
    for k in sorted(extras):
        v = extras[k]
        str_field(k, f"{name} key")
        if isinstance(v, str):
            str_field(v, f"{name}.{k}", empty=True)
        elif v is not None and not isinstance(v, bool) and not finite_real(v):
            raise PlanError(f"plan field {name}.{k} must be a string, finite number, boolean or null")
        out[k] = float(v) if isinstance(v, float) else v
    return out


def bounded_geometry(
    num_layers: object,
    num_kv_heads: object,
    head_dim: object,
    num_heads: object = None,
    *,
    name: str = "plan field model",
    error=PlanError,
) -> Geometry:
    """The :class:`Geometry` of these sizes when each lies within a plan's limits (:data:`MAX_LAYERS`,
    :data:`MAX_KV_HEADS`, :data:`MAX_HEAD_DIM`, :data:`MAX_COMPONENTS_PER_KIND` pairs), else ``error``: whatever
    states a geometry (a plan, ``import --geometry``) is bounded before anything is allocated for it."""
    layers = check_int(num_layers, f"{name}.num_layers", lo=1, hi=MAX_LAYERS, error=error)
    kv_heads = check_int(num_kv_heads, f"{name}.num_kv_heads", lo=1, hi=MAX_KV_HEADS, error=error)
    dim = check_int(head_dim, f"{name}.head_dim", lo=1, hi=MAX_HEAD_DIM, error=error)
    heads = None
    if num_heads is not None:
        heads = check_int(num_heads, f"{name}.num_heads", lo=1, hi=MAX_KV_HEADS * 1024, error=error)
    if layers * kv_heads > MAX_COMPONENTS_PER_KIND:
        raise error(f"{name} has more than {MAX_COMPONENTS_PER_KIND} (layer, kv-head) pairs")
    try:
        return Geometry(layers, kv_heads, dim, heads)
    except RateQuantError as exc:
        raise error(f"{name}: {exc}") from None


def model_field(v: object) -> dict:
    d = dict_field(v, "model")
    known = ("name", "num_layers", "num_kv_heads", "head_dim", "num_heads")
    keys_field({k: d[k] for k in d if k in known}, "model", known[:4], known[4:])
    geometry = bounded_geometry(d["num_layers"], d["num_kv_heads"], d["head_dim"], d.get("num_heads"))
    out = {"name": str_field(d["name"], "model.name"), **geometry.to_dict()}
    out.update(scalar_extras(d, "model", known))
    return out


def quantizer_field(v: object) -> dict:
    d = dict_field(v, "quantizer")
    keys_field(d, "quantizer", ("name",), ("params",))
    params = d.get("params", {})
    dict_field(params, "quantizer.params")
    params = check_json_value(
        params, "plan field quantizer.params", max_depth=MAX_PARAM_DEPTH, max_items=MAX_PARAM_ITEMS, error=PlanError
    )
    return {"name": str_field(d["name"], "quantizer.name"), "params": params}


def known_design(name: str) -> str:
    """``name`` when it is a registered quantizer design, else a PlanError naming the known ones."""
    from ratequant.quantizers import available

    if name not in available():
        raise PlanError(
            f"plan field quantizer.name is {show_value(name)}, which is not a quantizer design this ratequant knows "
            f"({', '.join(available())}); the plan was made by another tool or a newer ratequant"
        )
    return name


def budget_field(v: object) -> dict:
    d = dict_field(v, "budget")
    try:
        return Budget.from_dict(d).to_dict()
    except RateQuantError as exc:
        raise PlanError(f"plan field budget: {exc}") from None


def bits_field(v: object, num_layers: int, num_kv_heads: int) -> dict:
    d = dict_field(v, "bits")
    keys_field(d, "bits", KINDS)
    out = {}
    for kind in KINDS:
        rows = d[kind]
        if not isinstance(rows, list) or len(rows) != num_layers:
            n = len(rows) if isinstance(rows, list) else show_value(rows)
            raise PlanError(f"plan field bits.{kind} must be a list of {num_layers} layers (one per layer), got {n}")
        clean = []
        for layer, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != num_kv_heads:
                n = len(row) if isinstance(row, list) else show_value(row)
                raise PlanError(
                    f"plan field bits.{kind}[{layer}] must list {num_kv_heads} widths (one per kv head), got {n}"
                )
            clean.append([int_field(b, f"bits.{kind}[{layer}]", 1, 8) for b in row])
        out[kind] = clean
    return out


def fit_field(v: object, shape: tuple[int, int, int]) -> dict | None:
    if v is None:
        return None
    d = dict_field(v, "fit")
    extra = {k: d[k] for k in ("metric", "design", "measured") if k in d}
    rest = {k: d[k] for k in d if k not in extra}
    try:
        fit = DistortionFit.from_dict(rest)
    except RateQuantError as exc:
        raise PlanError(f"plan field fit: {exc}") from None
    if fit.shape != shape:
        raise PlanError(f"plan field fit covers components {fit.shape} but the plan's model has {shape}")
    out = fit.to_dict()
    out["metric"] = None if extra.get("metric") is None else str_field(extra["metric"], "fit.metric")
    out["design"] = None if extra.get("design") is None else str_field(extra["design"], "fit.design")
    if extra.get("measured") is not None:
        out["measured"] = measured_field(extra["measured"], shape, len(fit.bitset))
    return out


def measured_field(v: object, shape: tuple[int, int, int], num_bits: int) -> dict:
    """The measured distortion table behind a fit: ``{"key": [L][H][nb], "value": ...}``, finite and >= 0."""
    d = dict_field(v, "fit.measured")
    keys_field(d, "fit.measured", KINDS)
    try:
        table = np.array([d["key"], d["value"]], dtype=np.float64)
    except (TypeError, ValueError):
        raise PlanError("plan field fit.measured must hold lists of numbers for key and value") from None
    expected = (*shape, num_bits)
    if table.shape != expected:
        raise PlanError(f"plan field fit.measured must have shape {list(expected)}, got {list(table.shape)}")
    if not np.isfinite(table).all() or (table < 0).any():
        raise PlanError("plan field fit.measured must hold finite, non-negative distortions")
    return {"key": table[0].tolist(), "value": table[1].tolist()}


def calibration_field(v: object) -> dict | None:
    if v is None:
        return None
    d = dict_field(v, "calibration")
    known = ("corpus", "corpus_sha256", "tokens", "seconds", "phases")
    keys_field({k: d[k] for k in d if k in known}, "calibration", known[:4], known[4:])
    sha = d["corpus_sha256"]
    if sha is not None and (not isinstance(sha, str) or not SHA256.match(sha)):
        raise PlanError(
            f"plan field calibration.corpus_sha256 must be 64 lowercase hex digits or null, got {show_value(sha)}"
        )
    out = {
        "corpus": str_field(d["corpus"], "calibration.corpus"),
        "corpus_sha256": sha,
        "tokens": int_field(d["tokens"], "calibration.tokens", 0, 2**62),
        "seconds": float_field(d["seconds"], "calibration.seconds", lo=0.0),
    }
    phases = dict_field(d.get("phases", {}), "calibration.phases")
    if len(phases) > MAX_EXTRA_FIELDS:
        raise PlanError(f"plan field calibration.phases has more than {MAX_EXTRA_FIELDS} entries")
    out["phases"] = {
        str_field(k, "calibration.phases key"): float_field(s, f"calibration.phases.{k}", lo=0.0)
        for k, s in phases.items()
    }
    out.update(scalar_extras(d, "calibration", known))
    return out


__all__ = [
    "FULL_PRECISION_ITEMSIZES",
    "MAX_COMPONENTS_PER_KIND",
    "MAX_EXTRA_FIELDS",
    "MAX_HEAD_DIM",
    "MAX_KV_HEADS",
    "MAX_LAYERS",
    "MAX_PARAM_DEPTH",
    "MAX_PARAM_ITEMS",
    "MAX_PLAN_BYTES",
    "REQUIRED",
    "TOP_LEVEL",
    "bits_field",
    "bounded_geometry",
    "budget_field",
    "calibration_field",
    "dict_field",
    "fit_field",
    "float_field",
    "int_field",
    "keys_field",
    "known_design",
    "measured_field",
    "model_field",
    "quantizer_field",
    "scalar_extras",
    "str_field",
]
