"""Allocation: exact integer optimum against brute force, budgets met exactly, closed form, strategies, bytes."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratequant.allocation import (
    STRATEGIES,
    Allocation,
    AllocationOptions,
    Budget,
    CostModel,
    Curves,
    allocate,
    allocate_closed_form,
    allocate_integer,
    check_reachable,
    get_strategy,
    is_convex,
    solve_integer,
)
from ratequant.allocation.fitting import fit_distortion
from ratequant.allocation.solvers import _dp
from ratequant.errors import BudgetError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.quantizers import get_quantizer
from ratequant.quantizers.base import Quantizer
from ratequant.spec import KVQuantSpec, StoragePolicy

ALL = (1, 2, 3, 4, 5, 6, 7, 8)


def exp_curves(n, bitset, seed, spread=2.0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, spread, n))
    beta = rng.uniform(2.5, 6.0, n)
    return alpha[:, None] * beta[:, None] ** -np.asarray(bitset, float), alpha, beta


def brute_force(curves, bitset, cost, total, at_most=False):
    """Minimum of sum curves over all width choices with sum cost*b == total (or <= total)."""
    n = curves.shape[0]
    best, arg = math.inf, None
    for choice in itertools.product(range(len(bitset)), repeat=n):
        spent = sum(cost[i] * bitset[j] for i, j in enumerate(choice))
        if spent > total if at_most else spent != total:
            continue
        val = sum(curves[i, j] for i, j in enumerate(choice))
        if val < best:
            best, arg = val, choice
    return best, arg


def objective(curves, bitset, bits):
    idx = [bitset.index(int(b)) for b in bits]
    return float(curves[np.arange(len(bits)), idx].sum())


def table_for(geometry, bitset=ALL, seed=0, betas=(4.5, 3.7), noise=0.0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, 2, geometry.shape))
    beta = np.empty(geometry.shape)
    beta[0], beta[1] = betas
    t = alpha[..., None] * beta[..., None] ** -np.asarray(bitset, float)
    return t * np.exp(rng.normal(0, noise, t.shape)) if noise else t


def fitted(geometry, **kw):
    """Curves of a fit to a synthetic table over all widths."""
    return Curves.from_fit(fit_distortion(table_for(geometry, **kw), ALL))


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


# --------------------------------------------------------------------------------------------------------
# ratequant and baselines through budgets
# --------------------------------------------------------------------------------------------------------
G = Geometry(num_layers=6, num_kv_heads=3, head_dim=32, num_heads=6)  # N = 36


@pytest.mark.parametrize("avg", [1.0, 2.5, 3.0, 4.25, 8.0])
def test_rate_quant_meets_average_budget_exactly(avg):
    table = table_for(G, noise=0.1)
    fit = fit_distortion(table, ALL)
    # a fit, the measured table as it is, and the table fitted here
    for curves in (Curves.from_fit(fit), Curves.measured(table, ALL), Curves.from_fit(fit_distortion(table, ALL))):
        alloc = allocate(curves, Budget.avg_bits(avg))
        assert alloc.avg_bits == avg and int(alloc.bits.sum()) == round(avg * 36)
        assert alloc.method == "ratequant"
        assert alloc.bits.shape == (2, 6, 3)
        assert alloc.details["curves"]["source"] == curves.source


def test_rate_quant_is_optimal_on_the_measured_table():
    g = Geometry(1, 2, 8)  # N = 4: brute force is small
    table = table_for(g, bitset=(2, 3, 4, 6), seed=3, noise=0.3)
    flat = table.reshape(4, 4)
    curves = Curves.measured(table, (2, 3, 4, 6))
    for avg in (2.5, 3.0, 3.75, 4.5):
        alloc = allocate(curves, Budget.avg_bits(avg), "ratequant")
        best, _ = brute_force(flat, (2, 3, 4, 6), [1] * 4, round(avg * 4))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)
        assert curves.total(alloc.bits) == alloc.predicted_distortion


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


def test_continuous_solution_is_reported_within_one_bit():
    curves = fitted(G, noise=0.2)
    alloc = allocate(curves, Budget.avg_bits(3.0))
    cont = alloc.details["continuous_bits"]
    assert cont.shape == G.shape and cont.sum() == pytest.approx(108.0, rel=1e-12)
    assert np.abs(alloc.bits - cont).max() <= 1.0 + 1e-9
    # measured curves have no closed form to report
    measured = allocate(Curves.measured(table_for(G), ALL), Budget.avg_bits(3.0))
    assert "continuous_bits" not in measured.details


def test_keys_get_more_bits_when_they_matter_more():
    # keys: larger and decaying more slowly, so each bit keeps buying more for keys than for values
    g = Geometry(4, 2, 16)
    t = np.empty(g.shape + (8,))
    b = np.asarray(ALL, float)
    t[0] = 10.0 * 3.0**-b  # keys: big and slowly decaying
    t[1] = 1.0 * 5.0**-b
    for curves in (Curves.measured(t, ALL), Curves.from_fit(fit_distortion(t, ALL))):
        alloc = allocate(curves, Budget.avg_bits(3.0))
        assert alloc.bits[0].mean() > alloc.bits[1].mean()


def test_uniform():
    fit = fit_distortion(table_for(G), ALL)
    curves = Curves.from_fit(fit)
    alloc = allocate(curves, Budget.avg_bits(4), "uniform")
    assert (alloc.bits == 4).all() and alloc.method == "uniform"
    assert alloc.predicted_distortion == pytest.approx(float(fit.predict(np.full(G.shape, 4)).sum()))
    with pytest.raises(BudgetError, match="nearest reachable: 2 and 3"):
        allocate(curves, Budget.avg_bits(2.5), "uniform")
    none = allocate(Curves.flat(G, (2, 4)), Budget.avg_bits(2), "uniform")
    assert (none.bits == 2).all() and none.predicted_distortion is None
    assert none.details["curves"]["source"] == "none"
    # ratequant can never be worse than uniform under its own model
    assert allocate(curves, Budget.avg_bits(4)).predicted_distortion <= alloc.predicted_distortion


def test_kv_split_picks_the_best_pair_meeting_the_budget():
    curves = Curves.from_fit(fit_distortion(table_for(G, noise=0.1), ALL))
    options = AllocationOptions(bitset=(2, 3, 4))
    alloc = allocate(curves, Budget.avg_bits(3), "kv-split", options)
    # every fixed split meeting the budget, judged by the same curves
    candidates = {}
    for k, v in itertools.product((2, 3, 4), repeat=2):
        if (k + v) / 2 == 3:
            fixed = allocate(curves, Budget.avg_bits(3), get_strategy("kv-split", key_bits=k, value_bits=v), options)
            candidates[fixed.details["split"]] = fixed
    assert set(candidates) == {"K4V2", "K3V3", "K2V4"}
    best = min(candidates.values(), key=lambda a: a.predicted_distortion)
    assert alloc.details["split"] == best.details["split"]
    np.testing.assert_array_equal(alloc.bits, best.bits)
    assert alloc.predicted_distortion == pytest.approx(best.predicted_distortion, rel=1e-12)
    assert alloc.avg_bits == 3.0
    assert allocate(curves, Budget.avg_bits(3), "kv-split").details["split"] in {"K1V5", "K2V4", "K3V3", "K4V2", "K5V1"}
    flat = Curves.flat(G, ALL)
    fixed = allocate(flat, Budget.avg_bits(3), get_strategy("kv-split", key_bits=4, value_bits=2))
    assert (fixed.bits[0] == 4).all() and (fixed.bits[1] == 2).all() and fixed.details["split"] == "K4V2"
    assert fixed.predicted_distortion is None
    with pytest.raises(BudgetError, match="averages 3"):
        allocate(flat, Budget.avg_bits(2.5), get_strategy("kv-split", key_bits=4, value_bits=2))
    with pytest.raises(BudgetError, match=r"lie in \[2, 4\]; nearest reachable: 3 and 3.5"):
        allocate(curves, Budget.avg_bits(3.25), "kv-split", options)
    with pytest.raises(RateQuantError, match="both key_bits and value_bits"):
        get_strategy("kv-split", key_bits=4)
    with pytest.raises(RateQuantError, match="allocation strategy 'kv-split'"):
        get_strategy("kv-split", keys=4)


def test_layerwise_is_one_width_per_layer_and_optimal():
    g = Geometry(num_layers=4, num_kv_heads=2, head_dim=16)
    table = table_for(g, seed=5, noise=0.2)
    fit = fit_distortion(table, ALL)
    curves = Curves.from_fit(fit)
    for avg in (2.0, 2.75, 3.5):
        alloc = allocate(curves, Budget.avg_bits(avg), "layerwise")
        assert alloc.avg_bits == avg
        for layer in range(4):
            assert len(np.unique(alloc.bits[:, layer, :])) == 1
        layer_curves = fit.predicted_table().sum(axis=(0, 2))  # [L, nb]
        best, _ = brute_force(layer_curves, ALL, [1] * 4, round(avg * 4))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)
    with pytest.raises(BudgetError, match=r"nearest reachable: 2\.5 and 2\.75"):
        allocate(curves, Budget.avg_bits(2.625), "layerwise")  # 2.625 = 21/8 is fine per component, not per layer


def test_other_designs_curves_are_a_provenance():
    """The paper's distortion-model mismatch: ratequant on design A's curves, judged by design B's."""
    fit_a = fit_distortion(table_for(G, seed=1, betas=(3.6, 3.6)), ALL)
    fit_b = fit_distortion(table_for(G, seed=2, betas=(5.3, 5.3)), ALL)
    budget = Budget.avg_bits(3.0)
    mis = allocate(Curves.from_fit(fit_a, design="design-a"), budget)
    own = allocate(Curves.from_fit(fit_b, design="design-b"), budget)
    np.testing.assert_array_equal(mis.bits, allocate(Curves.from_fit(fit_a), budget).bits)
    assert mis.method == "ratequant" and mis.details["curves"]["design"] == "design-a"
    assert own.details["curves"]["design"] == "design-b"
    # judged by design B's curves, B's own allocation is optimal, so the mismatched one cannot beat it
    judge = Curves.from_fit(fit_b)
    assert judge.total(mis.bits) >= own.predicted_distortion
    assert judge.total(own.bits) == pytest.approx(own.predicted_distortion, rel=1e-12)


