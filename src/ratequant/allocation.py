"""Bit allocation by reverse waterfilling, exact integer optimisation, and the baselines.

RateQuant (arXiv:2605.06675) minimises the total predicted distortion ``sum_i d_i(b_i)`` of the
``N = 2 * L * H`` components (kind, layer, kv-head) subject to a storage budget. With the model
``d_i(b) = alpha_i * beta_i^(-b)`` the continuous problem has the reverse-waterfilling closed form
``b_i = clip(log_beta(alpha_i ln(beta) / (lambda c_i)), b_min, b_max)`` (:func:`allocate_closed_form`).
Packed storage needs integer widths: :func:`allocate_integer` returns the exact integer optimum with the
budget met exactly, by a greedy on marginal gains when it is provably exact (contiguous bit set, convex
curves, equal cost per bit) and by a multiple-choice-knapsack dynamic programme otherwise. Derivations and
proofs: ``docs/method.md``.

Every allocator (:func:`rate_quant` and the baselines :func:`uniform`, :func:`kv_split`,
:func:`layerwise` -- one width per layer as in KVTuner --, :func:`mismatched`) takes a *source* of
distortion curves (a :class:`~ratequant.fitting.DistortionFit` or a measured table ``[2, L, H, nb]``), a
:class:`Budget` and the model :class:`~ratequant.geometry.Geometry`, and returns an :class:`Allocation`
with integer bits ``[2, L, H]``. Budgets are in average code bits per element (as the paper) or in true
bytes per token including scales, zeros and the full-precision residual window (:class:`CostModel`);
both are always reported when a cost model is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from ratequant.errors import BudgetError, RateQuantError
from ratequant.fitting import DistortionFit, check_bitset, check_table, finite_real, fit_distortion
from ratequant.geometry import KINDS, Geometry

BUDGET_KINDS = ("avg_bits", "bytes_per_token")
USES = ("fit", "measured")

_EXACT_TOL = 1e-9  # a budget within this (relative) of a reachable value counts as that value
_DP_MAX_WORK = 3e8  # cells x options above which a byte-budget DP coarsens its cost unit


# ---------------------------------------------------------------------------------------------------------
# Budgets and storage cost
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """A storage budget.

    ``kind == "avg_bits"``: mean code bits per element over all components (metadata excluded), met
    exactly. ``kind == "bytes_per_token"``: true bytes per token of the whole KV cache (all layers, heads,
    keys and values; codes, scales, zeros and the full-precision residual window amortised over
    ``context_tokens``), met as an upper bound with the largest reachable allocation under it.
    """

    kind: str
    value: float
    context_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        v = self.value
        if not finite_real(v):
            raise BudgetError(f"budget value must be a finite number, got {v!r}")
        if v <= 0:
            raise BudgetError(f"budget value must be positive, got {v!r}")
        object.__setattr__(self, "value", float(v))
        c = self.context_tokens
        if self.kind == "bytes_per_token":
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
                raise BudgetError(
                    "a bytes-per-token budget needs context_tokens (a positive integer: the context length "
                    f"over which the residual window is amortised), got {c!r}"
                )
            object.__setattr__(self, "context_tokens", int(c))
        elif c is not None:
            raise BudgetError("context_tokens only applies to bytes_per_token budgets; leave it unset")

    @classmethod
    def avg_bits(cls, value: float) -> Budget:
        return cls("avg_bits", value)

    @classmethod
    def bytes_per_token(cls, value: float, context_tokens: int) -> Budget:
        return cls("bytes_per_token", value, context_tokens)

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "value": self.value}
        if self.context_tokens is not None:
            d["context_tokens"] = self.context_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        if not isinstance(d, dict) or "kind" not in d or "value" not in d:
            raise BudgetError(f"budget must be an object with 'kind' and 'value', got {d!r}")
        unknown = set(d) - {"kind", "value", "context_tokens"}
        if unknown:
            raise BudgetError(f"budget has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(d["kind"], d["value"], d.get("context_tokens"))

    def describe(self) -> str:
        if self.kind == "avg_bits":
            return f"{self.value:g} average code bits"
        return f"{self.value:g} bytes per token at {self.context_tokens} tokens of context"


@dataclass(frozen=True, eq=False)
class CostModel:
    """True storage per token of the KV cache as a function of the allocation.

    ``bytes_table[i, j]`` is the bytes per *quantized* token of component ``i`` (flattened ``[2, L, H]``
    order) at width ``bitset[j]``: ``head_dim * b / 8`` code bytes plus metadata (scales, zeros, norms,
    amortised over their groups). The cache's residual policy (``ratequant.cache``) quantizes aligned
    chunks of ``F`` tokens (``chunk_tokens``, per kind: the residual length, or the quantizer's token group
    when it is 0) and keeps the other ``T mod F`` tokens at full precision in its residual window. At ``T =
    context_tokens`` a kind stores ``floor(T / F) * F / T`` quantized tokens per token of context, so

        bytes_per_token(bits) = sum_i stored_fraction_i * bytes_table[i, bits_i] + residual_bytes_per_token
        residual_bytes_per_token = sum_kind (T mod F_kind) * (fp_bytes_per_token / 2) / T
    """

    bitset: tuple[int, ...]
    bytes_table: np.ndarray
    fp_bytes_per_token: float
    residual_length: int = 0
    context_tokens: int = 1
    chunk_tokens: tuple[int, int] | None = None  # F for (keys, values); None: both residual_length

    def __post_init__(self) -> None:
        object.__setattr__(self, "bitset", check_bitset(self.bitset, name="cost model bitset"))
        t = np.array(self.bytes_table, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != len(self.bitset) or t.shape[0] < 1:
            raise RateQuantError(f"cost model: bytes_table must be [N, {len(self.bitset)}], got {t.shape}")
        if not np.isfinite(t).all() or (t <= 0).any():
            raise RateQuantError("cost model: bytes_table must hold finite positive byte counts")
        if (np.diff(t, axis=1) <= 0).any():
            raise RateQuantError("cost model: bytes must increase with the bit width")
        t.setflags(write=False)
        object.__setattr__(self, "bytes_table", t)
        fp = self.fp_bytes_per_token
        if not finite_real(fp) or fp < 0:
            raise RateQuantError(f"cost model: fp_bytes_per_token must be a finite number >= 0, got {fp!r}")
        object.__setattr__(self, "fp_bytes_per_token", float(fp))
        for name, low in (("residual_length", 0), ("context_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise RateQuantError(f"cost model: {name} must be an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))
        chunks = self.chunk_tokens if self.chunk_tokens is not None else (self.residual_length,) * 2
        if len(chunks) != 2 or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in chunks):
            raise RateQuantError(f"cost model: chunk_tokens must be two integers >= 0, got {chunks!r}")
        object.__setattr__(self, "chunk_tokens", (int(chunks[0]), int(chunks[1])))
        if t.shape[0] % 2:
            raise RateQuantError("cost model: bytes_table rows must cover keys then values (an even count)")

    @classmethod
    def from_quantizer(
        cls,
        quantizer,
        geometry: Geometry,
        residual_length: int,
        context_tokens: int,
        kv_dtype_bytes: int = 2,
        bitset: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
    ) -> CostModel:
        """Build from a quantizer design's ``bits_per_token(head_dim, bits, kind)`` (codes + metadata).

        Metadata may depend on the width (e.g. codebooks); it is tabulated per width, never assumed affine.
        """
        bitset = check_bitset(bitset)
        per_kind = np.array(
            [[quantizer.bits_per_token(geometry.head_dim, b, kind) / 8.0 for b in bitset] for kind in KINDS]
        )
        table = np.repeat(per_kind[:, None, :], geometry.num_layers * geometry.num_kv_heads, axis=1)
        chunks = tuple(residual_length or int(quantizer.token_group(kind)) for kind in KINDS)
        return cls(
            bitset=bitset,
            bytes_table=table.reshape(geometry.num_components, len(bitset)),
            fp_bytes_per_token=float(geometry.num_components * geometry.head_dim * kv_dtype_bytes),
            residual_length=residual_length,
            context_tokens=context_tokens,
            chunk_tokens=chunks,
        )

    @classmethod
    def code_only(cls, geometry: Geometry, bitset: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8)) -> CostModel:
        """Codes only, no metadata or residual window (``head_dim * b / 8`` bytes per token)."""
        bitset = check_bitset(bitset)
        row = np.asarray(bitset, dtype=np.float64) * geometry.head_dim / 8.0
        return cls(bitset, np.tile(row, (geometry.num_components, 1)), 0.0, 0, 1)

    @property
    def num_components(self) -> int:
        return self.bytes_table.shape[0]

    @property
    def stored_fractions(self) -> np.ndarray:
        """``[N]`` quantized tokens per token of context, per component (``floor(T / F) * F / T``)."""
        t = self.context_tokens
        per_kind = [(t // f) * f / t if f else 1.0 for f in self.chunk_tokens]
        return np.repeat(per_kind, self.num_components // 2)

    @property
    def residual_bytes_per_token(self) -> float:
        """Full-precision residual-buffer bytes per token of context at ``context_tokens``."""
        t = self.context_tokens
        held = sum(t % f for f in self.chunk_tokens if f)
        return held * self.fp_bytes_per_token / 2 / t

    def _affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        b = np.asarray(self.bitset, dtype=np.float64)
        t = self.bytes_table
        if len(b) == 1:
            return None
        slope = (t[:, -1] - t[:, 0]) / (b[-1] - b[0])
        fixed = t[:, 0] - slope * b[0]
        fitted = fixed[:, None] + slope[:, None] * b[None, :]
        if np.abs(fitted - t).max() > 1e-9 * t.max():
            return None
        return slope, fixed

    @property
    def is_affine(self) -> bool:
        """True when every component's bytes are ``fixed_bytes + bytes_per_bit * b`` (bit-independent metadata)."""
        return self._affine() is not None

    @property
    def bytes_per_bit(self) -> np.ndarray:
        """``[N]`` bytes per token per code bit (``head_dim / 8``); only for affine cost models."""
        aff = self._affine()
        if aff is None:
            raise RateQuantError("cost model is not affine in the bit width; use bytes_table")
        return aff[0]

    @property
    def fixed_bytes(self) -> np.ndarray:
        """``[N]`` metadata bytes per token that do not depend on the width; only for affine cost models."""
        aff = self._affine()
        if aff is None:
            raise RateQuantError("cost model is not affine in the bit width; use bytes_table")
        return aff[1]

    def columns(self, bitset: Sequence[int]) -> np.ndarray:
        """``[N, len(bitset)]`` bytes per token of *context* (``bytes_table`` times the stored fraction)."""
        missing = [b for b in bitset if b not in self.bitset]
        if missing:
            raise RateQuantError(f"cost model has no byte counts for width(s) {missing}; it covers {self.bitset}")
        return self.bytes_table[:, [self.bitset.index(b) for b in bitset]] * self.stored_fractions[:, None]

    def bytes_per_token(self, bits: np.ndarray) -> float:
        """True bytes per token of context for integer ``bits`` (``[2, L, H]`` or flat ``[N]``)."""
        flat = np.asarray(bits).reshape(-1)
        if flat.size != self.num_components:
            raise RateQuantError(f"cost model covers {self.num_components} components, bits has {flat.size}")
        lookup = np.full(9, -1)
        lookup[list(self.bitset)] = np.arange(len(self.bitset))
        if not np.issubdtype(flat.dtype, np.integer) or flat.min() < 1 or flat.max() > 8 or (lookup[flat] < 0).any():
            raise RateQuantError(f"bits must be integers from the cost model's bitset {self.bitset}")
        q = float((self.bytes_table[np.arange(flat.size), lookup[flat]] * self.stored_fractions).sum())
        return q + self.residual_bytes_per_token


