"""Solvers (:mod:`ratequant.allocation.solvers`): the exact integer optimum against brute force (greedy and DP),
the closed form, per-component floors, and budgets met exactly or refused naming the reachable range."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratequant.allocation import (
    AllocationOptions,
    Budget,
    CostModel,
    Curves,
    allocate,
    allocate_closed_form,
    allocate_integer,
    check_reachable,
    is_convex,
    solve_integer,
)
from ratequant.allocation.fitting import fit_distortion
from ratequant.allocation.solvers import _dp
from ratequant.errors import BudgetError
from ratequant.geometry import Geometry
from ratequant.spec import StoragePolicy
from tests.allocation.helpers import ALL, FLOOR_WIDTHS, TINY, FakeQuantizer, G, brute_force, fitted, table_for


def exp_curves(n, bitset, seed, spread=2.0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, spread, n))
    beta = rng.uniform(2.5, 6.0, n)
    return alpha[:, None] * beta[:, None] ** -np.asarray(bitset, float), alpha, beta


def objective(curves, bitset, bits):
    idx = [bitset.index(int(b)) for b in bits]
    return float(curves[np.arange(len(bits)), idx].sum())


# --------------------------------------------------------------------------------------------------------
# Integer optimum vs brute force
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bitset", [(1, 2, 3, 4), (2, 3, 4, 5, 6), (2, 4, 8), (1, 3, 4, 8)])
def test_integer_equals_brute_force(seed, bitset):
    n = 4
    curves, _, _ = exp_curves(n, bitset, seed)
    cost = [1] * n
    reachable = {sum(c) for c in itertools.product(bitset, repeat=n)}
    for total in range(n * bitset[0], n * bitset[-1] + 1):
        if total not in reachable:
            with pytest.raises(BudgetError, match="nearest reachable"):
                allocate_integer(curves, bitset, 1, total)
            continue
        bits, solver = solve_integer(curves, bitset, 1, total)
        assert int(bits.sum()) == total
        assert solver == ("greedy" if bitset[-1] - bitset[0] == len(bitset) - 1 else "dp")
        best, _ = brute_force(curves, bitset, cost, total)
        assert objective(curves, bitset, bits) == pytest.approx(best, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", range(8))
def test_non_convex_tables_use_exact_dp(seed):
    rng = np.random.default_rng(seed)
    bitset = (1, 2, 3, 4, 5)
    curves = np.sort(rng.uniform(0, 1, (4, 5)), axis=1)[:, ::-1] * rng.uniform(0.1, 10, (4, 1))
    curves[0] = [10.0, 9.9, 5.0, 4.9, 0.1]  # gains 0.1, 4.9, 0.1, 4.8: greedy would stop at 2 bits
    assert not is_convex(curves, bitset)
    for total in range(4, 21):
        bits, solver = solve_integer(curves, bitset, 1, total)
        assert solver == "dp"
        best, _ = brute_force(curves, bitset, [1] * 4, total)
        assert int(bits.sum()) == total
        assert objective(curves, bitset, bits) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_unequal_costs_equal_brute_force(seed):
    bitset = (1, 2, 3, 4)
    curves, _, _ = exp_curves(4, bitset, seed)
    cost = np.array([1, 2, 2, 3])
    for total in range(int(cost.sum()), int(cost.sum() * 4) + 1):
        best, _ = brute_force(curves, bitset, cost, total)
        if math.isinf(best):
            with pytest.raises(BudgetError):
                allocate_integer(curves, bitset, cost, total)
            continue
        bits = allocate_integer(curves, bitset, cost, total)
        assert int((cost * bits).sum()) == total
        assert objective(curves, bitset, bits) == pytest.approx(best, rel=1e-12)


def test_greedy_and_dp_agree_on_a_large_instance():
    curves, _, _ = exp_curves(180, ALL, 7)
    for total in (180 * 2 + 90, 180 * 3, 180 * 5 + 7):
        g, solver = solve_integer(curves, ALL, 1, total)
        assert solver == "greedy"
        d = np.asarray(ALL)[_dp(curves, np.tile(np.asarray(ALL), (180, 1)), total, at_most=False)]
        assert objective(curves, ALL, g) == pytest.approx(objective(curves, ALL, d), rel=1e-12)


def test_dp_is_fast_on_500_components():
    curves, _, _ = exp_curves(500, (2, 4, 8), 11)
    t0 = time.perf_counter()
    bits, solver = solve_integer(curves, (2, 4, 8), 1, 500 * 3)
    elapsed = time.perf_counter() - t0
    assert solver == "dp" and int(bits.sum()) == 1500
    assert elapsed < 1.0, elapsed


def test_integer_outside_range_is_refused():
    curves, _, _ = exp_curves(3, ALL, 0)
    with pytest.raises(BudgetError, match=r"range \[3, 24\]"):
        allocate_integer(curves, ALL, 1, 25)
    with pytest.raises(BudgetError, match=r"range \[3, 24\]"):
        allocate_integer(curves, ALL, 1, 2)


# --------------------------------------------------------------------------------------------------------
# Closed form
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_closed_form_meets_budget_and_kkt(seed):
    n = 40
    _, alpha, beta = exp_curves(n, ALL, seed, spread=3.0)
    cost = np.random.default_rng(seed).uniform(0.5, 2.0, n)
    total = float(cost.sum() * 3.3)
    b = allocate_closed_form(alpha, beta, cost, total, 1, 8)
    assert float((cost * b).sum()) == pytest.approx(total, rel=1e-12)
    assert b.min() >= 1 and b.max() <= 8
    marginal = alpha * np.log(beta) * beta**-b / cost  # -d'(b)/c: equal to lambda on free components
    free = (b > 1 + 1e-9) & (b < 8 - 1e-9)
    assert free.sum() >= 2
    lam = marginal[free]
    np.testing.assert_allclose(lam, lam[0], rtol=1e-8)
    assert (marginal[b <= 1 + 1e-9] <= lam[0] * (1 + 1e-8)).all()  # not worth a bit at b_min
    assert (marginal[b >= 8 - 1e-9] >= lam[0] * (1 - 1e-8)).all()  # would take more than b_max


def test_closed_form_handles_zero_alpha_and_saturation():
    alpha = np.array([0.0, 1.0, 2.0])
    b = allocate_closed_form(alpha, 4.0, 1.0, 6.0, 1, 8)
    assert b[0] == 1.0 and b.sum() == pytest.approx(6.0)
    b = allocate_closed_form(alpha, 4.0, 1.0, 20.0, 1, 8)  # others saturate: rest goes to alpha == 0
    np.testing.assert_allclose(b, [4.0, 8.0, 8.0])
    b = allocate_closed_form(np.zeros(4), 4.0, 1.0, 10.0, 1, 8)
    np.testing.assert_allclose(b, 2.5)
    with pytest.raises(BudgetError, match="reachable range"):
        allocate_closed_form(alpha, 4.0, 1.0, 25.0, 1, 8)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("bounds", [(1, 8), (2, 6)])
def test_closed_form_and_integer_agree_within_one_bit(seed, bounds):
    bitset = tuple(range(bounds[0], bounds[1] + 1))
    n = 60
    curves, alpha, beta = exp_curves(n, bitset, seed, spread=3.0)
    rng = np.random.default_rng(100 + seed)
    total = int(rng.integers(n * bounds[0], n * bounds[1] + 1))
    cont = allocate_closed_form(alpha, beta, 1.0, total, *bounds)
    bits = allocate_integer(curves, bitset, 1, total)
    assert np.abs(bits - cont).max() <= 1 + 1e-9
    # the continuous optimum is a relaxation: it can only be lower
    cont_obj = float((alpha * beta**-cont).sum())
    assert cont_obj <= objective(curves, bitset, bits) * (1 + 1e-12)


def test_closed_form_respects_per_kind_floors():
    """The reverse-waterfilling answer recorded beside a floored allocation uses the same lowest widths."""
    from ratequant.allocation import Budget, Curves, allocate

    rng = np.random.default_rng(0)
    alpha = np.exp(rng.normal(0, 2, (2, 3, 2)))
    alpha[0] *= 1e-4  # keys matter little: unfloored, they would sink to 1 bit
    beta = np.empty((2, 3, 2))
    beta[0], beta[1] = 6.0, 2.5
    fit = fit_distortion(alpha[..., None] * beta[..., None] ** -np.arange(1, 9.0), range(1, 9))
    alloc = allocate(Curves.from_fit(fit, min_bits=(5, 1)), Budget.avg_bits(3.0))
    continuous = alloc.details["continuous_bits"]
    assert (alloc.bits[0] >= 5).all() and (continuous[0] >= 5 - 1e-9).all()
    assert np.abs(alloc.bits - continuous).max() <= 1.0 + 1e-9


# --------------------------------------------------------------------------------------------------------
# Per-component floors: Curves(min_bits=(key, value))
# --------------------------------------------------------------------------------------------------------
def brute_force_with_floors(curves4, bitset, total, floors=(3, 2), cost=None, at_most=False):
    """Optimum over one allowed width per component (keys >= floors[0], values >= floors[1])."""
    flat = curves4.reshape(4, len(bitset))
    options = [[j for j, b in enumerate(bitset) if b >= floors[0 if i < 2 else 1]] for i in range(4)]
    best = math.inf
    for choice in itertools.product(*options):
        spent = sum(bitset[j] for j in choice) if cost is None else sum(cost[i, j] for i, j in enumerate(choice))
        if (spent > total + 1e-9) if at_most else spent != total:
            continue
        best = min(best, sum(flat[i, j] for i, j in enumerate(choice)))
    return best


def _check_floored(curves, expect_solver):
    assert curves.min_bits == (3, 2)
    reachable = {
        a + b + c + d
        for a, b in itertools.product((3, 4, 5), repeat=2)
        for c, d in itertools.product((2, 3, 4, 5), repeat=2)
    }
    for total in range(4, 21):
        budget = Budget.avg_bits(total / 4)
        if total not in reachable:
            with pytest.raises(BudgetError, match=r"reachable averages lie in \[2.5, 5\]"):
                allocate(curves, budget)
            continue
        alloc = allocate(curves, budget)
        assert int(alloc.bits.sum()) == total
        assert alloc.bits[0].min() >= 3 and alloc.bits[1].min() >= 2
        assert alloc.details["solver"] == expect_solver
        assert alloc.details["curves"]["min_bits"] == [3, 2]
        best = brute_force_with_floors(curves.values, FLOOR_WIDTHS, total)
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_floors_on_convex_fit_use_the_greedy_and_are_optimal(seed):
    table = table_for(TINY, bitset=FLOOR_WIDTHS, seed=seed, betas=(3.0, 5.0))
    fit = fit_distortion(table, FLOOR_WIDTHS)
    _check_floored(Curves.from_fit(fit, min_bits=(3, 2)), "greedy")
    assert _floors_bind(Curves.from_fit(fit))


def _floors_bind(unfloored):
    """Without floors some budget gives a key fewer than 3 bits or a value fewer than 2: the floors matter."""
    for avg in (2.5, 3.0, 3.5):
        bits = allocate(unfloored, Budget.avg_bits(avg)).bits
        if bits[0].min() < 3 or bits[1].min() < 2:
            return True
    return False


@pytest.mark.parametrize("seed", range(3))
def test_floors_on_non_convex_measured_table_use_the_dp_and_are_optimal(seed):
    rng = np.random.default_rng(seed)
    table = np.sort(rng.uniform(0.1, 1, (2, 1, 2, 5)), axis=-1)[..., ::-1] * rng.uniform(0.5, 5, (2, 1, 2, 1))
    table[0, 0, 0] = [10.0, 9.0, 8.0, 7.9, 0.1]  # above the key floor (3 bits): gains 0.1 then 7.8
    curves = Curves.measured(table, FLOOR_WIDTHS, min_bits=(3, 2))
    assert not is_convex(curves.values.reshape(4, 5), FLOOR_WIDTHS, curves.floors().reshape(-1))
    _check_floored(curves, "dp")
    assert _floors_bind(Curves.measured(table, FLOOR_WIDTHS))


def test_floors_hold_under_a_byte_budget_with_width_dependent_metadata():
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(codebook=True), 0), TINY, 1, bitset=FLOOR_WIDTHS)
    rng = np.random.default_rng(9)
    table = np.sort(rng.uniform(0.1, 1, (2, 1, 2, 5)), axis=-1)[..., ::-1].copy()
    curves = Curves.measured(table, FLOOR_WIDTHS, min_bits=(3, 2))
    cheapest = float(cm.table[:2, 2].sum() + cm.table[2:, 1].sum()) + cm.fixed_bytes_per_token
    with pytest.raises(BudgetError, match="outside the reachable range"):
        allocate(curves, Budget.bytes_per_token(cheapest - 1.0, 1), options=AllocationOptions(cost_model=cm))
    for budget in (cheapest, cheapest + 2.3, cheapest + 7.0, float(cm.table[:, -1].sum())):
        alloc = allocate(curves, Budget.bytes_per_token(budget, 1), options=AllocationOptions(cost_model=cm))
        assert alloc.details["byte_model"] == "table" and alloc.bytes_per_token <= budget + 1e-9
        assert alloc.bits[0].min() >= 3 and alloc.bits[1].min() >= 2
        best = brute_force_with_floors(
            table, FLOOR_WIDTHS, budget - cm.fixed_bytes_per_token, cost=cm.table, at_most=True
        )
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)


# --------------------------------------------------------------------------------------------------------
# Reachable budgets: met exactly, or refused naming the reachable range
# --------------------------------------------------------------------------------------------------------
def test_unreachable_budgets_name_the_reachable_range():
    curves = fitted(G)
    with pytest.raises(BudgetError, match=r"reachable averages lie in \[1, 8\]"):
        allocate(curves, Budget.avg_bits(8.5))
    with pytest.raises(BudgetError, match=r"reachable averages lie in \[1, 8\]"):
        check_reachable(Budget.avg_bits(8.5))
    with pytest.raises(BudgetError, match=r"\[2, 6\]"):
        allocate(curves, Budget.avg_bits(1.5), options=AllocationOptions(b_min=2, b_max=6))
    with pytest.raises(BudgetError, match=r"nearest reachable: 2\.47222 and 2\.5"):
        allocate(curves, Budget.avg_bits(2.49))  # 2.49 * 36 = 89.64 code bits is not an integer
    with pytest.raises(BudgetError, match=r"\(2, 4, 8\).*nearest reachable: 2\.94444 and 3"):
        allocate(curves, Budget.avg_bits(2.97), options=AllocationOptions(bitset=(2, 4, 8)))
    alloc = allocate(curves, Budget.avg_bits(3.0), options=AllocationOptions(bitset=(2, 4, 8)))
    assert alloc.avg_bits == 3.0 and set(np.unique(alloc.bits)) <= {2, 4, 8}
    assert alloc.details["solver"] == "dp"


# --------------------------------------------------------------------------------------------------------
# Property test: any convex curves and budget -> met exactly, or BudgetError exactly when unreachable
# --------------------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 3),
    heads=st.integers(1, 2),
    bitset=st.lists(st.integers(1, 8), min_size=1, max_size=8, unique=True).map(lambda v: tuple(sorted(v))),
    seed=st.integers(0, 2**32 - 1),
    offset=st.integers(-3, 60),
    measured=st.booleans(),
)
def test_property_budget_met_or_refused(layers, heads, bitset, seed, offset, measured):
    g = Geometry(layers, heads, 8)
    n = g.num_components
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, 3, g.shape))
    beta = rng.uniform(1.5, 8.0, g.shape)
    table = alpha[..., None] * beta[..., None] ** -np.asarray(bitset, float)
    total = max(1, n * bitset[0] + offset)
    budget = Budget.avg_bits(total / n)
    reachable = {0}
    for _ in range(n):
        reachable = {r + b for r in reachable for b in bitset}
    if measured or len(bitset) < 2:
        curves = Curves.measured(table, bitset)
    else:
        curves = Curves.from_fit(fit_distortion(table, bitset, shared_beta="component"))
    try:
        alloc = allocate(curves, budget)
    except BudgetError as exc:
        assert total not in reachable
        assert "reachable averages lie in" in str(exc)
        return
    assert total in reachable
    assert int(alloc.bits.sum()) == total and alloc.avg_bits == total / n
    assert set(np.unique(alloc.bits)) <= set(bitset)