def test_registry_names_every_strategy():
    assert set(STRATEGIES) == {"ratequant", "uniform", "kv-split", "layerwise", "layer-kind"}
    curves = fitted(G)
    for name in STRATEGIES:
        alloc = allocate(curves, Budget.avg_bits(3.0), name)
        assert isinstance(alloc, Allocation) and alloc.avg_bits == 3.0 and alloc.method == name
    with pytest.raises(RateQuantError, match="unknown allocation strategy 'mismatched'; choose one of"):
        allocate(curves, Budget.avg_bits(3.0), "mismatched")


# --------------------------------------------------------------------------------------------------------
# Every registered strategy: exact budgets, one width per group, the group-level optimum
# --------------------------------------------------------------------------------------------------------
SMALL = Geometry(num_layers=2, num_kv_heads=2, head_dim=16)  # N = 8
SMALL_WIDTHS = (2, 3, 4)


def small_convex_fit(seed):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, 2, SMALL.shape))
    beta = np.empty(SMALL.shape)
    beta[0], beta[1] = rng.uniform(2.5, 6.0, 2)
    table = alpha[..., None] * beta[..., None] ** -np.asarray(ALL, float)
    return fit_distortion(table * np.exp(rng.normal(0, 0.05, table.shape)), ALL)


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("seed", range(2))
def test_every_strategy_meets_the_budget_with_one_width_per_group(name, seed):
    curves = Curves.from_fit(small_convex_fit(seed))
    strategy = get_strategy(name)
    groups = strategy.groups(SMALL.shape)
    assert groups.shape == SMALL.shape
    ids = np.unique(groups)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # ids 0..M-1, every one used
    options = AllocationOptions(bitset=SMALL_WIDTHS)
    sizes = np.bincount(groups.ravel())
    flat_curves = curves.restrict(SMALL_WIDTHS).values.reshape(-1, len(SMALL_WIDTHS))
    group_curves = np.zeros((ids.size, len(SMALL_WIDTHS)))
    np.add.at(group_curves, groups.ravel(), flat_curves)
    for avg in (2.0, 3.0, 4.0):  # integer averages: reachable by every grouping
        alloc = allocate(curves, Budget.avg_bits(avg), name, options)
        assert alloc.method == name and alloc.avg_bits == avg and int(alloc.bits.sum()) == round(avg * 8)
        for gid in ids:
            assert len(np.unique(alloc.bits[groups == gid])) == 1
        # and it is the exact optimum over one width per group
        best, _ = brute_force(group_curves, SMALL_WIDTHS, sizes, round(avg * 8))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)