# ---------------------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Allocation:
    """Integer widths ``bits [2, L, H]`` with what they cost and what the model predicts they lose.

    ``avg_bits`` is the mean code width; ``bytes_per_token`` the true storage from the cost model (None
    without one); ``predicted_distortion`` the summed distortion under the curves used to allocate (None
    when no curves were given); ``details`` solver and budget information (JSON-friendly except arrays).
    """

    bits: np.ndarray
    avg_bits: float
    bytes_per_token: float | None
    predicted_distortion: float | None
    method: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bits = np.asarray(self.bits)
        if bits.ndim != 3 or bits.shape[0] != 2 or not np.issubdtype(bits.dtype, np.integer):
            raise RateQuantError(f"allocation: bits must be an integer array [2, L, H], got {bits.dtype} {bits.shape}")
        if bits.min() < 1 or bits.max() > 8:
            raise RateQuantError("allocation: bits must lie in 1..8")
        bits = bits.astype(np.int64)
        bits.setflags(write=False)
        object.__setattr__(self, "bits", bits)
        if abs(float(self.avg_bits) - float(bits.mean())) > 1e-9:
            raise RateQuantError(f"allocation: avg_bits {self.avg_bits} != mean of bits {bits.mean()}")
        object.__setattr__(self, "avg_bits", float(self.avg_bits))
        if not isinstance(self.method, str) or not self.method:
            raise RateQuantError("allocation: method must be a non-empty string")

    @property
    def key_bits(self) -> np.ndarray:
        return self.bits[0]

    @property
    def value_bits(self) -> np.ndarray:
        return self.bits[1]


