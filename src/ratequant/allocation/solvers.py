"""Exact solvers: the continuous reverse-waterfilling closed form and the exact integer optimum.

RateQuant (arXiv:2605.06675) minimises ``sum_i d_i(b_i)`` subject to a storage budget. With
``d_i(b) = alpha_i * beta_i^(-b)`` the continuous problem has the closed form
``b_i = clip(log_beta(alpha_i ln(beta) / (lambda c_i)), b_min, b_max)`` (:func:`allocate_closed_form`).
Packed storage needs integer widths: :func:`solve_integer` returns the exact integer optimum with the
budget met exactly, by a greedy on marginal gains when it is provably exact (contiguous widths, convex
curves, equal cost per bit) and by a multiple-choice-knapsack dynamic programme otherwise;
:func:`solve_groups` states a :class:`Budget` (average bits or bytes) as such a problem for groups of
components that share a width. Derivations and proofs: ``docs/method.md``.

One module of this size because the closed form, the greedy and the dynamic programme solve one problem and are
tested against each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import numpy as np

from ratequant.allocation.budget import EXACT_TOL, Budget, fmt
from ratequant.allocation.cost import CostModel
from ratequant.errors import BudgetError, RateQuantError
from ratequant.validation import check_bitset

_DP_MAX_WORK = 3e8  # cells x options above which a byte-budget DP coarsens its cost unit


def allocate_closed_form(
    alpha: np.ndarray,
    beta: np.ndarray | float,
    cost: np.ndarray | float,
    total: float,
    b_min: np.ndarray | float,
    b_max: float,
) -> np.ndarray:
    """Continuous optimum of ``min sum alpha_i beta_i^(-b_i)`` s.t. ``sum c_i b_i = total`` and
    ``b_min_i <= b_i <= b_max``.

    KKT (reverse waterfilling): ``b_i = clip(log_beta_i(alpha_i ln(beta_i) / (lambda c_i)), b_min, b_max)``;
    ``mu = ln(lambda)`` is found by bisection (the spent budget is monotone in ``mu``), then solved exactly
    on the final set of unclipped components. Components with ``alpha_i = 0`` gain nothing from bits: they
    stay at ``b_min`` unless the others are all at ``b_max``, then they share the rest equally.
    Shapes: ``alpha [N]``; ``beta``, ``cost`` and ``b_min`` scalars or ``[N]``. Returns ``b [N]`` (float).
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
    b_min = np.broadcast_to(np.asarray(b_min, dtype=np.float64), (n,)).astype(np.float64)
    b_max, total = float(b_max), float(total)
    if not (np.isfinite(b_min).all() and math.isfinite(b_max) and (b_min <= b_max).all()):
        raise RateQuantError(f"closed form: need finite b_min <= b_max, got {b_min.min()}..{b_min.max()}, {b_max}")
    lo_total, hi_total = float((cost * b_min).sum()), float(cost.sum() * b_max)
    tol = EXACT_TOL * max(1.0, abs(hi_total))
    if not (lo_total - tol <= total <= hi_total + tol):
        raise BudgetError(
            f"closed form: total {total:g} is outside the reachable range [{lo_total:g}, {hi_total:g}] "
            f"(b_min={b_min.min():g}, b_max={b_max:g})"
        )
    total = min(max(total, lo_total), hi_total)
    pos = alpha > 0
    b = b_min.copy()
    if (b_min == b_max).all():
        return b
    # Positive components saturated at b_max and still short of the budget: give the rest to alpha == 0.
    sat = float((cost[pos] * b_max).sum() + (cost[~pos] * b_min[~pos]).sum())
    if sat <= total:
        b[pos] = b_max
        if (~pos).any():
            extra = (total - sat) / cost[~pos].sum()
            b[~pos] = np.minimum(b_min[~pos] + extra, b_max)
        return b

    lb = np.log(beta[pos])
    k = np.log(alpha[pos] * lb / cost[pos])
    cp, low = cost[pos], b_min[pos]
    fixed_spend = float((cost[~pos] * b_min[~pos]).sum())

    def bits_at(mu: float) -> np.ndarray:
        return np.clip((k - mu) / lb, low, b_max)

    def spend(mu: float) -> float:
        return float((cp * bits_at(mu)).sum()) + fixed_spend

    mu_lo = float((k - b_max * lb).min()) - 1.0  # every positive component at b_max: spend >= total
    mu_hi = float((k - low * lb).max()) + 1.0  # every positive component at its b_min: spend <= total
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
    free = (bp > low) & (bp < b_max)
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
def _floors(floors, n: int, nb: int) -> np.ndarray:
    """Per-row index of the lowest allowed option (``[N]``; None: every option allowed)."""
    if floors is None:
        return np.zeros(n, dtype=np.int64)
    f = np.asarray(floors, dtype=np.int64).reshape(-1)
    if f.shape != (n,) or f.min() < 0 or f.max() >= nb:
        raise RateQuantError(f"floors must be {n} option indices in 0..{nb - 1}")
    return f