def test_layer_kind_gives_one_width_per_layer_and_kind():
    g = Geometry(num_layers=3, num_kv_heads=4, head_dim=16)
    groups = get_strategy("layer-kind").groups(g.shape)
    assert len(np.unique(groups)) == 2 * 3
    for k in range(2):
        for layer in range(3):
            assert len(np.unique(groups[k, layer])) == 1
    curves = Curves.from_fit(fit_distortion(table_for(g, seed=4, betas=(3.0, 5.5), noise=0.1), ALL))
    for avg in (2.5, 3.0, 3.5):  # multiples of 1/6 (groups of 4 heads over 24 components)
        alloc = allocate(curves, Budget.avg_bits(avg), "layer-kind")
        assert alloc.avg_bits == avg
        for k in range(2):
            for layer in range(3):
                assert len(np.unique(alloc.bits[k, layer])) == 1
        # coarser than ratequant, so it can only do worse under the same curves
        assert alloc.predicted_distortion >= allocate(curves, Budget.avg_bits(avg)).predicted_distortion
        if avg == 3.0:  # layerwise (groups of 8) reaches multiples of 1/3 only; layer-kind is finer
            layerwise = allocate(curves, Budget.avg_bits(avg), "layerwise")
            assert alloc.predicted_distortion <= layerwise.predicted_distortion
    with pytest.raises(BudgetError, match=r"nearest reachable: 2\.5 and 2\.66667"):
        allocate(curves, Budget.avg_bits(2.6), "layer-kind")