# ---------------------------------------------------------------------------------------------------------
# Closed form (continuous reverse waterfilling)
# ---------------------------------------------------------------------------------------------------------
def allocate_closed_form(
    alpha: np.ndarray,
    beta: np.ndarray | float,
    cost: np.ndarray | float,
    total: float,
    b_min: float,
    b_max: float,
) -> np.ndarray:
    """Continuous optimum of ``min sum alpha_i beta_i^(-b_i)`` s.t. ``sum c_i b_i = total``, ``b_min <= b_i <= b_max``.

    KKT (reverse waterfilling): ``b_i = clip(log_beta_i(alpha_i ln(beta_i) / (lambda c_i)), b_min, b_max)``;
    ``mu = ln(lambda)`` is found by bisection (the spent budget is monotone in ``mu``), then solved exactly
    on the final set of unclipped components. Components with ``alpha_i = 0`` gain nothing from bits: they
    stay at ``b_min`` unless the others are all at ``b_max``, then they share the rest equally.
    Shapes: ``alpha [N]``; ``beta`` and ``cost`` scalars or ``[N]``. Returns ``b [N]`` (float).
    """
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    n = alpha.size
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), (n,)).astype(np.float64)
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), (n,)).astype(np.float64)
    if n == 0:
        raise RateQuantError("closed form: no components")
    if not (np.isfinite(alpha).all() and (alpha >= 0).all()):
        raise RateQuantError("closed form: alpha must be finite and >= 0")
    if not (np.isfinite(beta).all() and (beta > 1).all()):
        raise RateQuantError("closed form: beta must be finite and > 1")
    if not (np.isfinite(cost).all() and (cost > 0).all()):
        raise RateQuantError("closed form: cost must be finite and > 0")
    b_min, b_max, total = float(b_min), float(b_max), float(total)
    if not (math.isfinite(b_min) and math.isfinite(b_max) and b_min <= b_max):
        raise RateQuantError(f"closed form: need finite b_min <= b_max, got {b_min}, {b_max}")
    lo_total, hi_total = float(cost.sum() * b_min), float(cost.sum() * b_max)
    tol = _EXACT_TOL * max(1.0, abs(hi_total))
    if not (lo_total - tol <= total <= hi_total + tol):
        raise BudgetError(
            f"closed form: total {total:g} is outside the reachable range [{lo_total:g}, {hi_total:g}] "
            f"(b_min={b_min:g}, b_max={b_max:g})"
        )
    total = min(max(total, lo_total), hi_total)
    pos = alpha > 0
    b = np.full(n, b_min)
    if b_max == b_min:
        return b
    # Positive components saturated at b_max and still short of the budget: give the rest to alpha == 0.
    sat = float((cost[pos] * b_max).sum() + (cost[~pos] * b_min).sum())
    if sat <= total:
        b[pos] = b_max
        if (~pos).any():
            extra = (total - sat) / cost[~pos].sum()
            b[~pos] = min(b_min + extra, b_max)
        return b

    lb = np.log(beta[pos])
    k = np.log(alpha[pos] * lb / cost[pos])
    cp = cost[pos]
    fixed_spend = float((cost[~pos] * b_min).sum())

    def bits_at(mu: float) -> np.ndarray:
        return np.clip((k - mu) / lb, b_min, b_max)

    def spend(mu: float) -> float:
        return float((cp * bits_at(mu)).sum()) + fixed_spend

    mu_lo = float((k - b_max * lb).min()) - 1.0  # every positive component at b_max: spend >= total
    mu_hi = float((k - b_min * lb).max()) + 1.0  # every positive component at b_min: spend <= total
    for _ in range(200):
        mid = 0.5 * (mu_lo + mu_hi)
        if spend(mid) > total:
            mu_lo = mid
        else:
            mu_hi = mid
        if mu_hi - mu_lo <= 1e-15 * max(1.0, abs(mid)):
            break
    mu = 0.5 * (mu_lo + mu_hi)
    bp = bits_at(mu)
    free = (bp > b_min) & (bp < b_max)
    if free.any():
        # spend is linear in mu on this piece: solve it exactly.
        clipped = float((cp[~free] * bp[~free]).sum()) + fixed_spend
        slope = float((cp[free] / lb[free]).sum())
        mu_exact = (float((cp[free] * k[free] / lb[free]).sum()) - (total - clipped)) / slope
        cand = bits_at(mu_exact)
        if abs(float((cp * cand).sum()) + fixed_spend - total) <= abs(float((cp * bp).sum()) + fixed_spend - total):
            bp = cand
    b[pos] = bp
    return b


# ---------------------------------------------------------------------------------------------------------
# Exact integer allocation
# ---------------------------------------------------------------------------------------------------------
def _reachable_mask(option_costs: np.ndarray) -> int:
    """Bit ``t`` of the returned integer is set when some choice of one option per row costs ``t`` in total."""
    reach = 1
    for row in option_costs:
        new = 0
        for c in row:
            new |= reach << int(c)
        reach = new
    return reach


def _nearest(mask: int, target: int) -> tuple[int | None, int | None]:
    """Largest set bit <= target and smallest set bit >= target of ``mask``."""
    target = max(int(target), 0)
    below_mask = mask & ((1 << (target + 1)) - 1)
    below = below_mask.bit_length() - 1 if below_mask else None
    above_mask = mask >> target
    above = target + (above_mask & -above_mask).bit_length() - 1 if above_mask else None
    return below, above