def _reachable_mask(option_costs: np.ndarray, floors: np.ndarray | None = None) -> int:
    """Bit ``t`` of the returned integer is set when some choice of one allowed option per row (options
    ``floors[i]`` and above) costs ``t`` in total."""
    floors = _floors(floors, *option_costs.shape)
    reach = 1
    for row, f in zip(option_costs, floors):
        new = 0
        for c in row[f:]:
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


def is_convex(curves: np.ndarray, bitset: Sequence[int], floors: np.ndarray | None = None) -> bool:
    """True when every row of ``curves [N, nb]`` is convex in the width (slopes per bit non-decreasing) over
    its allowed options (``floors[i]`` and above)."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.shape[1] < 3:
        return True
    floors = _floors(floors, *curves.shape)
    b = np.asarray(bitset, dtype=np.float64)
    slope = np.diff(curves, axis=1) / np.diff(b)
    tol = 1e-9 * np.abs(curves).max(axis=1, keepdims=True) + 1e-300
    checked = np.arange(curves.shape[1] - 2)[None, :] >= floors[:, None]
    return bool(((np.diff(slope, axis=1) >= -tol) | ~checked).all())


def _greedy(curves: np.ndarray, steps: int, floors: np.ndarray | None = None) -> np.ndarray:
    """Top-``steps`` marginal gains of convex rows: returns how many +1 steps each row takes ``[N]``.

    Gains are made exactly non-increasing (cumulative minimum, a no-op on convex rows up to rounding), and
    ties are broken by step index, so the chosen steps form a prefix of every row (see docs/method.md). The
    steps below a row's floor are forced (infinite gain): every row starts at its lowest allowed option.
    """
    n, nb = curves.shape
    if steps == 0 or nb == 1:
        return np.zeros(n, dtype=np.int64)
    gains = curves[:, :-1] - curves[:, 1:]
    gains = np.where(np.arange(nb - 1)[None, :] < _floors(floors, n, nb)[:, None], np.inf, gains)
    gains = np.minimum.accumulate(gains, axis=1)
    step_index = np.broadcast_to(np.arange(nb - 1), gains.shape).ravel()
    order = np.lexsort((step_index, -gains.ravel()))
    return np.bincount(order[:steps] // (nb - 1), minlength=n).astype(np.int64)


def _dp(
    curves: np.ndarray, option_costs: np.ndarray, target: int, *, at_most: bool, floors: np.ndarray | None = None
) -> np.ndarray:
    """Multiple-choice knapsack by dynamic programming; returns the chosen option index per row ``[N]``.

    Minimises ``sum_i curves[i, j_i]`` with ``sum_i option_costs[i, j_i] == target`` (or ``<=`` when
    ``at_most``) over the allowed options ``j_i >= floors[i]``. ``option_costs`` are non-negative integers
    increasing along each row. O(N * target * nb).
    """
    n, nb = curves.shape
    floors = _floors(floors, n, nb)
    base = option_costs[np.arange(n), floors]
    oc = np.maximum(option_costs - base[:, None], 0)
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
        for j in range(int(floors[i]), nb):
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
    floors: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """Exact integer optimum: ``min sum_i curves[i, j_i]`` s.t. ``sum_i cost_i * bitset[j_i] == total``.

    ``curves [N, nb]`` (distortion of row ``i`` at ``bitset[j]``), ``cost`` positive integers per bit
    (``[N]`` or scalar), ``floors [N]`` the index of each row's lowest allowed width (default 0). Returns
    ``(bits [N], solver)`` with ``solver`` ``"greedy"`` (contiguous bit set, convex rows, equal costs:
    provably exact) or ``"dp"`` (exact dynamic programme otherwise).
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
    floors = _floors(floors, n, len(bitset))
    option_costs = cost_arr[:, None] * bs[None, :]
    lo, hi = int(option_costs[np.arange(n), floors].sum()), int(option_costs[:, -1].sum())
    contiguous = bitset[-1] - bitset[0] == len(bitset) - 1
    equal = bool((cost_arr == cost_arr[0]).all())
    if not lo <= total <= hi:
        raise BudgetError(f"total {total} is outside the reachable range [{lo}, {hi}]")
    if contiguous and equal and total % int(cost_arr[0]) == 0 and is_convex(curves, bitset, floors):
        steps = _greedy(curves, total // int(cost_arr[0]) - n * bitset[0], floors)
        return bs[steps], "greedy"
    mask = _reachable_mask(option_costs, floors)
    if not (mask >> total) & 1:
        below, above = _nearest(mask, total)
        raise BudgetError(
            f"total {total} cannot be met exactly with widths {bitset}; nearest reachable totals: "
            f"{below} and {above} (range [{lo}, {hi}])"
        )
    return bs[_dp(curves, option_costs, total, at_most=False, floors=floors)], "dp"


def allocate_integer(curves: np.ndarray, bitset: Sequence[int], cost: np.ndarray | int, total: int) -> np.ndarray:
    """Exact integer allocation ``bits [N]`` (see :func:`solve_integer`)."""
    return solve_integer(curves, bitset, cost, total)[0]


def solve_groups(
    groups: np.ndarray,
    curves: np.ndarray,
    allowed: tuple[int, ...],
    budget: Budget,
    cost_model: CostModel | None,
    what: str,
    floors: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Exact widths for components that share a width within each group, under ``budget``.

    ``groups [N]`` holds group ids ``0..M-1`` of the ``N`` components (flattened ``[2, L, H]`` order);
    ``curves [N, nb]`` their distortion at the widths ``allowed``; ``floors [N]`` the index of each component's
    lowest allowed width (a group takes the highest floor of its members). A group's curve is the sum of its
    members' curves and it costs their summed bits (or bytes, from ``cost_model``, needed for byte budgets).
    Returns the widths ``[N]`` and solver details. ``what`` names the allocation in error messages.
    """
    g = np.asarray(groups).reshape(-1)
    n_components = g.size
    m = int(g.max()) + 1
    weight = np.bincount(g, minlength=m).astype(np.int64)
    nb = len(allowed)
    curves_u = np.zeros((m, nb))
    np.add.at(curves_u, g, np.asarray(curves, dtype=np.float64).reshape(-1, nb))
    bytes_u = None
    if cost_model is not None:
        if cost_model.num_components != n_components:
            raise RateQuantError(
                f"cost model covers {cost_model.num_components} components but the model has {n_components}"
            )
        bytes_u = np.zeros((m, nb))
        np.add.at(bytes_u, g, cost_model.columns(allowed))
    floor_u = np.zeros(m, dtype=np.int64)
    np.maximum.at(floor_u, g, _floors(floors, n_components, nb))
    bits_u, details = _solve_units(curves_u, weight, floor_u, allowed, budget, n_components, bytes_u, cost_model, what)
    return bits_u[g], details


def _solve_units(curves_u, weight, floor_u, allowed, budget, n_components, bytes_u, cost_model, what):
    """One width per unit (``weight[u]`` components sharing it, lowest allowed option ``floor_u[u]``):
    ``curves_u``/``bytes_u`` ``[M, nb]``. Returns the unit widths ``[M]`` and the solver details."""
    bs = np.asarray(allowed, dtype=np.int64)
    units = np.arange(len(weight))
    option_bits = weight[:, None] * bs[None, :]
    lo_bits, hi_bits = int(option_bits[units, floor_u].sum()), int(option_bits[:, -1].sum())
    details: dict = {"bitset": list(allowed), "budget": budget.to_dict()}
    if budget.kind == "avg_bits":
        exact = budget.value * n_components
        target = round(exact)
        mask = _reachable_mask(option_bits, floor_u)
        if not (abs(exact - target) <= EXACT_TOL * max(1.0, exact) and (mask >> target) & 1):
            below = _nearest(mask, math.floor(exact + EXACT_TOL))[0]
            above = _nearest(mask, math.ceil(exact - EXACT_TOL))[1]
            near = [f"{fmt(v / n_components)}" for v in (below, above) if v is not None]
            raise BudgetError(
                f"{what}: an average of {budget.value:g} bits cannot be met exactly with widths {allowed} over "
                f"{n_components} components; reachable averages lie in [{fmt(lo_bits / n_components)}, "
                f"{fmt(hi_bits / n_components)}]; nearest reachable: {' and '.join(near) or 'none'}"
            )
        bits_u, solver = solve_integer(curves_u, allowed, weight, target, floor_u)
        details.update(solver=solver, total_code_bits=target)
        return bits_u, details

    # Byte budget.
    if cost_model is None or bytes_u is None:
        raise BudgetError(f"{what}: a bytes-per-token budget needs a cost model (CostModel.from_policy)")
    if cost_model.context_tokens != budget.context_tokens:
        raise BudgetError(
            f"{what}: the budget is stated at {budget.context_tokens} tokens of context but the cost model "
            f"amortises the residual window over {cost_model.context_tokens}; build both with the same length"
        )
    res = cost_model.fixed_bytes_per_token
    if not cost_model.depends_on_bits:
        raise BudgetError(
            f"{what}: at {cost_model.context_tokens} tokens of context every token sits at full precision "
            "(sink tokens and residual window), so bytes do not depend on bits"
        )
    min_bytes = float(bytes_u[units, floor_u].sum()) + res
    max_bytes = float(bytes_u[:, -1].sum()) + res
    tol = EXACT_TOL * max_bytes
    if not (min_bytes - tol <= budget.value <= max_bytes + tol):
        raise BudgetError(
            f"{what}: a budget of {budget.value:g} bytes per token is outside the reachable range "
            f"[{fmt(min_bytes)}, {fmt(max_bytes)}] for widths {allowed} at {budget.context_tokens} tokens of context"
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
        mask = _reachable_mask(option_bits, floor_u)
        if per_bit is None:
            s_target = lo_bits
        else:
            fixed = float((bytes_u[:, 0] - per_bit * weight * b0).sum())
            cap = math.floor(((budget.value + tol - res) - fixed) / per_bit + 1e-9)
            s_target, _ = _nearest(mask, min(cap, hi_bits))
            if s_target is None:
                raise BudgetError(
                    f"{what}: {budget.value:g} bytes per token is below the cheapest allocation ({fmt(min_bytes)})"
                )
        bits_u, solver = solve_integer(curves_u, allowed, weight, int(s_target), floor_u)
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
    cheapest = int(oc[units, floor_u].sum())
    if cap < cheapest:
        cap = cheapest  # rounding up pushed the cheapest allocation over: take it (it fits)
    idx = _dp(curves_u, oc, min(cap, int(oc[:, -1].sum())), at_most=True, floors=floor_u)
    details.update(solver="dp", byte_model="table", byte_unit=unit)
    return bs[idx], details


__all__ = ["allocate_closed_form", "allocate_integer", "is_convex", "solve_groups", "solve_integer"]