# --------------------------------------------------------------------------------------------------------
# Per-component floors: Curves(min_bits=(key, value))
# --------------------------------------------------------------------------------------------------------
TINY = Geometry(num_layers=1, num_kv_heads=2, head_dim=8)  # N = 4: keys then values
FLOOR_WIDTHS = (1, 2, 3, 4, 5)


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


def test_floors_are_validated():
    table = table_for(TINY, bitset=FLOOR_WIDTHS)
    with pytest.raises(RateQuantError, match="min_bits"):
        Curves.measured(table, FLOOR_WIDTHS, min_bits=(3,))
    with pytest.raises(RateQuantError, match="min_bits"):
        Curves.measured(table, FLOOR_WIDTHS, min_bits=(0, 2))
    curves = Curves.measured(table, FLOOR_WIDTHS, min_bits=(3, 2))
    with pytest.raises(BudgetError, match="lowest informative width of layer 0 kv-head 0's keys"):
        allocate(curves, Budget.avg_bits(2.0), options=AllocationOptions(b_max=2))


def test_wrong_shapes_and_sources_are_refused():
    fit = fit_distortion(table_for(G), ALL)
    other = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 0), Geometry(5, 3, 32), 100)
    with pytest.raises(RateQuantError, match="model has"):
        allocate(Curves.from_fit(fit), Budget.avg_bits(3), options=AllocationOptions(cost_model=other))
    with pytest.raises(RateQuantError, match="needs Curves"):
        allocate(fit, Budget.avg_bits(3))  # a raw fit or table is no longer an input
    with pytest.raises(RateQuantError, match="needs Curves"):
        allocate(table_for(G), Budget.avg_bits(3))
    with pytest.raises(RateQuantError, match=r"measured at widths \(2, 4\), not at \[3\]"):
        allocate(
            Curves.measured(table_for(G, bitset=(2, 4)), (2, 4)),
            Budget.avg_bits(3),
            options=AllocationOptions(bitset=(2, 3, 4)),
        )
    with pytest.raises(RateQuantError, match="curves must be"):
        Curves.measured(table_for(G, bitset=(2, 4)), (2, 3, 4))
    # a fit predicts at widths it was not fitted on
    sub = Curves.from_fit(fit_distortion(table_for(G, bitset=(2, 4, 8)), (2, 4, 8)))
    assert allocate(sub, Budget.avg_bits(3), options=AllocationOptions(bitset=(2, 3, 4))).avg_bits == 3


