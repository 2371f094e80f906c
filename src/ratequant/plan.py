"""The plan file: a versioned JSON artifact holding a bit allocation and how it was obtained.

A plan records the model geometry it was made for, the quantizer design (name and parameters), the
budget, the allocator, the integer widths ``bits = {"key": [[b per kv-head] per layer], "value": ...}``,
the fitted distortion model (betas, alphas, R^2) and the calibration run (corpus identity and hash,
tokens, seconds). Loading validates every field (types, ranges, shapes, sizes) so a damaged or hostile
file is refused with a :class:`~ratequant.errors.PlanError` naming the path, and :meth:`Plan.check_matches`
/ :meth:`Plan.check_quantizer` refuse to apply a plan to another model or quantizer. Plans are JSON only,
never pickled; writing is atomic and a saved plan re-saves byte-identically.

Example (abridged)::

    {"format_version": 2, "created_by": "ratequant 0.2.0",
     "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
               "num_heads": 9},
     "quantizer": {"name": "kivi", "params": {"group_size": 32, "scale_dtype": "float16"}},
     "budget": {"kind": "avg_bits", "value": 2.5}, "allocator": "ratequant", "avg_bits": 2.5,
     "bytes_per_token": 12345.6, "residual_length": 128, "sink_tokens": 1,
     "bits": {"key": [[4, 3, 3], ...], "value": [[2, 2, 3], ...]},
     "fit": {"beta_key": 4.4, "beta_value": 3.8, "alpha": {...}, "r2": {...}, "r2_overall": 0.99,
             "metric": "fisher", "bitset": [1, 2, 3, 4, 5, 6, 7, 8], ...},
     "calibration": {"corpus": "pydoc_data.topics[calibration]", "corpus_sha256": "...", "tokens": 8192,
                     "seconds": 3.2, "phases": {"capture": 1.1, "measure": 2.0, "fit": 0.1}}}
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ratequant import __version__
from ratequant.allocation import Allocation, Budget
from ratequant.errors import PlanError, RateQuantError
from ratequant.fitting import DistortionFit
from ratequant.geometry import KINDS, Geometry
from ratequant.jsonio import read_json, write_text_atomic
from ratequant.spec import MAX_SINK_TOKENS, KVQuantSpec, StoragePolicy
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

FORMAT_VERSION = 2
"""Version of the plan format this library writes and the newest it reads (version 2 added ``sink_tokens``;
version 1 plans load with none)."""

MAX_PLAN_BYTES = 64 * 2**20
MAX_LAYERS = 4096
MAX_KV_HEADS = 4096
MAX_COMPONENTS_PER_KIND = 2**20
MAX_HEAD_DIM = 2**16
MAX_EXTRA_FIELDS = 64
MAX_PARAM_DEPTH = 4
MAX_PARAM_ITEMS = 4096

_TOP_LEVEL = (
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
_REQUIRED = ("format_version", "model", "quantizer", "budget", "allocator", "avg_bits", "bits")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------------------
# Field checks: each returns a canonical value or raises PlanError naming the field
# ---------------------------------------------------------------------------------------------------------
def _int(v: object, name: str, lo: int, hi: int) -> int:
    return check_int(v, f"plan field {name}", lo=lo, hi=hi, error=PlanError)


def _float(v: object, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    return check_float(v, f"plan field {name}", lo=lo, hi=hi, lo_open=lo_open, error=PlanError)


def _str(v: object, name: str, *, empty: bool = False) -> str:
    return check_str(v, f"plan field {name}", empty=empty, error=PlanError)


def _dict(v: object, name: str) -> dict:
    return check_object(v, f"plan field {name}", error=PlanError)


def _keys(d: dict, name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    check_keys(d, f"plan field {name}", required, optional, error=PlanError)


def _scalar_extras(d: dict, name: str, known: tuple[str, ...]) -> dict:
    """Extra descriptive fields (scalars only) allowed in ``model`` and ``calibration``; sorted by key."""
    extras = {k: d[k] for k in d if k not in known}
    if len(extras) > MAX_EXTRA_FIELDS:
        raise PlanError(f"plan field {name} has more than {MAX_EXTRA_FIELDS} extra fields")
    out = {}
    for k in sorted(extras):
        v = extras[k]
        _str(k, f"{name} key")
        if isinstance(v, str):
            _str(v, f"{name}.{k}", empty=True)
        elif v is not None and not isinstance(v, bool) and not finite_real(v):
            raise PlanError(f"plan field {name}.{k} must be a string, finite number, boolean or null")
        out[k] = float(v) if isinstance(v, float) else v
    return out


def _model(v: object) -> dict:
    d = _dict(v, "model")
    known = ("name", "num_layers", "num_kv_heads", "head_dim", "num_heads")
    _keys({k: d[k] for k in d if k in known}, "model", known[:4], known[4:])
    out = {
        "name": _str(d["name"], "model.name"),
        "num_layers": _int(d["num_layers"], "model.num_layers", 1, MAX_LAYERS),
        "num_kv_heads": _int(d["num_kv_heads"], "model.num_kv_heads", 1, MAX_KV_HEADS),
        "head_dim": _int(d["head_dim"], "model.head_dim", 1, MAX_HEAD_DIM),
        "num_heads": None,
    }
    if d.get("num_heads") is not None:
        out["num_heads"] = _int(d["num_heads"], "model.num_heads", 1, MAX_KV_HEADS * 1024)
    if out["num_layers"] * out["num_kv_heads"] > MAX_COMPONENTS_PER_KIND:
        raise PlanError(f"plan model has more than {MAX_COMPONENTS_PER_KIND} (layer, kv-head) pairs")
    try:
        Geometry(out["num_layers"], out["num_kv_heads"], out["head_dim"], out["num_heads"])
    except RateQuantError as exc:
        raise PlanError(f"plan field model: {exc}") from None
    out.update(_scalar_extras(d, "model", known))
    return out


def _quantizer(v: object) -> dict:
    d = _dict(v, "quantizer")
    _keys(d, "quantizer", ("name",), ("params",))
    params = d.get("params", {})
    _dict(params, "quantizer.params")
    params = check_json_value(
        params, "plan field quantizer.params", max_depth=MAX_PARAM_DEPTH, max_items=MAX_PARAM_ITEMS, error=PlanError
    )
    return {"name": _str(d["name"], "quantizer.name"), "params": params}


def _known_design(name: str) -> str:
    """``name`` when it is a registered quantizer design, else a PlanError naming the known ones."""
    from ratequant.quantizers import available

    if name not in available():
        raise PlanError(
            f"plan field quantizer.name is {show_value(name)}, which is not a quantizer design this ratequant knows "
            f"({', '.join(available())}); the plan was made by another tool or a newer ratequant"
        )
    return name


def _budget(v: object) -> dict:
    d = _dict(v, "budget")
    try:
        return Budget.from_dict(d).to_dict()
    except RateQuantError as exc:
        raise PlanError(f"plan field budget: {exc}") from None


def _bits(v: object, num_layers: int, num_kv_heads: int) -> dict:
    d = _dict(v, "bits")
    _keys(d, "bits", KINDS)
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
            clean.append([_int(b, f"bits.{kind}[{layer}]", 1, 8) for b in row])
        out[kind] = clean
    return out


def _fit(v: object, shape: tuple[int, int, int]) -> dict | None:
    if v is None:
        return None
    d = _dict(v, "fit")
    extra = {k: d[k] for k in ("metric", "design", "measured") if k in d}
    rest = {k: d[k] for k in d if k not in extra}
    try:
        fit = DistortionFit.from_dict(rest)
    except RateQuantError as exc:
        raise PlanError(f"plan field fit: {exc}") from None
    if fit.shape != shape:
        raise PlanError(f"plan field fit covers components {fit.shape} but the plan's model has {shape}")
    out = fit.to_dict()
    out["metric"] = None if extra.get("metric") is None else _str(extra["metric"], "fit.metric")
    out["design"] = None if extra.get("design") is None else _str(extra["design"], "fit.design")
    if extra.get("measured") is not None:
        out["measured"] = _measured(extra["measured"], shape, len(fit.bitset))
    return out


def _measured(v: object, shape: tuple[int, int, int], num_bits: int) -> dict:
    """The measured distortion table behind a fit: ``{"key": [L][H][nb], "value": ...}``, finite and >= 0."""
    d = _dict(v, "fit.measured")
    _keys(d, "fit.measured", KINDS)
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


def _calibration(v: object) -> dict | None:
    if v is None:
        return None
    d = _dict(v, "calibration")
    known = ("corpus", "corpus_sha256", "tokens", "seconds", "phases")
    _keys({k: d[k] for k in d if k in known}, "calibration", known[:4], known[4:])
    sha = d["corpus_sha256"]
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
        raise PlanError(
            f"plan field calibration.corpus_sha256 must be 64 lowercase hex digits or null, got {show_value(sha)}"
        )
    out = {
        "corpus": _str(d["corpus"], "calibration.corpus"),
        "corpus_sha256": sha,
        "tokens": _int(d["tokens"], "calibration.tokens", 0, 2**62),
        "seconds": _float(d["seconds"], "calibration.seconds", lo=0.0),
    }
    phases = _dict(d.get("phases", {}), "calibration.phases")
    if len(phases) > MAX_EXTRA_FIELDS:
        raise PlanError(f"plan field calibration.phases has more than {MAX_EXTRA_FIELDS} entries")
    out["phases"] = {
        _str(k, "calibration.phases key"): _float(s, f"calibration.phases.{k}", lo=0.0) for k, s in phases.items()
    }
    out.update(_scalar_extras(d, "calibration", known))
    return out


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A validated allocation artifact. Construct with :meth:`from_allocation`, :meth:`from_dict` or :meth:`load`.

    Every field is stored in canonical JSON form (plain dicts, lists, ints, floats), so equality,
    ``to_dict`` and JSON round trips are exact. ``bits`` is ``{"key": [[int]*H]*L, "value": ...}``.
    """

    model: dict
    quantizer: dict
    budget: dict
    allocator: str
    avg_bits: float
    bits: dict
    bytes_per_token: float | None = None
    residual_length: int = 0
    sink_tokens: int = 0
    fit: dict | None = None
    calibration: dict | None = None
    created_by: str = field(default=f"ratequant {__version__}")
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        version = _int(self.format_version, "format_version", 1, 2**31)
        if version > FORMAT_VERSION:
            raise PlanError(
                f"plan format version {version} is newer than this ratequant reads ({FORMAT_VERSION}); "
                "upgrade ratequant to use this plan"
            )
        model = _model(self.model)
        shape = (2, model["num_layers"], model["num_kv_heads"])
        bits = _bits(self.bits, model["num_layers"], model["num_kv_heads"])
        budget = _budget(self.budget)
        avg = _float(self.avg_bits, "avg_bits", lo=1.0, hi=8.0)
        mean = float(np.asarray([bits["key"], bits["value"]], dtype=np.float64).mean())
        if abs(avg - mean) > 1e-9:
            raise PlanError(f"plan field avg_bits is {avg:g} but the widths in bits average {mean:.12g}")
        if budget["kind"] == "avg_bits" and abs(avg - budget["value"]) > 1e-9 * budget["value"]:
            raise PlanError(f"plan average {avg:g} bits does not meet its own budget of {budget['value']:g} bits")
        nbytes = self.bytes_per_token
        if nbytes is not None:
            nbytes = _float(nbytes, "bytes_per_token", lo=0.0, lo_open=True)
            if budget["kind"] == "bytes_per_token" and nbytes > budget["value"] * (1 + 1e-9):
                raise PlanError(f"plan takes {nbytes:g} bytes per token, over its own budget of {budget['value']:g}")
        quantizer = _quantizer(self.quantizer)
        _known_design(quantizer["name"])
        values = {
            "format_version": version,
            "created_by": _str(self.created_by, "created_by"),
            "model": model,
            "quantizer": quantizer,
            "budget": budget,
            "allocator": _str(self.allocator, "allocator"),
            "avg_bits": avg,
            "bytes_per_token": nbytes,
            "residual_length": _int(self.residual_length, "residual_length", 0, 2**40),
            "sink_tokens": _int(self.sink_tokens, "sink_tokens", 0, MAX_SINK_TOKENS),
            "bits": bits,
            "fit": _fit(self.fit, shape),
            "calibration": _calibration(self.calibration),
        }
        if version < 2 and values["sink_tokens"]:
            raise PlanError("plan field sink_tokens needs format_version 2")
        if len(values["allocator"]) > 64:
            raise PlanError("plan field allocator must be at most 64 characters")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    __hash__ = None  # type: ignore[assignment]

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_allocation(
        cls,
        allocation: Allocation,
        *,
        model_name: str,
        geometry: Geometry,
        quantizer,
        budget: Budget,
        fit: DistortionFit | None = None,
        metric: str | None = None,
        fit_design: str | None = None,
        measured: np.ndarray | None = None,
        calibration: dict | None = None,
        residual_length: int = 0,
        sink_tokens: int = 0,
    ) -> Plan:
        """Build a plan from an :class:`Allocation` and its context.

        ``quantizer`` is a quantizer design (with ``to_config()``) or ``{"name", "params"}``; ``fit_design``
        names the design whose curves were fitted (default: the design the allocation's curves came from,
        else the quantizer's name).
        """
        if not isinstance(allocation, Allocation):
            raise PlanError(f"from_allocation needs an Allocation, got {type(allocation).__name__}")
        if not isinstance(geometry, Geometry):
            raise PlanError(f"from_allocation needs a Geometry, got {type(geometry).__name__}")
        if allocation.bits.shape != geometry.shape:
            raise PlanError(f"allocation bits {allocation.bits.shape} do not match the geometry {geometry.shape}")
        qconf = quantizer.to_config() if hasattr(quantizer, "to_config") else quantizer
        fit_dict = None
        if fit is not None:
            fit_dict = fit.to_dict()
            fit_dict["metric"] = metric
            source = (allocation.details.get("curves") or {}).get("design")
            fit_dict["design"] = fit_design or source or qconf.get("name")
            if measured is not None:
                fit_dict["measured"] = {
                    "key": np.asarray(measured[0]).tolist(),
                    "value": np.asarray(measured[1]).tolist(),
                }
        if calibration is not None and hasattr(calibration, "to_dict"):
            calibration = calibration.to_dict()
        return cls(
            model={"name": model_name, **geometry.to_dict()},
            quantizer=qconf,
            budget=budget.to_dict() if isinstance(budget, Budget) else budget,
            allocator=allocation.method,
            avg_bits=allocation.avg_bits,
            bytes_per_token=allocation.bytes_per_token,
            residual_length=residual_length,
            sink_tokens=sink_tokens,
            bits={kind: allocation.bits[k].tolist() for k, kind in enumerate(KINDS)},
            fit=fit_dict,
            calibration=calibration,
        )

    @classmethod
    def from_dict(cls, d: object) -> Plan:
        """Validate and build a plan from parsed JSON; anything malformed raises :class:`PlanError`."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a JSON object, got {show_value(d)}")
        if "format_version" not in d:
            raise PlanError("this is not a ratequant plan: it has no format_version field")
        _int(d["format_version"], "format_version", 1, 2**31)
        if d["format_version"] > FORMAT_VERSION:
            raise PlanError(
                f"plan format version {d['format_version']} is newer than this ratequant reads "
                f"({FORMAT_VERSION}); upgrade ratequant to use this plan"
            )
        _keys(d, "(top level)", _REQUIRED, tuple(k for k in _TOP_LEVEL if k not in _REQUIRED))
        return cls(**d)

    def to_dict(self) -> dict:
        """The plan as JSON data (a deep copy, keys in a fixed order)."""
        return copy.deepcopy({name: getattr(self, name) for name in _TOP_LEVEL})

    # -- files ----------------------------------------------------------------------------------------
    def to_json_text(self) -> str:
        """The file text: indented JSON with each innermost list on one line, UTF-8, newline-terminated."""
        return _dumps(self.to_dict()) + "\n"

    def to_json(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically (temp file in the same folder, then rename); refuse to replace unless ``overwrite``."""
        return write_text_atomic(path, self.to_json_text(), overwrite=overwrite, what="plan", error=PlanError)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read and validate a plan file; every failure is a :class:`PlanError` that names ``path``."""
        data = read_json(path, what="plan file", error=PlanError)
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"plan file {path}: {exc}") from None

    # -- use ------------------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        m = self.model
        return Geometry(m["num_layers"], m["num_kv_heads"], m["head_dim"], m["num_heads"])

    def design(self):
        """The plan's quantizer design, checked against the plan: a :class:`~ratequant.quantizers.Quantizer`.

        Raises :class:`PlanError` when the parameters do not build the design (unknown or out-of-range
        parameters), when the design cannot store the plan's ``head_dim`` (e.g. a group size that does not
        divide it), or when ``residual_length`` is not a multiple of the design's token group.
        """
        return self.policy().quantizer

    def policy(
        self, quantizer=None, *, residual_length: int | None = None, sink_tokens: int | None = None
    ) -> StoragePolicy:
        """The plan's :class:`StoragePolicy` (or with another ``quantizer``, residual window or sink count),
        checked against the plan's widths and head dimension; failures are :class:`PlanError`."""
        from ratequant.quantizers import from_config

        name = self.quantizer["name"] if quantizer is None else quantizer.name
        try:
            if quantizer is None:
                quantizer = from_config(self.quantizer)
            bits = self.bits_array()
            for k, kind in enumerate(KINDS):
                for width in np.unique(bits[k]).tolist():
                    quantizer.metadata_bits_per_token(self.model["head_dim"], int(width), kind)
            return StoragePolicy(
                quantizer,
                self.residual_length if residual_length is None else residual_length,
                self.sink_tokens if sink_tokens is None else sink_tokens,
            )
        except (RateQuantError, TypeError) as exc:
            raise PlanError(f"plan quantizer {name} does not fit the plan: {exc}") from None

    def resolve(
        self,
        model,
        quantizer=None,
        *,
        residual_length: int | None = None,
        sink_tokens: int | None = None,
        allow_mismatch: bool = False,
    ) -> KVQuantSpec:
        """The :class:`KVQuantSpec` to apply this plan to ``model``, after checking it fits.

        The plan's geometry must match the model's and ``quantizer`` (default: the plan's own) the design the
        plan was calibrated for (another one raises unless ``allow_mismatch``: a distortion-model mismatch).
        ``residual_length`` and ``sink_tokens`` default to the plan's.
        """
        from ratequant.compat import model_geometry

        self.check_matches(model_geometry(model))
        if quantizer is not None:
            self.check_quantizer(quantizer, allow_mismatch=allow_mismatch)
        policy = self.policy(quantizer, residual_length=residual_length, sink_tokens=sink_tokens)
        spec = KVQuantSpec(self.bits_array(), policy.quantizer, policy.residual_length, policy.sink_tokens)
        spec.check_model(model)
        return spec

    def bits_array(self) -> np.ndarray:
        """Widths as an ``int64`` array ``[2, num_layers, num_kv_heads]`` (kind 0 = key)."""
        return np.array([self.bits["key"], self.bits["value"]], dtype=np.int64)

    def budget_object(self) -> Budget:
        return Budget.from_dict(self.budget)

    def fit_object(self) -> DistortionFit | None:
        """The fitted distortion model, or None for baselines without one."""
        if self.fit is None:
            return None
        return DistortionFit.from_dict({k: v for k, v in self.fit.items() if k not in ("metric", "design", "measured")})

    def _describe_geometry(self, g: Geometry | dict) -> str:
        if isinstance(g, Geometry):
            g = g.to_dict()
        heads = f", {g['num_heads']} query heads" if g.get("num_heads") else ""
        return f"{g['num_layers']} layers x {g['num_kv_heads']} kv heads x head_dim {g['head_dim']}{heads}"

    def check_matches(self, geometry: Geometry) -> None:
        """Raise :class:`PlanError` naming both geometries unless the plan was made for ``geometry``."""
        if not isinstance(geometry, Geometry):
            raise PlanError(f"check_matches needs a Geometry, got {type(geometry).__name__}")
        mine = self.geometry
        same = (mine.num_layers, mine.num_kv_heads, mine.head_dim) == (
            geometry.num_layers,
            geometry.num_kv_heads,
            geometry.head_dim,
        )
        if same and mine.num_heads is not None and geometry.num_heads is not None:
            same = mine.num_heads == geometry.num_heads
        if not same:
            raise PlanError(
                f"this plan was made for {self.model['name']} ({self._describe_geometry(mine)}) but the model "
                f"it is applied to has {self._describe_geometry(geometry)}; calibrate a plan for this model"
            )

    def check_quantizer(self, quantizer, *, allow_mismatch: bool = False) -> None:
        """Refuse (PlanError) a quantizer other than the one the plan was made for, unless ``allow_mismatch``.

        With ``allow_mismatch`` a mismatch only warns: the allocation was optimised for another design's
        distortion curves and may do worse than uniform (the paper's distortion-model mismatch).
        """
        from ratequant.quantizers import from_config

        conf = quantizer.to_config() if hasattr(quantizer, "to_config") else quantizer
        try:
            conf = _quantizer(json.loads(json.dumps(conf)))
        except (TypeError, ValueError, PlanError) as exc:
            raise PlanError(f"cannot compare quantizers: {exc}") from None
        if conf == self.quantizer:
            return
        try:  # compare with defaults filled in: a plan that omits a parameter at its default is the same design
            mine = _quantizer(json.loads(json.dumps(self.design().to_config())))
            other = _quantizer(json.loads(json.dumps(from_config(conf).to_config())))
        except (RateQuantError, TypeError, ValueError):
            mine, other = self.quantizer, conf
        if mine == other:
            return
        msg = (
            f"this plan was calibrated for quantizer {self.quantizer['name']} {self.quantizer['params']} but is "
            f"applied with {conf['name']} {conf['params']}; its widths were chosen for another distortion curve "
            "and can do worse than uniform. Calibrate a plan for this quantizer"
        )
        if not allow_mismatch:
            raise PlanError(
                msg + ", or allow the mismatch explicitly (allow_mismatch=True; --allow-mismatch on the command line)"
            )
        warnings.warn(msg, UserWarning, stacklevel=2)

    def summary(self) -> str:
        """Human-readable report: model, quantizer, budget, width histograms, fit and calibration."""
        bits = self.bits_array()
        lines = [
            f"plan (format {self.format_version}, {self.created_by}): allocator {self.allocator}",
            f"model: {self.model['name']} ({self._describe_geometry(self.model)})",
            f"quantizer: {self.quantizer['name']} {json.dumps(self.quantizer['params'], sort_keys=True)}",
            f"budget: {self.budget_object().describe()}; average code bits {self.avg_bits:.4f}"
            + (f"; {self.bytes_per_token:.1f} bytes per token" if self.bytes_per_token is not None else "")
            + (f"; residual window {self.residual_length} tokens" if self.residual_length else "")
            + (f"; {self.sink_tokens} sink token(s) at full precision" if self.sink_tokens else ""),
        ]
        for k, kind in enumerate(KINDS):
            hist = Counter(bits[k].reshape(-1).tolist())
            text = "  ".join(f"{b}b:{hist[b]}" for b in sorted(hist))
            lines.append(f"{kind + 's':7s} mean {bits[k].mean():.3f}  widths {text}")
        if self.fit is not None:
            r2 = np.array([self.fit["r2"]["key"], self.fit["r2"]["value"]])
            lines.append(
                f"fit: beta key {self.fit['beta_key']:.3f}, value {self.fit['beta_value']:.3f}; R^2 overall "
                f"{self.fit['r2_overall']:.4f}, worst component {r2.min():.4f}; metric {self.fit['metric']}"
                + (f"; curves of {self.fit['design']}" if self.fit.get("design") else "")
            )
        if self.calibration is not None:
            c = self.calibration
            sha = c["corpus_sha256"][:12] if c["corpus_sha256"] else "none"
            lines.append(f"calibration: {c['corpus']} (sha256 {sha}), {c['tokens']} tokens, {c['seconds']:.2f} s")
        return "\n".join(lines)


def _dumps(obj: object, level: int = 0) -> str:
    """Indented JSON with innermost lists (of numbers) on one line, so a plan stays readable and diffable."""
    pad = "  " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(obj, list) and any(isinstance(x, (list, dict)) for x in obj):
        items = [pad + _dumps(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


__all__ = ["FORMAT_VERSION", "MAX_PLAN_BYTES", "Plan"]