def is_convex(curves: np.ndarray, bitset: Sequence[int]) -> bool:
    """True when every row of ``curves [N, nb]`` is convex in the width (slopes per bit non-decreasing)."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.shape[1] < 3:
        return True
    b = np.asarray(bitset, dtype=np.float64)
    slope = np.diff(curves, axis=1) / np.diff(b)
    tol = 1e-9 * np.abs(curves).max(axis=1, keepdims=True) + 1e-300
    return bool((np.diff(slope, axis=1) >= -tol).all())


def _greedy(curves: np.ndarray, steps: int) -> np.ndarray:
    """Top-``steps`` marginal gains of convex rows: returns how many +1 steps each row takes ``[N]``.

    Gains are made exactly non-increasing (cumulative minimum, a no-op on convex rows up to rounding), and
    ties are broken by step index, so the chosen steps form a prefix of every row (see docs/method.md).
    """
    n, nb = curves.shape
    if steps == 0 or nb == 1:
        return np.zeros(n, dtype=np.int64)
    gains = np.minimum.accumulate(curves[:, :-1] - curves[:, 1:], axis=1)
    step_index = np.broadcast_to(np.arange(nb - 1), gains.shape).ravel()
    order = np.lexsort((step_index, -gains.ravel()))
    return np.bincount(order[:steps] // (nb - 1), minlength=n).astype(np.int64)


def _dp(curves: np.ndarray, option_costs: np.ndarray, target: int, *, at_most: bool) -> np.ndarray:
    """Multiple-choice knapsack by dynamic programming; returns the chosen option index per row ``[N]``.

    Minimises ``sum_i curves[i, j_i]`` with ``sum_i option_costs[i, j_i] == target`` (or ``<=`` when
    ``at_most``). ``option_costs`` are non-negative integers increasing along each row. O(N * target * nb).
    """
    n, nb = curves.shape
    base = option_costs.min(axis=1)
    oc = option_costs - base[:, None]
    t_total = int(target - base.sum())
    g = reduce(math.gcd, [int(v) for v in np.unique(oc)] + [t_total]) if t_total > 0 else 0
    if g > 1:
        oc = oc // g
        t_total //= g
    best = np.full(t_total + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, t_total + 1), dtype=np.int8)
    reach_hi = 0
    for i in range(n):
        reach_hi = min(t_total, reach_hi + int(oc[i].max()))
        new = np.full(t_total + 1, np.inf)
        arg = choice[i]
        for j in range(nb):
            c = int(oc[i, j])
            if c > reach_hi:
                continue
            cand = best[: reach_hi + 1 - c] + curves[i, j]
            seg = new[c : reach_hi + 1]
            better = cand < seg
            seg[better] = cand[better]
            arg[c : reach_hi + 1][better] = j
        best = new
    if at_most:
        t = int(np.argmin(best))
    else:
        t = t_total
    if not math.isfinite(best[t]):
        raise BudgetError("no combination of the allowed widths meets the budget exactly")
    out = np.empty(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        j = int(choice[i, t])
        out[i] = j
        t -= int(oc[i, j])
    return out


def solve_integer(
    curves: np.ndarray,
    bitset: Sequence[int],
    cost: np.ndarray | int,
    total: int,
) -> tuple[np.ndarray, str]:
    """Exact integer optimum: ``min sum_i curves[i, j_i]`` s.t. ``sum_i cost_i * bitset[j_i] == total``.

    ``curves [N, nb]`` (distortion of row ``i`` at ``bitset[j]``), ``cost`` positive integers per bit
    (``[N]`` or scalar). Returns ``(bits [N], solver)`` with ``solver`` ``"greedy"`` (contiguous bit set,
    convex rows, equal costs: provably exact) or ``"dp"`` (exact dynamic programme otherwise).
    Raises :class:`BudgetError` naming the nearest reachable totals when ``total`` cannot be met exactly.
    """
    curves = np.asarray(curves, dtype=np.float64)
    bitset = check_bitset(bitset)
    if curves.ndim != 2 or curves.shape[1] != len(bitset) or curves.shape[0] < 1:
        raise RateQuantError(f"curves must be [N, {len(bitset)}], got {curves.shape}")
    if not np.isfinite(curves).all():
        raise RateQuantError("curves hold NaN or Inf")
    n = curves.shape[0]
    cost_arr = np.broadcast_to(np.asarray(cost), (n,))
    if not np.issubdtype(cost_arr.dtype, np.integer) or (cost_arr < 1).any():
        raise RateQuantError("cost per bit must be positive integers")
    cost_arr = cost_arr.astype(np.int64)
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)):
        raise RateQuantError(f"total must be an integer number of cost units, got {total!r}")
    total = int(total)
    bs = np.asarray(bitset, dtype=np.int64)
    option_costs = cost_arr[:, None] * bs[None, :]
    lo, hi = int(option_costs[:, 0].sum()), int(option_costs[:, -1].sum())
    contiguous = bitset[-1] - bitset[0] == len(bitset) - 1
    equal = bool((cost_arr == cost_arr[0]).all())
    if not lo <= total <= hi:
        raise BudgetError(f"total {total} is outside the reachable range [{lo}, {hi}]")
    if contiguous and equal and total % int(cost_arr[0]) == 0 and is_convex(curves, bitset):
        steps = _greedy(curves, total // int(cost_arr[0]) - n * bitset[0])
        return bs[steps], "greedy"
    mask = _reachable_mask(option_costs)
    if not (mask >> total) & 1:
        below, above = _nearest(mask, total)
        raise BudgetError(
            f"total {total} cannot be met exactly with widths {bitset}; nearest reachable totals: "
            f"{below} and {above} (range [{lo}, {hi}])"
        )
    return bs[_dp(curves, option_costs, total, at_most=False)], "dp"


def allocate_integer(curves: np.ndarray, bitset: Sequence[int], cost: np.ndarray | int, total: int) -> np.ndarray:
    """Exact integer allocation ``bits [N]`` (see :func:`solve_integer`)."""
    return solve_integer(curves, bitset, cost, total)[0]


# ---------------------------------------------------------------------------------------------------------
# From sources and budgets to allocations
# ---------------------------------------------------------------------------------------------------------
def _resolve(
    source: DistortionFit | np.ndarray | None,
    geometry: Geometry,
    bitset: Sequence[int] | None,
    table_bitset: Sequence[int] | None,
    b_min: int | None,
    b_max: int | None,
    use: str,
    shared_beta: str,
) -> tuple[np.ndarray | None, tuple[int, ...], DistortionFit | None]:
    """Curves ``[2, L, H, nb]`` at the allowed widths (or None without a source), the widths, the fit."""
    if not isinstance(geometry, Geometry):
        raise RateQuantError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    if use not in USES:
        raise RateQuantError(f"use must be one of {USES}, got {use!r}")
    fit: DistortionFit | None = None
    curves = None
    if source is None:
        if bitset is None:
            raise RateQuantError("without distortion curves, pass the allowed widths as bitset")
        allowed = check_bitset(bitset)
    elif isinstance(source, DistortionFit):
        if use == "measured":
            raise RateQuantError("use='measured' needs the measured table, not a fit; pass the table")
        fit = source
        if fit.shape != geometry.shape:
            raise RateQuantError(f"the fit covers components {fit.shape} but the model has {geometry.shape}")
        allowed = check_bitset(fit.bitset if bitset is None else bitset)
    else:
        tb = table_bitset if table_bitset is not None else bitset
        if tb is None:
            raise RateQuantError("a measured table needs its bit widths: pass table_bitset (or bitset)")
        table, tb = check_table(source, tb)
        if table.shape[:3] != geometry.shape:
            raise RateQuantError(f"the table covers components {table.shape[:3]} but the model has {geometry.shape}")
        allowed = check_bitset(tb if bitset is None else bitset)
        if use == "fit":
            fit = fit_distortion(table, tb, shared_beta=shared_beta)
        else:
            missing = [b for b in allowed if b not in tb]
            if missing:
                raise RateQuantError(f"use='measured' cannot allocate widths {missing}: the table has {tb}")
            curves = table[..., [tb.index(b) for b in allowed]]
    lo = 1 if b_min is None else b_min
    hi = 8 if b_max is None else b_max
    restricted = tuple(b for b in allowed if lo <= b <= hi)
    if not restricted:
        raise BudgetError(f"no allowed width in {allowed} lies within [b_min={lo}, b_max={hi}]")
    if fit is not None:
        curves = fit.curves(restricted)
    elif curves is not None and restricted != allowed:
        curves = curves[..., [allowed.index(b) for b in restricted]]
    return curves, restricted, fit


def check_reachable(
    budget: Budget, bitset: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), b_min: int | None = None, b_max: int | None = None
) -> tuple[int, ...]:
    """Refuse, before any measurement, a budget that no allocation with these widths can reach.

    Returns the usable widths (``bitset`` within ``[b_min, b_max]``). An average-bits budget must lie in
    ``[min width, max width]``; whether the exact average is reachable with the model's number of
    components, and byte budgets (which need the quantizer's cost model), are decided by the allocators.
    Raises :class:`BudgetError` naming the reachable range.
    """
    if not isinstance(budget, Budget):
        raise BudgetError(f"budget must be a Budget, got {type(budget).__name__}")
    allowed = check_bitset(bitset)
    lo = 1 if b_min is None else b_min
    hi = 8 if b_max is None else b_max
    usable = tuple(b for b in allowed if lo <= b <= hi)
    if not usable:
        raise BudgetError(f"no allowed width in {allowed} lies within [b_min={lo}, b_max={hi}]")
    if budget.kind == "avg_bits":
        low, high = usable[0], usable[-1]
        if not low * (1 - _EXACT_TOL) <= budget.value <= high * (1 + _EXACT_TOL):
            raise BudgetError(
                f"an average of {budget.value:g} bits cannot be met with widths {usable}: reachable averages lie "
                f"in [{low}, {high}]"
            )
    return usable


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _solve_units(
    curves_u: np.ndarray,
    weight: np.ndarray,
    allowed: tuple[int, ...],
    budget: Budget,
    n_components: int,
    bytes_u: np.ndarray | None,
    cost_model: CostModel | None,
    what: str,
) -> tuple[np.ndarray, dict]:
    """Allocate one width per *unit* (a group of ``weight[u]`` components sharing a width).

    ``curves_u [M, nb]`` summed distortion of each unit; ``bytes_u [M, nb]`` summed bytes per quantized
    token (needed for byte budgets). Returns the unit widths ``[M]`` and solver details.
    """
    bs = np.asarray(allowed, dtype=np.int64)
    option_bits = weight[:, None] * bs[None, :]
    lo_bits, hi_bits = int(option_bits[:, 0].sum()), int(option_bits[:, -1].sum())
    details: dict = {"bitset": list(allowed), "budget": budget.to_dict()}
    if budget.kind == "avg_bits":
        exact = budget.value * n_components
        target = round(exact)
        mask = _reachable_mask(option_bits)
        if not (abs(exact - target) <= _EXACT_TOL * max(1.0, exact) and (mask >> target) & 1):
            below = _nearest(mask, math.floor(exact + _EXACT_TOL))[0]
            above = _nearest(mask, math.ceil(exact - _EXACT_TOL))[1]
            near = [f"{_fmt(v / n_components)}" for v in (below, above) if v is not None]
            raise BudgetError(
                f"{what}: an average of {budget.value:g} bits cannot be met exactly with widths {allowed} over "
                f"{n_components} components; reachable averages lie in [{_fmt(lo_bits / n_components)}, "
                f"{_fmt(hi_bits / n_components)}]; nearest reachable: {' and '.join(near) or 'none'}"
            )
        bits_u, solver = solve_integer(curves_u, allowed, weight, target)
        details.update(solver=solver, total_code_bits=target)
        return bits_u, details

    # Byte budget.
    if cost_model is None or bytes_u is None:
        raise BudgetError(f"{what}: a bytes-per-token budget needs a cost model (CostModel.from_quantizer)")
    if cost_model.context_tokens != budget.context_tokens:
        raise BudgetError(
            f"{what}: the budget is stated at {budget.context_tokens} tokens of context but the cost model "
            f"amortises the residual window over {cost_model.context_tokens}; build both with the same length"
        )
    res = cost_model.residual_bytes_per_token
    if not cost_model.stored_fractions.any():
        raise BudgetError(
            f"{what}: at {cost_model.context_tokens} tokens of context every token sits in the full-precision "
            f"residual window ({cost_model.residual_length} tokens), so bytes do not depend on bits"
        )
    min_bytes = float(bytes_u[:, 0].sum()) + res
    max_bytes = float(bytes_u[:, -1].sum()) + res
    tol = _EXACT_TOL * max_bytes
    if not (min_bytes - tol <= budget.value <= max_bytes + tol):
        raise BudgetError(
            f"{what}: a budget of {budget.value:g} bytes per token is outside the reachable range "
            f"[{_fmt(min_bytes)}, {_fmt(max_bytes)}] for widths {allowed} at {budget.context_tokens} tokens of context"
        )
    b0 = float(bs[0])
    span = bs - bs[0]
    per_bit = None
    if len(allowed) > 1:
        slopes = (bytes_u[:, 1:] - bytes_u[:, :1]) / (weight[:, None] * span[None, 1:])
        if np.abs(slopes - slopes[0, 0]).max() <= 1e-9 * abs(slopes[0, 0]):
            per_bit = float(slopes[0, 0])
    if per_bit is not None or len(allowed) == 1:
        # Affine with one bytes-per-code-bit for everyone: bytes are monotone in the code-bit total.
        mask = _reachable_mask(option_bits)
        if per_bit is None:
            s_target = lo_bits
        else:
            fixed = float((bytes_u[:, 0] - per_bit * weight * b0).sum())
            cap = math.floor(((budget.value + tol - res) - fixed) / per_bit + 1e-9)
            s_target, _ = _nearest(mask, min(cap, hi_bits))
            if s_target is None:
                raise BudgetError(f"{what}: {budget.value:g} bytes per token is below the cheapest allocation "
                                  f"({_fmt(min_bytes)})")
        bits_u, solver = solve_integer(curves_u, allowed, weight, int(s_target))
        details.update(solver=solver, total_code_bits=int(s_target), byte_model="affine")
        return bits_u, details
    # General (metadata depends on the width): DP over bytes rounded up to a unit, so the budget holds.
    unit = 1 / 8.0  # one bit per token of context
    oc = np.ceil(bytes_u / unit - 1e-9).astype(np.int64)
    cap = math.floor((budget.value + tol - res) / unit + 1e-9)
    span_units = int((oc.max(axis=1) - oc.min(axis=1)).sum()) + 1
    work = span_units * oc.size
    if work > _DP_MAX_WORK:
        factor = math.ceil(work / _DP_MAX_WORK)
        unit *= factor
        oc = np.ceil(bytes_u / unit - 1e-9).astype(np.int64)
        cap = math.floor((budget.value + tol - res) / unit + 1e-9)
    if cap < int(oc[:, 0].sum()):
        cap = int(oc[:, 0].sum())  # rounding up pushed the cheapest allocation over: take it (it fits)
    idx = _dp(curves_u, oc, min(cap, int(oc[:, -1].sum())), at_most=True)
    details.update(solver="dp", byte_model="table", byte_unit=unit)
    return bs[idx], details


def _finish(
    bits: np.ndarray,
    geometry: Geometry,
    curves: np.ndarray | None,
    allowed: tuple[int, ...],
    cost_model: CostModel | None,
    method: str,
    details: dict,
) -> Allocation:
    bits = np.asarray(bits, dtype=np.int64).reshape(geometry.shape)
    pred = None
    if curves is not None:
        idx = np.searchsorted(np.asarray(allowed), bits)
        pred = float(np.take_along_axis(curves, idx[..., None], axis=-1).sum())
    nbytes = cost_model.bytes_per_token(bits) if cost_model is not None else None
    return Allocation(bits=bits, avg_bits=float(bits.mean()), bytes_per_token=nbytes,
                      predicted_distortion=pred, method=method, details=details)


def _check_cost_model(cost_model: CostModel | None, geometry: Geometry, allowed: tuple[int, ...]) -> np.ndarray | None:
    if cost_model is None:
        return None
    if not isinstance(cost_model, CostModel):
        raise RateQuantError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
    if cost_model.num_components != geometry.num_components:
        raise RateQuantError(
            f"cost model covers {cost_model.num_components} components but the model has {geometry.num_components}"
        )
    return cost_model.columns(allowed)


def _check_budget(budget: Budget) -> Budget:
    if not isinstance(budget, Budget):
        raise BudgetError(f"budget must be a Budget, got {type(budget).__name__}")
    return budget


def _allocate_grouped(
    groups: np.ndarray,
    source,
    budget: Budget,
    geometry: Geometry,
    *,
    method: str,
    bitset,
    table_bitset,
    b_min,
    b_max,
    cost_model,
    use,
    shared_beta,
) -> tuple[Allocation, DistortionFit | None]:
    """Allocate one width per group of components (``groups [2, L, H]`` holds group ids 0..M-1)."""
    budget = _check_budget(budget)
    curves, allowed, fit = _resolve(source, geometry, bitset, table_bitset, b_min, b_max, use, shared_beta)
    bytes_c = _check_cost_model(cost_model, geometry, allowed)
    g = groups.reshape(-1)
    m = int(g.max()) + 1
    weight = np.bincount(g, minlength=m).astype(np.int64)
    nb = len(allowed)
    curves_u = np.zeros((m, nb))
    if curves is not None:
        np.add.at(curves_u, g, curves.reshape(-1, nb))
    bytes_u = None
    if bytes_c is not None:
        bytes_u = np.zeros((m, nb))
        np.add.at(bytes_u, g, bytes_c)
    bits_u, details = _solve_units(curves_u, weight, allowed, budget, geometry.num_components, bytes_u,
                                   cost_model, f"{method} allocation")
    details["use"] = "none" if source is None else ("fit" if fit is not None else "measured")
    if fit is not None:
        details["beta_key"], details["beta_value"] = fit.beta_key, fit.beta_value
    return _finish(bits_u[g], geometry, curves, allowed, cost_model, method, details), fit


def rate_quant(
    source: DistortionFit | np.ndarray,
    budget: Budget,
    geometry: Geometry,
    *,
    bitset: Sequence[int] | None = None,
    table_bitset: Sequence[int] | None = None,
    b_min: int | None = None,
    b_max: int | None = None,
    cost_model: CostModel | None = None,
    use: str = "fit",
    shared_beta: str = "kind",
) -> Allocation:
    """RateQuant: a width per component, the exact integer optimum of the predicted distortion.

    ``source`` is a :class:`DistortionFit` or a measured table ``[2, L, H, nb]`` at ``table_bitset``;
    ``use="fit"`` allocates on the fitted exponential curves (a table is fitted first), ``"measured"`` on
    the table itself. ``bitset`` (default: the source's widths) and ``b_min``/``b_max`` restrict the widths.
    With a fit, ``details["continuous_bits"]`` holds the reverse-waterfilling closed form at the same
    code-bit total (within one bit of the integer answer on contiguous widths; docs/method.md).
    """
    if source is None:
        raise RateQuantError("rate_quant needs distortion curves: a DistortionFit or a measured table")
    if not isinstance(geometry, Geometry):
        raise RateQuantError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    groups = np.arange(geometry.num_components)
    alloc, fit = _allocate_grouped(
        groups.reshape(geometry.shape), source, budget, geometry, method="ratequant", bitset=bitset,
        table_bitset=table_bitset, b_min=b_min, b_max=b_max, cost_model=cost_model, use=use,
        shared_beta=shared_beta,
    )
    if fit is not None:
        allowed = alloc.details["bitset"]
        cont = allocate_closed_form(fit.alpha.reshape(-1), fit.beta.reshape(-1), 1.0,
                                    float(alloc.bits.sum()), allowed[0], allowed[-1])
        alloc.details["continuous_bits"] = cont.reshape(geometry.shape)
    return alloc


def uniform(
    source: DistortionFit | np.ndarray | None,
    budget: Budget,
    geometry: Geometry,
    *,
    bitset: Sequence[int] | None = None,
    table_bitset: Sequence[int] | None = None,
    b_min: int | None = None,
    b_max: int | None = None,
    cost_model: CostModel | None = None,
    use: str = "fit",
    shared_beta: str = "kind",
) -> Allocation:
    """One width for every component (the usual KV quantizer). ``source`` may be None (no prediction).

    An average-bits budget must be one of the allowed widths (2.5 is refused, naming 2 and 3); a byte
    budget takes the widest width that fits.
    """
    alloc, _ = _allocate_grouped(
        np.zeros(geometry.shape, dtype=np.int64), source, budget, geometry, method="uniform", bitset=bitset,
        table_bitset=table_bitset, b_min=b_min, b_max=b_max, cost_model=cost_model, use=use,
        shared_beta=shared_beta,
    )
    return alloc


def layerwise(
    source: DistortionFit | np.ndarray,
    budget: Budget,
    geometry: Geometry,
    *,
    bitset: Sequence[int] | None = None,
    table_bitset: Sequence[int] | None = None,
    b_min: int | None = None,
    b_max: int | None = None,
    cost_model: CostModel | None = None,
    use: str = "fit",
    shared_beta: str = "kind",
) -> Allocation:
    """One width per layer, shared by all its heads and both kinds (KVTuner-style).

    The layer's curve is the sum of its ``2 H`` component curves; the same exact integer optimiser
    allocates the layers, so an average budget must be reachable as a mean of ``L`` widths.
    """
    if source is None:
        raise RateQuantError("layerwise needs distortion curves: a DistortionFit or a measured table")
    groups = np.broadcast_to(np.arange(geometry.num_layers)[None, :, None], geometry.shape)
    alloc, _ = _allocate_grouped(
        np.ascontiguousarray(groups), source, budget, geometry, method="layerwise", bitset=bitset,
        table_bitset=table_bitset, b_min=b_min, b_max=b_max, cost_model=cost_model, use=use,
        shared_beta=shared_beta,
    )
    return alloc


def kv_split(
    source: DistortionFit | np.ndarray | None,
    budget: Budget | None,
    geometry: Geometry,
    *,
    key_bits: int | None = None,
    value_bits: int | None = None,
    bitset: Sequence[int] | None = None,
    table_bitset: Sequence[int] | None = None,
    b_min: int | None = None,
    b_max: int | None = None,
    cost_model: CostModel | None = None,
    use: str = "fit",
    shared_beta: str = "kind",
) -> Allocation:
    """One width for all keys and one for all values (e.g. K4V2, "Quantize What Counts").

    With ``key_bits`` and ``value_bits`` the split is fixed (a given budget must then be met: exactly for
    average bits, as an upper bound for bytes); without them, :func:`best_kv_split` picks it.
    """
    if key_bits is None and value_bits is None:
        return best_kv_split(source, budget, geometry, bitset=bitset, table_bitset=table_bitset, b_min=b_min,
                             b_max=b_max, cost_model=cost_model, use=use, shared_beta=shared_beta)
    if key_bits is None or value_bits is None:
        raise RateQuantError("kv_split: pass both key_bits and value_bits, or neither to pick the best split")
    for name, v in (("key_bits", key_bits), ("value_bits", value_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 8:
            raise RateQuantError(f"kv_split: {name} must be an integer from 1 to 8, got {v!r}")
    widths = tuple(sorted({int(key_bits), int(value_bits)}))
    if bitset is None and not isinstance(source, np.ndarray):
        bitset = widths  # a fit predicts at any width; without a source there is nothing else to go by
    curves, allowed, _ = _resolve(source, geometry, bitset, table_bitset, b_min, b_max, use, shared_beta)
    if any(b not in allowed for b in widths):
        raise RateQuantError(f"kv_split: widths K{key_bits}V{value_bits} are not all in the allowed set {allowed}")
    _check_cost_model(cost_model, geometry, allowed)
    alloc = _split_allocation(int(key_bits), int(value_bits), geometry, curves, allowed, cost_model)
    if budget is not None:
        budget = _check_budget(budget)
        alloc.details["budget"] = budget.to_dict()
        if budget.kind == "avg_bits" and abs(alloc.avg_bits - budget.value) > _EXACT_TOL * budget.value:
            raise BudgetError(
                f"K{key_bits}V{value_bits} averages {alloc.avg_bits:g} bits, not the budget {budget.value:g}"
            )
        if budget.kind == "bytes_per_token":
            if cost_model is None:
                raise BudgetError("kv_split: a bytes-per-token budget needs a cost model")
            if alloc.bytes_per_token > budget.value * (1 + _EXACT_TOL):
                raise BudgetError(
                    f"K{key_bits}V{value_bits} takes {alloc.bytes_per_token:g} bytes per token, over the budget "
                    f"of {budget.value:g}"
                )
    return alloc


def _split_allocation(kb: int, vb: int, geometry: Geometry, curves, allowed, cost_model) -> Allocation:
    bits = np.empty(geometry.shape, dtype=np.int64)
    bits[0], bits[1] = kb, vb
    return _finish(bits, geometry, curves, allowed, cost_model, "kv-split",
                   {"bitset": list(allowed), "split": f"K{kb}V{vb}"})


def best_kv_split(
    source: DistortionFit | np.ndarray,
    budget: Budget,
    geometry: Geometry,
    *,
    bitset: Sequence[int] | None = None,
    table_bitset: Sequence[int] | None = None,
    b_min: int | None = None,
    b_max: int | None = None,
    cost_model: CostModel | None = None,
    use: str = "fit",
    shared_beta: str = "kind",
) -> Allocation:
    """Enumerate every (key width, value width) pair meeting the budget; keep the lowest predicted distortion.

    Average budgets must be met exactly (budget 3 over widths 1..8: K1V5, K2V4, K3V3, K4V2, K5V1); byte
    budgets keep the pairs that fit and among them the ones using the most bytes. All candidates are listed
    in ``details["candidates"]``.
    """
    budget = _check_budget(budget)
    if source is None:
        raise RateQuantError("best_kv_split needs distortion curves to choose; or pass key_bits and value_bits")
    curves, allowed, _ = _resolve(source, geometry, bitset, table_bitset, b_min, b_max, use, shared_beta)
    bytes_c = _check_cost_model(cost_model, geometry, allowed)
    kind_curves = curves.sum(axis=(1, 2))  # [2, nb]
    cands = []
    for i, kb in enumerate(allowed):
        for j, vb in enumerate(allowed):
            avg = (kb + vb) / 2
            nbytes = None
            if bytes_c is not None:
                half = geometry.num_components // 2
                q = float(bytes_c[:half, i].sum() + bytes_c[half:, j].sum())
                nbytes = q + cost_model.residual_bytes_per_token
            cands.append({"split": f"K{kb}V{vb}", "key_bits": kb, "value_bits": vb, "avg_bits": avg,
                          "bytes_per_token": nbytes,
                          "predicted_distortion": float(kind_curves[0, i] + kind_curves[1, j])})
    if budget.kind == "avg_bits":
        ok = [c for c in cands if abs(c["avg_bits"] - budget.value) <= _EXACT_TOL * budget.value]
        if not ok:
            reach = sorted({c["avg_bits"] for c in cands})
            raise BudgetError(
                f"kv-split: no key/value pair from widths {allowed} averages {budget.value:g} bits; reachable "
                f"averages: {', '.join(_fmt(v) for v in reach)}"
            )
    else:
        if cost_model is None:
            raise BudgetError("kv-split: a bytes-per-token budget needs a cost model (CostModel.from_quantizer)")
        if cost_model.context_tokens != budget.context_tokens:
            raise BudgetError(
                f"kv-split: budget at {budget.context_tokens} tokens of context, cost model at "
                f"{cost_model.context_tokens}; build both with the same length"
            )
        fits = [c for c in cands if c["bytes_per_token"] <= budget.value * (1 + _EXACT_TOL)]
        lo = min(c["bytes_per_token"] for c in cands)
        hi = max(c["bytes_per_token"] for c in cands)
        if not fits or budget.value > hi * (1 + _EXACT_TOL):
            raise BudgetError(
                f"kv-split: a budget of {budget.value:g} bytes per token is outside the reachable range "
                f"[{_fmt(lo)}, {_fmt(hi)}] for widths {allowed}"
            )
        top = max(c["bytes_per_token"] for c in fits)
        ok = [c for c in fits if c["bytes_per_token"] >= top * (1 - _EXACT_TOL)]
    best = min(ok, key=lambda c: (c["predicted_distortion"], -c["key_bits"]))
    alloc = _split_allocation(best["key_bits"], best["value_bits"], geometry, curves, allowed, cost_model)
    alloc.details.update(budget=budget.to_dict(), candidates=[c for c in cands if c in ok], solver="enumerate")
    return alloc


def mismatched(
    source: DistortionFit | np.ndarray,
    budget: Budget,
    geometry: Geometry,
    *,
    source_design: str,
    bitset: Sequence[int] | None = None,
    table_bitset: Sequence[int] | None = None,
    b_min: int | None = None,
    b_max: int | None = None,
    cost_model: CostModel | None = None,
    use: str = "fit",
    shared_beta: str = "kind",
) -> Allocation:
    """RateQuant on design A's curves, to be stored and evaluated with design B (the paper's mismatch).

    Exactly :func:`rate_quant` on ``source`` (A's fit or table), recorded as method ``"mismatched"`` with
    ``details["source_design"] = source_design``; ``predicted_distortion`` is under A's model.
    """
    if not isinstance(source_design, str) or not source_design:
        raise RateQuantError("mismatched: source_design must name the design whose curves are used")
    alloc = rate_quant(source, budget, geometry, bitset=bitset, table_bitset=table_bitset, b_min=b_min,
                       b_max=b_max, cost_model=cost_model, use=use, shared_beta=shared_beta)
    details = dict(alloc.details, source_design=source_design)
    return Allocation(alloc.bits, alloc.avg_bits, alloc.bytes_per_token, alloc.predicted_distortion,
                      "mismatched", details)


def predicted_distortion(
    bits: np.ndarray,
    source: DistortionFit | np.ndarray,
    *,
    table_bitset: Sequence[int] | None = None,
) -> float:
    """Total distortion of integer ``bits [2, L, H]`` under another model (a fit, or a table at ``table_bitset``).

    Used to score a mismatched allocation with the curves of the design that actually stores it.
    """
    bits = np.asarray(bits)
    if isinstance(source, DistortionFit):
        return float(source.predict(bits).sum())
    if table_bitset is None:
        raise RateQuantError("a measured table needs table_bitset")
    table, tb = check_table(source, table_bitset)
    if table.shape[:3] != bits.shape:
        raise RateQuantError(f"bits {bits.shape} do not match the table's components {table.shape[:3]}")
    lookup = np.full(9, -1)
    lookup[list(tb)] = np.arange(len(tb))
    if not np.issubdtype(bits.dtype, np.integer) or bits.min() < 1 or bits.max() > 8 or (lookup[bits] < 0).any():
        raise RateQuantError(f"bits must be widths measured in the table: {tb}")
    return float(np.take_along_axis(table, lookup[bits][..., None], axis=-1).sum())


Allocator = Callable[..., Allocation]

ALLOCATORS: dict[str, Allocator] = {
    "ratequant": rate_quant,
    "uniform": uniform,
    "kv-split": kv_split,
    "layerwise": layerwise,
    "mismatched": mismatched,
}
"""Allocators by name (the CLI's ``--allocator``); all take ``(source, budget, geometry, **options)``."""


__all__ = [
    "ALLOCATORS",
    "BUDGET_KINDS",
    "Allocation",
    "Budget",
    "CostModel",
    "allocate_closed_form",
    "allocate_integer",
    "best_kv_split",
    "check_reachable",
    "is_convex",
    "kv_split",
    "layerwise",
    "mismatched",
    "predicted_distortion",
    "rate_quant",
    "solve_integer",
    "uniform",
]