# --------------------------------------------------------------------------------------------------------
# Budgets in bytes
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeQuantizer(Quantizer):
    """Stores a float16 scale and zero per token and head (32 bits); optionally a width-dependent codebook."""

    name: ClassVar[str] = "fake-test"
    codebook: bool = False

    def quantize(self, x, bits, kind):  # pragma: no cover - cost only
        raise NotImplementedError

    def dequantize(self, q):  # pragma: no cover - cost only
        raise NotImplementedError

    def metadata_bits_per_token(self, head_dim, bits, kind):
        return 32.0 + (2**bits if self.codebook else 0.0)


def test_budget_validation():
    with pytest.raises(BudgetError, match="context_tokens"):
        Budget("bytes_per_token", 100.0)
    with pytest.raises(BudgetError, match="only applies"):
        Budget("avg_bits", 3.0, 100)
    with pytest.raises(BudgetError, match="finite"):
        Budget("avg_bits", float("nan"))
    with pytest.raises(BudgetError, match="kind"):
        Budget("bits", 3.0)
    with pytest.raises(BudgetError, match="positive"):
        Budget("avg_bits", 0)
    b = Budget.bytes_per_token(1000, 4096)
    assert Budget.from_dict(b.to_dict()) == b


def test_cost_model_counts_codes_metadata_and_residual():
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 100), G, 1000)
    # affine with one slope for everyone: 32 codes per bit = 4 bytes, plus 4 bytes of scale and zero
    np.testing.assert_allclose(np.diff(cm.table, axis=1), 32 / 8)
    np.testing.assert_allclose(cm.table[:, 0] - 32 / 8, 4.0)
    assert cm.depends_on_bits and cm.context_tokens == 1000 and cm.num_components == 36
    bits = np.full(G.shape, 4)
    per_token = 36 * (32 * 4 + 32) / 8  # codes + scale/zero, all components
    fp = 36 * 32 * 2
    # 1000 tokens = 10 full chunks of 100 quantized; the residual buffers are empty
    assert cm.bytes_per_token(bits) == pytest.approx(per_token)
    assert cm.fixed_bytes_per_token == 0
    # 3 chunks of 300 quantized; 100 tokens per kind wait at full precision
    partial = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 300), G, 1000)
    assert partial.bytes_per_token(bits) == pytest.approx(0.9 * per_token + 0.1 * fp)
    assert partial.fixed_bytes_per_token == pytest.approx(0.1 * fp)
    # sink tokens are kept at full precision too, amortised like the residual window
    sinks = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 100, sink_tokens=100), G, 1000)
    assert sinks.bytes_per_token(bits) == pytest.approx(0.9 * per_token + 0.1 * fp)
    codebook = CostModel.from_policy(StoragePolicy(FakeQuantizer(codebook=True), 0), G, 1)
    slopes = np.diff(codebook.table, axis=1)
    assert not np.allclose(slopes, slopes[0, 0])  # not affine: bytes per bit depend on the width
    with pytest.raises(RateQuantError, match="bitset"):
        cm.bytes_per_token(np.full(G.shape, 9))
    with pytest.raises(RateQuantError, match="N even"):
        CostModel(ALL, np.ones((3, 8)), 0.0, 10)
    with pytest.raises(RateQuantError, match="must not decrease"):
        CostModel((1, 2), np.array([[2.0, 1.0], [1.0, 2.0]]), 0.0, 10)


