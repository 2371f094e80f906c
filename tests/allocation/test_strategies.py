"""Strategies (:mod:`ratequant.allocation.strategies`, :func:`ratequant.allocation.allocate` by strategy):
ratequant and the baselines (uniform, kv-split, layerwise, layer-kind) meet budgets exactly with the optimum over
one width per group, the registry names every strategy, and every strategy refuses a budget it cannot meet,
naming the reachable range."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ratequant.allocation import (
    STRATEGIES,
    Allocation,
    AllocationOptions,
    Budget,
    CostModel,
    Curves,
    allocate,
    get_strategy,
)
from ratequant.allocation.fitting import fit_distortion
from ratequant.errors import BudgetError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.spec import StoragePolicy
from tests.allocation.helpers import ALL, FakeQuantizer, G, brute_force, fitted, table_for
from tests.cache.helpers import KIVI4

G_REACH = Geometry(3, 2, 16, 4)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_names_the_reachable_range(strategy):
    table = np.exp(np.random.default_rng(0).normal(0, 1, G_REACH.shape))[..., None] * 4.0 ** -np.arange(1, 9)
    curves = Curves.from_fit(fit_distortion(table, tuple(range(1, 9))))
    cost = CostModel.from_policy(StoragePolicy(KIVI4, 8), G_REACH, 64)
    reach = r"reachable averages lie in \[1, 8\]"
    cases = [
        (Budget.avg_bits(9.0), {}, reach),
        (Budget.avg_bits(0.5), {}, reach),
        (Budget.avg_bits(1.5), {"b_min": 2}, r"\[2, 8\]"),
        (Budget.avg_bits(3.5), {"b_max": 3}, r"\[1, 3\]"),
        (Budget.avg_bits(2.9), {"bitset": (2, 4)}, r"\[2, 4\]"),
        (Budget.bytes_per_token(10.0, 64), {}, r"outside the reachable range \[216, 384\]"),
    ]
    for budget, options, match in cases:
        with pytest.raises(BudgetError, match=match):
            allocate(curves, budget, strategy, AllocationOptions(cost_model=cost, **options))


# --------------------------------------------------------------------------------------------------------
# ratequant and baselines through budgets
# --------------------------------------------------------------------------------------------------------
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
# Every baseline takes a bytes-per-token budget
# --------------------------------------------------------------------------------------------------------
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
