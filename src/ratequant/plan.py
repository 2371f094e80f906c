"""The plan file: a versioned JSON artifact holding a bit allocation and how it was obtained.

A plan records the model geometry it was made for, the quantizer design (name and parameters), the
budget, the allocator, the integer widths ``bits = {"key": [[b per kv-head] per layer], "value": ...}``,
the fitted distortion model (betas, alphas, R^2) and the calibration run (corpus identity and hash,
tokens, seconds). Loading validates every field (types, ranges, shapes, sizes) and recomputes what can be
recomputed (``avg_bits`` from the widths; ``bytes_per_token`` by the cost model from the widths, design, residual
window and sinks at the context it is stated for), so a damaged or hostile file is refused with a
:class:`~ratequant.errors.PlanError` naming the path, and :meth:`Plan.check_matches`
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

One module of this size because the file's fields, their validation on load and the byte-identical round trip
are one format; the checks of single fields are in :mod:`ratequant.plan_fields`.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from ratequant import __version__
from ratequant.allocation import Allocation, Budget, CostModel
from ratequant.allocation.fitting import DistortionFit
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import KINDS, Geometry
from ratequant.jsonio import JsonDocument
from ratequant.plan_fields import (
    FULL_PRECISION_ITEMSIZES,
    MAX_PLAN_BYTES,
    REQUIRED,
    TOP_LEVEL,
    bits_field,
    budget_field,
    calibration_field,
    fit_field,
    float_field,
    int_field,
    keys_field,
    known_design,
    model_field,
    quantizer_field,
    str_field,
)
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, MAX_SINK_TOKENS, KVQuantSpec, StoragePolicy
from ratequant.validation import inert

FORMAT_VERSION = 2
"""Version of the plan format this library writes and the newest it reads (version 2 added ``sink_tokens``;
version 1 plans load with none)."""


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan(JsonDocument):
    """A validated allocation artifact. Construct with :meth:`from_allocation`, :meth:`from_dict` or :meth:`load`
    (files: :class:`~ratequant.jsonio.JsonDocument`).

    Every field is stored in canonical JSON form (plain dicts, lists, ints, floats), so equality,
    ``to_dict`` and JSON round trips are exact. ``bits`` is ``{"key": [[int]*H]*L, "value": ...}``.
    """

    DOCUMENT = "plan"
    FORMAT_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
    ERROR = PlanError

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
        version = self.check_version(self.format_version)
        model = model_field(self.model)
        shape = (2, model["num_layers"], model["num_kv_heads"])
        bits = bits_field(self.bits, model["num_layers"], model["num_kv_heads"])
        budget = budget_field(self.budget)
        avg = float_field(self.avg_bits, "avg_bits", lo=1.0, hi=8.0)
        mean = float(np.asarray([bits["key"], bits["value"]], dtype=np.float64).mean())
        if abs(avg - mean) > 1e-9:
            raise PlanError(f"plan field avg_bits is {avg:g} but the widths in bits average {mean:.12g}")
        if budget["kind"] == "avg_bits" and abs(avg - budget["value"]) > 1e-9 * budget["value"]:
            raise PlanError(f"plan average {avg:g} bits does not meet its own budget of {budget['value']:g} bits")
        nbytes = self.bytes_per_token
        if nbytes is not None:
            nbytes = float_field(nbytes, "bytes_per_token", lo=0.0, lo_open=True)
            if budget["kind"] == "bytes_per_token" and nbytes > budget["value"] * (1 + 1e-9):
                raise PlanError(f"plan takes {nbytes:g} bytes per token, over its own budget of {budget['value']:g}")
        quantizer = quantizer_field(self.quantizer)
        known_design(quantizer["name"])
        values = {
            "format_version": version,
            "created_by": str_field(self.created_by, "created_by"),
            "model": model,
            "quantizer": quantizer,
            "budget": budget,
            "allocator": str_field(self.allocator, "allocator"),
            "avg_bits": avg,
            "bytes_per_token": nbytes,
            "residual_length": int_field(self.residual_length, "residual_length", 0, 2**40),
            "sink_tokens": int_field(self.sink_tokens, "sink_tokens", 0, MAX_SINK_TOKENS),
            "bits": bits,
            "fit": fit_field(self.fit, shape),
            "calibration": calibration_field(self.calibration),
        }
        if version < 2 and values["sink_tokens"]:
            raise PlanError("plan field sink_tokens needs format_version 2")
        if len(values["allocator"]) > 64:
            raise PlanError("plan field allocator must be at most 64 characters")
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if nbytes is not None:
            self._check_bytes_per_token(nbytes)

    def _check_bytes_per_token(self, stored: float) -> None:
        """Refuse a stored ``bytes_per_token`` that the widths, design, residual window and sinks do not give
        (for any full-precision dtype); skipped when the design does not build (that fails on use)."""
        try:
            figures = {size: self.recomputed_bytes_per_token(size) for size in FULL_PRECISION_ITEMSIZES}
        except RateQuantError:
            return
        if any(abs(stored - value) <= 1e-6 * max(value, 1.0) for value in figures.values()):
            return
        shown = ", ".join(f"{value:.6g} ({size}-byte values)" for size, value in figures.items())
        raise PlanError(
            f"plan field bytes_per_token is {stored:.6g} but its widths, quantizer, residual window and sinks take "
            f"{shown} at {self.stated_context_tokens} tokens of context; the file was edited or damaged: "
            "calibrate it again"
        )

    @property
    def stated_context_tokens(self) -> int:
        """The context at which ``bytes_per_token`` is stated: the byte budget's, else
        :data:`~ratequant.spec.DEFAULT_CONTEXT_TOKENS`."""
        return self.budget.get("context_tokens") or DEFAULT_CONTEXT_TOKENS

    def recomputed_bytes_per_token(self, itemsize: int = 2, context_tokens: int | None = None) -> float:
        """True bytes per token of context of this plan's cache at ``context_tokens`` (default
        :attr:`stated_context_tokens`), with full-precision tokens of ``itemsize`` bytes, by the cost model."""
        used = tuple(int(b) for b in np.unique(self.bits_array()))
        context = self.stated_context_tokens if context_tokens is None else context_tokens
        cost = CostModel.from_policy(self.policy(), self.geometry, context, itemsize=itemsize, bitset=used)
        return cost.bytes_per_token(self.bits_array())

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
        d = cls.check_format(d)
        keys_field(d, "(top level)", REQUIRED, tuple(k for k in TOP_LEVEL if k not in REQUIRED))
        return cls(**d)

    def to_dict(self) -> dict:
        """The plan as JSON data (a deep copy, keys in a fixed order)."""
        return copy.deepcopy({name: getattr(self, name) for name in TOP_LEVEL})

    # -- files ----------------------------------------------------------------------------------------
    def to_json_text(self) -> str:
        """The file text: indented JSON with each innermost list on one line, UTF-8, newline-terminated."""
        return _dumps(self.to_dict()) + "\n"

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
                f"this plan was made for {inert(self.model['name'])} ({self._describe_geometry(mine)}) but the model "
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
            conf = quantizer_field(json.loads(json.dumps(conf)))
        except (TypeError, ValueError, PlanError) as exc:
            raise PlanError(f"cannot compare quantizers: {exc}") from None
        if conf == self.quantizer:
            return
        try:  # compare with defaults filled in: a plan that omits a parameter at its default is the same design
            mine = quantizer_field(json.loads(json.dumps(self.design().to_config())))
            other = quantizer_field(json.loads(json.dumps(from_config(conf).to_config())))
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

    def width_lines(self) -> list[str]:
        """One line per kind: its mean width and how many components take each width."""
        bits = self.bits_array()
        lines = []
        for k, kind in enumerate(KINDS):
            text = "  ".join(f"{b}b:{n}" for b, n in bits_histogram(bits[k]).items())
            lines.append(f"{kind + 's':7s} mean {bits[k].mean():.3f}  widths {text}")
        return lines

    def fit_line(self) -> str:
        """The fitted curves' betas and how well they fit (the plan must have a fit)."""
        r2 = np.array([self.fit["r2"]["key"], self.fit["r2"]["value"]])
        return (
            f"fit: beta key {self.fit['beta_key']:.3f}, value {self.fit['beta_value']:.3f}; R^2 overall "
            f"{self.fit['r2_overall']:.4f}, worst component {r2.min():.4f}; metric {self.fit['metric']}"
            + (f"; curves of {self.fit['design']}" if self.fit.get("design") else "")
        )

    def summary(self) -> str:
        """Human-readable report: model, quantizer, budget, width histograms, fit and calibration (every line
        :func:`~ratequant.validation.inert`: safe to print)."""
        lines = [
            f"plan (format {self.format_version}, {self.created_by}): allocator {self.allocator}",
            f"model: {self.model['name']} ({self._describe_geometry(self.model)})",
            f"quantizer: {self.quantizer['name']} {json.dumps(self.quantizer['params'], sort_keys=True)}",
            f"budget: {self.budget_object().describe()}; average code bits {self.avg_bits:.4f}"
            + (
                f"; {self.geometry.against_full_precision(self.bytes_per_token)} at {self.stated_context_tokens:,} "
                "tokens of context"
                if self.bytes_per_token is not None
                else ""
            )
            + (f"; residual window {self.residual_length} tokens" if self.residual_length else "")
            + (f"; {self.sink_tokens} sink token(s) at full precision" if self.sink_tokens else ""),
        ]
        lines += self.width_lines()
        if self.fit is not None:
            lines.append(self.fit_line())
        if self.calibration is not None:
            c = self.calibration
            sha = c["corpus_sha256"][:12] if c["corpus_sha256"] else "none"
            lines.append(f"calibration: {c['corpus']} (sha256 {sha}), {c['tokens']} tokens, {c['seconds']:.2f} s")
            if isinstance(c.get("search_kl"), float) and isinstance(c.get("search_kl_start"), float):
                lines.append(
                    f"KL search: from {c.get('search_start')} {c['search_kl_start']:.4f} to {c['search_kl']:.4f} on "
                    f"{c.get('search_tokens')} tokens, {c.get('search_moves_kept')} of {c.get('search_proposals')} "
                    "moves kept"
                )
        return "\n".join(inert(line) for line in lines)  # names and notes from a file print inert


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


def bits_histogram(bits: np.ndarray) -> dict[int, int]:
    """``{width: count}`` of an integer bit array, widths ascending."""
    widths, counts = np.unique(np.asarray(bits), return_counts=True)
    return {int(w): int(c) for w, c in zip(widths, counts)}


__all__ = ["FORMAT_VERSION", "MAX_PLAN_BYTES", "Plan", "bits_histogram"]