@pytest.mark.parametrize("budget_bytes", [600.0, 700.5, 1000.0, 1206.0])
def test_byte_budget_uses_the_most_code_bits_that_fit(budget_bytes):
    curves = fitted(G, noise=0.1)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 0), G, 512)
    alloc = allocate(curves, Budget.bytes_per_token(budget_bytes, 512), options=AllocationOptions(cost_model=cm))
    assert alloc.bytes_per_token <= budget_bytes
    # one more code bit anywhere costs 4 bytes: the allocation leaves less than that unused
    assert budget_bytes - alloc.bytes_per_token < 4.0
    assert alloc.bytes_per_token == pytest.approx(36 * 4.0 + 4.0 * alloc.bits.sum() + cm.fixed_bytes_per_token)
    assert alloc.details["byte_model"] == "affine"
    # and it is the avg-bits optimum at that many code bits
    same = allocate(curves, Budget.avg_bits(alloc.avg_bits))
    np.testing.assert_array_equal(same.bits, alloc.bits)


def test_byte_budget_range_errors():
    curves = fitted(G)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 64), G, 1024)
    opts = AllocationOptions(cost_model=cm)
    with pytest.raises(BudgetError, match="outside the reachable range"):
        allocate(curves, Budget.bytes_per_token(100.0, 1024), options=opts)
    with pytest.raises(BudgetError, match="outside the reachable range"):
        allocate(curves, Budget.bytes_per_token(1e6, 1024), options=opts)
    with pytest.raises(BudgetError, match="same length"):
        allocate(curves, Budget.bytes_per_token(1000.0, 512), options=opts)
    with pytest.raises(BudgetError, match="needs a cost model"):
        allocate(curves, Budget.bytes_per_token(1000.0, 1024))
    short = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 64), G, 32)
    assert not short.depends_on_bits
    with pytest.raises(BudgetError, match="residual window"):
        allocate(curves, Budget.bytes_per_token(5000.0, 32), options=AllocationOptions(cost_model=short))


def test_byte_budget_with_width_dependent_metadata_is_optimal():
    g = Geometry(1, 2, 8)  # 4 components
    bitset = (1, 2, 3, 4)
    table = table_for(g, bitset=bitset, seed=4, noise=0.2)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(codebook=True), 0), g, 1, bitset=bitset)
    slopes = np.diff(cm.table, axis=1)
    assert not np.allclose(slopes, slopes[0, 0])
    flat = table.reshape(4, 4)
    fixed = cm.fixed_bytes_per_token
    for budget in (21.0, 24.0, 29.5, 33.3, 40.0):  # reachable for the codes and metadata: [21, 40]
        alloc = allocate(
            Curves.measured(table, bitset),
            Budget.bytes_per_token(budget + fixed, 1),
            options=AllocationOptions(cost_model=cm),
        )
        assert alloc.bytes_per_token <= budget + fixed and alloc.details["byte_model"] == "table"
        best = math.inf
        for choice in itertools.product(range(4), repeat=4):
            if sum(cm.table[i, j] for i, j in enumerate(choice)) <= budget:
                best = min(best, sum(flat[i, j] for i, j in enumerate(choice)))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)


