"""Fit the exponential distortion model ``d_i(b) ~ alpha_i * beta^(-b)`` to measured distortion tables.

RateQuant (arXiv:2605.06675) models the distortion of component ``i`` (one kind/layer/kv-head) quantized at
``b`` bits as ``alpha_i * beta^(-b)``: ``alpha_i`` carries the component's importance and scale, ``beta`` the
decay rate of the quantizer design (the paper reports 3.6 to 5.3 across designs). The fit is log-linear least
squares, ``log d_ij = log alpha_i - b_j log beta``; with ``beta`` shared by all components of a kind and one
intercept per component, the joint least-squares slope has a closed form: the pooled *within-component*
regression of ``log d`` on ``b`` (each component centred on its own means). See ``docs/method.md``.

Tables are ``float64`` arrays ``table[2, L, H, nb]`` (kind 0 = key, 1 = value; layer; kv-head; index into
``bitset``). Non-positive entries (exact reconstruction at 8 bits can measure 0) are never passed to
``log``: every entry at or below ``floor_i = REL_FLOOR * max_j table[i, j]`` is *clipped* to that floor and
left out of the regression (it carries no slope information, and a floor value would bend the fitted line).
A component whose entries are all non-positive gets ``alpha = 0`` (it never needs bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS
from ratequant.validation import check_bitset, finite_real

REL_FLOOR = 1e-12
"""Entries at or below ``REL_FLOOR * (component max)`` are clipped to it and excluded from the fit."""

SHARED_BETA_MODES = ("kind", "component", "global")
"""``kind``: one beta for keys, one for values (the default, as the paper); ``component``: a beta per
component (more parameters, reported for diagnosis); ``global``: one beta for everything."""

_R2_TINY = 1e-24


def check_table(table: np.ndarray, bitset: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate a distortion table ``[2, L, H, nb]`` against its ``bitset``; return a float64 copy."""
    bitset = check_bitset(bitset)
    arr = np.asarray(table)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise RateQuantError(f"distortion table must be a numeric array, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[0] != 2 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise RateQuantError(f"distortion table must have shape [2, layers, kv_heads, nb], got {arr.shape}")
    if arr.shape[3] != len(bitset):
        raise RateQuantError(f"distortion table has {arr.shape[3]} bit columns but bitset {bitset} has {len(bitset)}")
    if not np.isfinite(arr).all():
        raise RateQuantError("distortion table holds NaN or Inf; re-run the measurement")
    return arr, bitset


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class DistortionFit:
    """A fitted distortion model for every component.

    ``alpha``, ``r2`` and ``beta`` are ``[2, L, H]``; ``beta`` is the decay used for prediction (equal to
    ``beta_key`` / ``beta_value`` on each kind unless ``shared_beta == "component"``). ``r2`` is per
    component in log space (it can be negative with a shared slope); ``r2_overall`` is the pooled
    within-component R^2 over all fitted points; ``worst_residual`` is ``max |log d - log d_hat|``.
    """

    alpha: np.ndarray
    beta_key: float
    beta_value: float
    r2: np.ndarray
    r2_overall: float
    worst_residual: float
    bitset: tuple[int, ...]
    shared_beta: str = "kind"
    beta: np.ndarray | None = None
    n_clipped: int = 0
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        alpha = np.asarray(self.alpha, dtype=np.float64)
        if alpha.ndim != 3 or alpha.shape[0] != 2 or min(alpha.shape) < 1:
            raise RateQuantError(f"fit: alpha must have shape [2, layers, kv_heads], got {alpha.shape}")
        if not np.isfinite(alpha).all() or (alpha < 0).any():
            raise RateQuantError("fit: alpha must be finite and non-negative")
        for name in ("beta_key", "beta_value"):
            v = getattr(self, name)
            if not finite_real(v) or v <= 1:
                raise RateQuantError(f"fit: {name} must be a finite number > 1, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.shared_beta not in SHARED_BETA_MODES:
            raise RateQuantError(f"fit: shared_beta must be one of {SHARED_BETA_MODES}, got {self.shared_beta!r}")
        if self.beta is None:
            beta = np.empty_like(alpha)
            beta[0], beta[1] = self.beta_key, self.beta_value
        else:
            beta = np.asarray(self.beta, dtype=np.float64)
            if beta.shape != alpha.shape or not np.isfinite(beta).all() or (beta <= 1).any():
                raise RateQuantError(f"fit: beta must be finite, > 1 and shaped like alpha {alpha.shape}")
        r2 = np.asarray(self.r2, dtype=np.float64)
        if r2.shape != alpha.shape or not np.isfinite(r2).all() or (r2 > 1 + 1e-12).any():
            raise RateQuantError(f"fit: r2 must be finite, <= 1 and shaped like alpha {alpha.shape}")
        for name in ("r2_overall", "worst_residual"):
            v = getattr(self, name)
            if not finite_real(v):
                raise RateQuantError(f"fit: {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.r2_overall > 1 + 1e-12 or self.worst_residual < 0:
            raise RateQuantError("fit: r2_overall must be <= 1 and worst_residual >= 0")
        if isinstance(self.n_clipped, bool) or not isinstance(self.n_clipped, (int, np.integer)) or self.n_clipped < 0:
            raise RateQuantError(f"fit: n_clipped must be a non-negative integer, got {self.n_clipped!r}")
        object.__setattr__(self, "n_clipped", int(self.n_clipped))
        object.__setattr__(self, "bitset", check_bitset(self.bitset, name="fit bitset", min_len=2))
        object.__setattr__(self, "alpha", _frozen(alpha))
        object.__setattr__(self, "beta", _frozen(beta))
        object.__setattr__(self, "r2", _frozen(r2))
        object.__setattr__(self, "details", dict(self.details))

    # -- shape ------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(2, num_layers, num_kv_heads)``."""
        return tuple(self.alpha.shape)  # type: ignore[return-value]

    # -- prediction -------------------------------------------------------------------------------------
    def predict(self, bits: np.ndarray) -> np.ndarray:
        """Predicted distortion ``alpha * beta^(-bits)`` for ``bits`` ``[2, L, H]`` (integer or real)."""
        bits = np.asarray(bits, dtype=np.float64)
        if bits.shape != self.alpha.shape:
            raise RateQuantError(f"predict: bits must have shape {self.alpha.shape}, got {bits.shape}")
        return self.alpha * np.power(self.beta, -bits)

    def curves(self, bitset: Sequence[int]) -> np.ndarray:
        """Predicted table ``[2, L, H, len(bitset)]`` at any widths (the model extrapolates)."""
        bs = np.asarray(check_bitset(bitset), dtype=np.float64)
        return self.alpha[..., None] * np.power(self.beta[..., None], -bs)

    def predicted_table(self) -> np.ndarray:
        """Predicted table ``[2, L, H, nb]`` at the fitted ``bitset``."""
        return self.curves(self.bitset)

    # -- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable dict (floats are plain Python floats, so JSON round trips are exact)."""
        d = {
            "shared_beta": self.shared_beta,
            "bitset": list(self.bitset),
            "beta_key": self.beta_key,
            "beta_value": self.beta_value,
            "alpha": _kinds_to_lists(self.alpha),
            "r2": _kinds_to_lists(self.r2),
            "r2_overall": self.r2_overall,
            "worst_residual": self.worst_residual,
            "n_clipped": self.n_clipped,
        }
        if self.shared_beta == "component":
            d["beta"] = _kinds_to_lists(self.beta)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistortionFit:
        """Inverse of :meth:`to_dict`; raises :class:`RateQuantError` on any malformed input."""
        if not isinstance(d, dict):
            raise RateQuantError(f"fit must be an object, got {type(d).__name__}")
        required = {"bitset", "beta_key", "beta_value", "alpha", "r2", "r2_overall", "worst_residual"}
        optional = {"shared_beta", "n_clipped", "beta"}
        missing = required - set(d)
        if missing:
            raise RateQuantError(f"fit is missing field(s): {', '.join(sorted(missing))}")
        unknown = set(d) - required - optional
        if unknown:
            raise RateQuantError(f"fit has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        if not isinstance(d["bitset"], list):
            raise RateQuantError("fit: bitset must be a list of integers")
        alpha = _lists_to_kinds(d["alpha"], "fit.alpha")
        r2 = _lists_to_kinds(d["r2"], "fit.r2", shape=alpha.shape)
        shared = d.get("shared_beta", "kind")
        beta = None
        if "beta" in d and d["beta"] is not None:
            beta = _lists_to_kinds(d["beta"], "fit.beta", shape=alpha.shape)
        if shared == "component" and beta is None:
            raise RateQuantError("fit: shared_beta 'component' needs the per-component 'beta' field")
        if shared != "component" and beta is not None:
            raise RateQuantError("fit: a per-component 'beta' field needs shared_beta 'component'")
        return cls(
            alpha=alpha,
            beta_key=d["beta_key"],
            beta_value=d["beta_value"],
            r2=r2,
            r2_overall=d["r2_overall"],
            worst_residual=d["worst_residual"],
            bitset=tuple(d["bitset"]),
            shared_beta=shared,
            beta=beta,
            n_clipped=d.get("n_clipped", 0),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DistortionFit):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def summary(self) -> str:
        """Short human-readable report of the fit quality."""
        lines = [
            f"beta: key {self.beta_key:.3f}, value {self.beta_value:.3f} (shared per {self.shared_beta})",
            f"R^2 (log space): overall {self.r2_overall:.4f}; per component min {self.r2.min():.4f}, "
            f"median {float(np.median(self.r2)):.4f}; worst |log residual| {self.worst_residual:.3f}",
        ]
        if self.n_clipped:
            lines.append(f"{self.n_clipped} table entries at or below the floor were left out of the fit")
        return "\n".join(lines)


def _kinds_to_lists(a: np.ndarray) -> dict:
    return {kind: [[float(v) for v in row] for row in a[k]] for k, kind in enumerate(KINDS)}


def _lists_to_kinds(obj: object, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``{"key": [[float]*H]*L, "value": ...}`` -> float array ``[2, L, H]``, strictly validated."""
    if not isinstance(obj, dict) or set(obj) != set(KINDS):
        raise RateQuantError(f"{name} must be an object with exactly the fields 'key' and 'value'")
    out = []
    for kind in KINDS:
        rows = obj[kind]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            raise RateQuantError(f"{name}.{kind} must be a non-empty list of non-empty lists of numbers")
        width = len(rows[0])
        if any(len(r) != width for r in rows):
            raise RateQuantError(f"{name}.{kind} rows must all have the same length")
        for r in rows:
            for v in r:
                if not finite_real(v):
                    raise RateQuantError(f"{name}.{kind} must hold finite numbers, got {v!r}")
        out.append(np.array(rows, dtype=np.float64))
    if out[0].shape != out[1].shape:
        raise RateQuantError(f"{name}: key and value shapes differ: {out[0].shape} vs {out[1].shape}")
    arr = np.stack(out)
    if shape is not None and arr.shape != shape:
        raise RateQuantError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def _pooled_slope(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Pooled within-component slope of ``y`` on ``x`` with 0/1 weights ``w`` (rows are components).

    Returns ``(numerator, denominator)`` so callers can pool further or detect ``denominator == 0``.
    """
    n = w.sum(axis=-1, keepdims=True)
    safe = np.maximum(n, 1)
    xbar = (w * x).sum(axis=-1, keepdims=True) / safe
    ybar = (w * y).sum(axis=-1, keepdims=True) / safe
    dx = (x - xbar) * w
    return float((dx * (y - ybar)).sum()), float((dx * (x - xbar)).sum())


def fit_distortion(
    table: np.ndarray,
    bitset: Sequence[int],
    *,
    shared_beta: str = "kind",
    rel_floor: float = REL_FLOOR,
    min_bits: tuple[int, int] | np.ndarray | None = None,
) -> DistortionFit:
    """Fit ``d_i(b) = alpha_i * beta^(-b)`` to ``table`` ``[2, L, H, nb]`` measured at ``bitset``.

    ``shared_beta`` is ``"kind"`` (one beta for keys, one for values), ``"global"`` or ``"component"``.
    ``beta_key``/``beta_value`` always report the per-kind pooled fit; with ``"component"`` each
    component also gets its own slope (falling back to its kind's beta where it has fewer than two usable
    points or its own slope does not decrease). ``min_bits`` (lowest width of keys and of values, or of every
    component ``[2, L, H]``) leaves the entries below a component's lowest informative width out of the
    regression. Raises :class:`RateQuantError` when a kind's distortion does not decrease with bits (beta <= 1):
    the measurement or the metric is broken.
    """
    arr, bitset = check_table(table, bitset)
    if len(bitset) < 2:
        raise RateQuantError(f"fitting needs distortions at two or more bit widths, got bitset {bitset}")
    if shared_beta not in SHARED_BETA_MODES:
        raise RateQuantError(f"shared_beta must be one of {SHARED_BETA_MODES}, got {shared_beta!r}")
    if not (isinstance(rel_floor, float) and 0 < rel_floor < 1):
        raise RateQuantError(f"rel_floor must be a float in (0, 1), got {rel_floor!r}")
    x = np.broadcast_to(np.asarray(bitset, dtype=np.float64), arr.shape)
    cmax = arr.max(axis=-1, keepdims=True)
    floor = rel_floor * np.maximum(cmax, 0.0)
    valid = (arr > floor) & (cmax > 0)
    n_clipped = int((~valid).sum())
    if min_bits is not None:  # widths below a component's lowest informative width carry no information: left out
        low = np.asarray(min_bits, dtype=np.float64)
        low = low[:, None, None] if low.ndim == 1 else low
        valid &= np.asarray(bitset, dtype=np.float64) >= low[..., None]
    w = valid.astype(np.float64)
    y = np.log(np.where(valid, arr, 1.0))  # never log of a non-positive number; masked entries weigh 0

    # Per-kind pooled slopes (always reported).
    kind_num_den = [_pooled_slope(x[k], y[k], w[k]) for k in range(2)]
    if shared_beta == "global":
        num = sum(n for n, _ in kind_num_den)
        den = sum(d for _, d in kind_num_den)
        kind_num_den = [(num, den), (num, den)]
    kind_beta = []
    for k, (num, den) in enumerate(kind_num_den):
        if den <= 0:
            raise RateQuantError(
                f"cannot fit beta for {KINDS[k]}s: no component has positive distortion at two or more bit "
                "widths; check the distortion measurement"
            )
        beta = math.exp(-num / den)
        if not beta > 1:
            raise RateQuantError(
                f"fitted beta for {KINDS[k]}s is {beta:.4g} <= 1: distortion does not decrease with bits; "
                "check the distortion measurement and metric"
            )
        kind_beta.append(beta)
    log_beta = np.empty(arr.shape[:3])
    log_beta[0], log_beta[1] = math.log(kind_beta[0]), math.log(kind_beta[1])

    n = w.sum(axis=-1)
    safe = np.maximum(n, 1)
    xbar = (w * x).sum(axis=-1) / safe
    ybar = (w * y).sum(axis=-1) / safe
    n_fallback = 0
    if shared_beta == "component":
        dx = (x - xbar[..., None]) * w
        den_c = (dx * (x - xbar[..., None])).sum(axis=-1)
        num_c = (dx * (y - ybar[..., None])).sum(axis=-1)
        slope = np.where(den_c > 0, -num_c / np.where(den_c > 0, den_c, 1.0), 0.0)
        own = (den_c > 0) & (slope > 1e-9)  # beta > 1 by a margin exp() keeps
        n_fallback = int((~own & (n > 0)).sum())
        log_beta = np.where(own, slope, log_beta)

    log_alpha = ybar + log_beta * xbar
    alpha = np.where(n > 0, np.exp(np.where(n > 0, log_alpha, 0.0)), 0.0)
    resid = (y - (log_alpha[..., None] - log_beta[..., None] * x)) * w
    ss_res = (resid**2).sum(axis=-1)
    ss_tot = ((y - ybar[..., None]) ** 2 * w).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(
            ss_tot > _R2_TINY,
            1.0 - ss_res / np.where(ss_tot > _R2_TINY, ss_tot, 1.0),
            np.where(ss_res > _R2_TINY, 0.0, 1.0),
        )
    tot = float(ss_tot.sum())
    r2_overall = 1.0 - float(ss_res.sum()) / tot if tot > _R2_TINY else 1.0
    worst = float(np.abs(resid).max()) if n_clipped < arr.size else 0.0
    return DistortionFit(
        alpha=alpha,
        beta_key=kind_beta[0],
        beta_value=kind_beta[1],
        r2=np.minimum(r2, 1.0),
        r2_overall=min(r2_overall, 1.0),
        worst_residual=worst,
        bitset=bitset,
        shared_beta=shared_beta,
        beta=np.exp(log_beta),
        n_clipped=n_clipped,
        details={"beta_fallback_components": n_fallback} if shared_beta == "component" else {},
    )


__all__ = [
    "REL_FLOOR",
    "SHARED_BETA_MODES",
    "DistortionFit",
    "check_table",
    "fit_distortion",
]