def test_baselines_take_byte_budgets():
    curves = fitted(G)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 0), G, 100)
    opts = AllocationOptions(cost_model=cm)
    # exactly 3.5 average code bits, plus whatever the policy keeps at full precision
    budget = Budget.bytes_per_token(36 * 4.0 + 4.0 * 36 * 3.5 + cm.fixed_bytes_per_token, 100)
    assert allocate(curves, budget, "uniform", opts).avg_bits == 3.0
    assert allocate(curves, budget, "kv-split", opts).avg_bits == 3.5
    assert allocate(curves, budget, "layerwise", opts).avg_bits == 3.5
    assert allocate(curves, budget, "layer-kind", opts).avg_bits == 3.5
    assert allocate(curves, budget, "ratequant", opts).avg_bits == 3.5
    k4v3 = allocate(curves, budget, get_strategy("kv-split", key_bits=4, value_bits=3), opts)
    assert k4v3.bytes_per_token <= budget.value
    with pytest.raises(BudgetError, match="over the budget"):
        allocate(curves, budget, get_strategy("kv-split", key_bits=4, value_bits=4), opts)


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


# --------------------------------------------------------------------------------------------------------
# The cost model is the spec's byte formula
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "design, residual, sinks, tokens",
    [
        ("kivi", 128, 0, 4096),
        ("kivi", 0, 0, 1000),
        ("kivi", 64, 0, 700),
        ("uniform", 0, 0, 333),
        ("turbo", 128, 0, 2000),
        *[(d, r, s, t) for d in ("kivi", "uniform") for r in (0, 128) for s in (0, 4) for t in (3, 333, 2000)],
    ],
)
def test_cost_model_agrees_with_the_spec_formula(design, residual, sinks, tokens):
    g = Geometry(4, 3, 64)
    quantizer = get_quantizer(design)
    policy = StoragePolicy(quantizer, residual, sinks)
    cm = CostModel.from_policy(policy, g, tokens)
    rng = np.random.default_rng(tokens + residual + sinks)
    for _ in range(3):
        bits = rng.integers(1, 9, size=g.shape)
        expected = KVQuantSpec(bits, quantizer, residual, sinks).expected_bytes(g.head_dim, tokens).total
        got = cm.bytes_per_token(bits) * tokens
        assert got == pytest.approx(expected, abs=2)  # integer rounding of codes and metadata only
        assert abs(got - expected) <= 1e-3 * expected


def test_a_residual_that_is_not_a_multiple_of_the_token_group_is_refused_everywhere():
    from ratequant.calibration import CalibrationSettings

    kivi = get_quantizer("kivi", group_size=32)
    with pytest.raises(RateQuantError) as direct:
        StoragePolicy(kivi, 48)
    message = str(direct.value)
    assert "residual length 48 is not a multiple" in message and "token group (32)" in message

    def refused(fn):
        with pytest.raises(RateQuantError) as exc:
            fn()
        return str(exc.value)

    assert refused(lambda: CostModel.from_policy(StoragePolicy(kivi, 48), G, 4096)) == message
    assert refused(lambda: KVQuantSpec(np.full(G.shape, 4), kivi, 48)) == message
    assert (
        refused(lambda: CalibrationSettings(quantizer="kivi", quantizer_params={"group_size": 32}, residual_length=48))
        == message
    )
    # and a multiple is fine everywhere
    policy = StoragePolicy(kivi, 64)
    assert policy.chunks == (64, 64)
    CostModel.from_policy(policy, G, 4096)
    KVQuantSpec(np.full(G.shape, 4), kivi, 64)
    CalibrationSettings(quantizer="kivi", quantizer_params={"group_size": 32}, residual_length=64)


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
