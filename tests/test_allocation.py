"""Allocation: exact integer optimum against brute force, budgets met exactly, closed form, baselines, bytes."""

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
    ALLOCATORS,
    Allocation,
    Budget,
    CostModel,
    allocate_closed_form,
    allocate_integer,
    best_kv_split,
    is_convex,
    kv_split,
    layerwise,
    mismatched,
    predicted_distortion,
    rate_quant,
    solve_integer,
    uniform,
)
from ratequant.errors import BudgetError, RateQuantError
from ratequant.fitting import fit_distortion
from ratequant.geometry import Geometry
from ratequant.quantizers.base import Quantizer

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
        from ratequant.allocation import _dp  # the exact DP, called directly on the same instance

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
# rate_quant and baselines through budgets
# --------------------------------------------------------------------------------------------------------
G = Geometry(num_layers=6, num_kv_heads=3, head_dim=32, num_heads=6)  # N = 36


@pytest.mark.parametrize("avg", [1.0, 2.5, 3.0, 4.25, 8.0])
def test_rate_quant_meets_average_budget_exactly(avg):
    table = table_for(G, noise=0.1)
    fit = fit_distortion(table, ALL)
    for source, use in ((fit, "fit"), (table, "measured"), (table, "fit")):
        alloc = rate_quant(source, Budget.avg_bits(avg), G, table_bitset=ALL, use=use)
        assert alloc.avg_bits == avg and int(alloc.bits.sum()) == round(avg * 36)
        assert alloc.method == "ratequant"
        assert alloc.bits.shape == (2, 6, 3)


def test_rate_quant_is_optimal_on_the_measured_table():
    g = Geometry(1, 2, 8)  # N = 4: brute force is small
    table = table_for(g, bitset=(2, 3, 4, 6), seed=3, noise=0.3)
    curves = table.reshape(4, 4)
    for avg in (2.5, 3.0, 3.75, 4.5):
        alloc = rate_quant(table, Budget.avg_bits(avg), g, table_bitset=(2, 3, 4, 6), use="measured")
        best, _ = brute_force(curves, (2, 3, 4, 6), [1] * 4, round(avg * 4))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)


def test_unreachable_budgets_name_the_reachable_range():
    fit = fit_distortion(table_for(G), ALL)
    with pytest.raises(BudgetError, match=r"reachable averages lie in \[1, 8\]"):
        rate_quant(fit, Budget.avg_bits(8.5), G)
    with pytest.raises(BudgetError, match=r"\[2, 6\]"):
        rate_quant(fit, Budget.avg_bits(1.5), G, b_min=2, b_max=6)
    with pytest.raises(BudgetError, match="nearest reachable: 2.47222 and 2.5"):
        rate_quant(fit, Budget.avg_bits(2.49), G)  # 2.49 * 36 = 89.64 code bits is not an integer
    with pytest.raises(BudgetError, match=r"\(2, 4, 8\).*nearest reachable: 2.94444 and 3"):
        rate_quant(fit, Budget.avg_bits(2.97), G, bitset=(2, 4, 8))
    alloc = rate_quant(fit, Budget.avg_bits(3.0), G, bitset=(2, 4, 8))
    assert alloc.avg_bits == 3.0 and set(np.unique(alloc.bits)) <= {2, 4, 8}
    assert alloc.details["solver"] == "dp"


def test_continuous_solution_is_reported_within_one_bit():
    fit = fit_distortion(table_for(G, noise=0.2), ALL)
    alloc = rate_quant(fit, Budget.avg_bits(3.0), G)
    cont = alloc.details["continuous_bits"]
    assert cont.shape == G.shape and cont.sum() == pytest.approx(108.0, rel=1e-12)
    assert np.abs(alloc.bits - cont).max() <= 1.0 + 1e-9


def test_keys_get_more_bits_when_they_matter_more():
    # keys: larger and decaying more slowly, so each bit keeps buying more for keys than for values
    g = Geometry(4, 2, 16)
    t = np.empty(g.shape + (8,))
    b = np.asarray(ALL, float)
    t[0] = 10.0 * 3.0**-b  # keys: big and slowly decaying
    t[1] = 1.0 * 5.0**-b
    alloc = rate_quant(t, Budget.avg_bits(3.0), g, table_bitset=ALL)
    assert alloc.bits[0].mean() > alloc.bits[1].mean()


def test_uniform():
    fit = fit_distortion(table_for(G), ALL)
    alloc = uniform(fit, Budget.avg_bits(4), G)
    assert (alloc.bits == 4).all() and alloc.method == "uniform"
    assert alloc.predicted_distortion == pytest.approx(float(fit.predict(np.full(G.shape, 4)).sum()))
    with pytest.raises(BudgetError, match="nearest reachable: 2 and 3"):
        uniform(fit, Budget.avg_bits(2.5), G)
    none = uniform(None, Budget.avg_bits(2), G, bitset=(2, 4))
    assert (none.bits == 2).all() and none.predicted_distortion is None
    # ratequant can never be worse than uniform under its own model
    assert rate_quant(fit, Budget.avg_bits(4), G).predicted_distortion <= alloc.predicted_distortion


def test_kv_split_enumerates_pairs_meeting_the_budget():
    fit = fit_distortion(table_for(G, noise=0.1), ALL)
    alloc = best_kv_split(fit, Budget.avg_bits(3), G, bitset=(2, 3, 4))
    assert {c["split"] for c in alloc.details["candidates"]} == {"K4V2", "K3V3", "K2V4"}
    best = min(alloc.details["candidates"], key=lambda c: c["predicted_distortion"])
    assert alloc.details["split"] == best["split"]
    assert (alloc.bits[0] == best["key_bits"]).all() and (alloc.bits[1] == best["value_bits"]).all()
    assert alloc.avg_bits == 3.0
    assert kv_split(fit, Budget.avg_bits(3), G).details["split"] in {"K1V5", "K2V4", "K3V3", "K4V2", "K5V1"}
    fixed = kv_split(None, Budget.avg_bits(3), G, key_bits=4, value_bits=2)
    assert (fixed.bits[0] == 4).all() and (fixed.bits[1] == 2).all() and fixed.details["split"] == "K4V2"
    with pytest.raises(BudgetError, match="averages 3"):
        kv_split(None, Budget.avg_bits(2.5), G, key_bits=4, value_bits=2)
    with pytest.raises(BudgetError, match="reachable averages: 2, 2.5, 3"):
        best_kv_split(fit, Budget.avg_bits(3.25), G, bitset=(2, 3, 4))


def test_layerwise_is_one_width_per_layer_and_optimal():
    g = Geometry(num_layers=4, num_kv_heads=2, head_dim=16)
    table = table_for(g, seed=5, noise=0.2)
    fit = fit_distortion(table, ALL)
    for avg in (2.0, 2.75, 3.5):
        alloc = layerwise(fit, Budget.avg_bits(avg), g)
        assert alloc.avg_bits == avg
        for layer in range(4):
            assert len(np.unique(alloc.bits[:, layer, :])) == 1
        layer_curves = fit.predicted_table().sum(axis=(0, 2))  # [L, nb]
        best, _ = brute_force(layer_curves, ALL, [1] * 4, round(avg * 4))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)
    with pytest.raises(BudgetError, match="nearest reachable: 2.5 and 2.75"):
        layerwise(fit, Budget.avg_bits(2.625), g)  # 2.625 = 21/8 is fine per component, not per layer


def test_mismatched_allocates_with_the_source_curves():
    fit_a = fit_distortion(table_for(G, seed=1, betas=(3.6, 3.6)), ALL)
    fit_b = fit_distortion(table_for(G, seed=2, betas=(5.3, 5.3)), ALL)
    budget = Budget.avg_bits(3.0)
    mis = mismatched(fit_a, budget, G, source_design="design-a")
    own = rate_quant(fit_b, budget, G)
    np.testing.assert_array_equal(mis.bits, rate_quant(fit_a, budget, G).bits)
    assert mis.method == "mismatched" and mis.details["source_design"] == "design-a"
    # judged by design B's curves, B's own allocation is optimal, so the mismatched one cannot beat it
    assert predicted_distortion(mis.bits, fit_b) >= own.predicted_distortion
    assert predicted_distortion(own.bits, fit_b) == pytest.approx(own.predicted_distortion, rel=1e-12)


def test_registry_names_every_allocator():
    assert set(ALLOCATORS) == {"ratequant", "uniform", "kv-split", "layerwise", "mismatched"}
    fit = fit_distortion(table_for(G), ALL)
    for name, fn in ALLOCATORS.items():
        kw = {"source_design": "x"} if name == "mismatched" else {}
        alloc = fn(fit, Budget.avg_bits(3.0), G, **kw)
        assert isinstance(alloc, Allocation) and alloc.avg_bits == 3.0


def test_wrong_shapes_and_sources_are_refused():
    fit = fit_distortion(table_for(G), ALL)
    with pytest.raises(RateQuantError, match="model has"):
        rate_quant(fit, Budget.avg_bits(3), Geometry(5, 3, 32))
    with pytest.raises(RateQuantError, match="measured table"):
        rate_quant(fit, Budget.avg_bits(3), G, use="measured")
    with pytest.raises(RateQuantError, match="table_bitset"):
        rate_quant(table_for(G), Budget.avg_bits(3), G)
    with pytest.raises(RateQuantError, match="cannot allocate widths"):
        rate_quant(table_for(G, bitset=(2, 4)), Budget.avg_bits(3), G, table_bitset=(2, 4), bitset=(2, 3, 4),
                   use="measured")


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
    cm = CostModel.from_quantizer(FakeQuantizer(), G, residual_length=100, context_tokens=1000)
    assert cm.is_affine
    np.testing.assert_allclose(cm.bytes_per_bit, 32 / 8)
    np.testing.assert_allclose(cm.fixed_bytes, 4.0)
    bits = np.full(G.shape, 4)
    per_token = 36 * (32 * 4 + 32) / 8  # codes + scale/zero, all components
    fp = 36 * 32 * 2
    # 1000 tokens = 10 full chunks of 100 quantized; the residual buffers are empty
    assert cm.bytes_per_token(bits) == pytest.approx(per_token)
    assert cm.residual_bytes_per_token == 0
    # 3 chunks of 300 quantized; 100 tokens per kind wait at full precision
    partial = CostModel.from_quantizer(FakeQuantizer(), G, residual_length=300, context_tokens=1000)
    assert partial.bytes_per_token(bits) == pytest.approx(0.9 * per_token + 0.1 * fp)
    assert not CostModel.from_quantizer(FakeQuantizer(codebook=True), G, 0, 1).is_affine


@pytest.mark.parametrize("budget_bytes", [600.0, 700.5, 1000.0, 1206.0])
def test_byte_budget_uses_the_most_code_bits_that_fit(budget_bytes):
    fit = fit_distortion(table_for(G, noise=0.1), ALL)
    cm = CostModel.from_quantizer(FakeQuantizer(), G, residual_length=0, context_tokens=512)
    alloc = rate_quant(fit, Budget.bytes_per_token(budget_bytes, 512), G, cost_model=cm)
    assert alloc.bytes_per_token <= budget_bytes
    # one more code bit anywhere costs 4 bytes: the allocation leaves less than that unused
    assert budget_bytes - alloc.bytes_per_token < 4.0
    assert alloc.bytes_per_token == pytest.approx(36 * 4.0 + 4.0 * alloc.bits.sum() + cm.residual_bytes_per_token)
    assert alloc.details["byte_model"] == "affine"
    # and it is the avg-bits optimum at that many code bits
    same = rate_quant(fit, Budget.avg_bits(alloc.avg_bits), G)
    np.testing.assert_array_equal(same.bits, alloc.bits)


def test_byte_budget_range_errors():
    fit = fit_distortion(table_for(G), ALL)
    cm = CostModel.from_quantizer(FakeQuantizer(), G, residual_length=64, context_tokens=1024)
    with pytest.raises(BudgetError, match="outside the reachable range"):
        rate_quant(fit, Budget.bytes_per_token(100.0, 1024), G, cost_model=cm)
    with pytest.raises(BudgetError, match="outside the reachable range"):
        rate_quant(fit, Budget.bytes_per_token(1e6, 1024), G, cost_model=cm)
    with pytest.raises(BudgetError, match="same length"):
        rate_quant(fit, Budget.bytes_per_token(1000.0, 512), G, cost_model=cm)
    with pytest.raises(BudgetError, match="needs a cost model"):
        rate_quant(fit, Budget.bytes_per_token(1000.0, 1024), G)
    short = CostModel.from_quantizer(FakeQuantizer(), G, residual_length=64, context_tokens=32)
    with pytest.raises(BudgetError, match="residual window"):
        rate_quant(fit, Budget.bytes_per_token(5000.0, 32), G, cost_model=short)


def test_byte_budget_with_width_dependent_metadata_is_optimal():
    g = Geometry(1, 2, 8)  # 4 components
    bitset = (1, 2, 3, 4)
    table = table_for(g, bitset=bitset, seed=4, noise=0.2)
    cm = CostModel.from_quantizer(FakeQuantizer(codebook=True), g, 0, 1, bitset=bitset)
    assert not cm.is_affine
    curves = table.reshape(4, 4)
    bytes_table = cm.bytes_table  # [4, nb]
    residual = cm.residual_bytes_per_token  # the one-token full-precision buffer per kind
    for budget in (21.0, 24.0, 29.5, 33.3, 40.0):  # reachable for the codes and metadata: [21, 40]
        alloc = rate_quant(table, Budget.bytes_per_token(budget + residual, 1), g, table_bitset=bitset,
                           use="measured", cost_model=cm)
        assert alloc.bytes_per_token <= budget + residual and alloc.details["byte_model"] == "table"
        best = math.inf
        for choice in itertools.product(range(4), repeat=4):
            if sum(bytes_table[i, j] for i, j in enumerate(choice)) <= budget:
                best = min(best, sum(curves[i, j] for i, j in enumerate(choice)))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)


def test_baselines_take_byte_budgets():
    fit = fit_distortion(table_for(G), ALL)
    cm = CostModel.from_quantizer(FakeQuantizer(), G, residual_length=0, context_tokens=100)
    # exactly 3.5 average code bits, plus the one-token buffer per kind that residual_length=0 keeps
    budget = Budget.bytes_per_token(36 * 4.0 + 4.0 * 36 * 3.5 + cm.residual_bytes_per_token, 100)
    assert uniform(fit, budget, G, cost_model=cm).avg_bits == 3.0
    assert best_kv_split(fit, budget, G, cost_model=cm).avg_bits == 3.5
    assert layerwise(fit, budget, G, cost_model=cm).avg_bits == 3.5
    assert rate_quant(fit, budget, G, cost_model=cm).avg_bits == 3.5


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
    source = table if measured or len(bitset) < 2 else fit_distortion(table, bitset, shared_beta="component")
    try:
        alloc = rate_quant(source, budget, g, table_bitset=bitset, use="measured" if source is table else "fit")
    except BudgetError as exc:
        assert total not in reachable
        assert "reachable averages lie in" in str(exc)
        return
    assert total in reachable
    assert int(alloc.bits.sum()) == total and alloc.avg_bits == total / n
    assert set(np.unique(alloc.bits)) <= set(bitset)


@pytest.mark.parametrize("design, residual, tokens", [("kivi", 128, 4096), ("kivi", 0, 1000), ("kivi", 64, 700),
                                                      ("uniform", 0, 333), ("turbo", 128, 2000)])
def test_cost_model_agrees_with_the_cache_formula(design, residual, tokens):
    from ratequant.cache import expected_nbytes
    from ratequant.quantizers import get_quantizer

    g = Geometry(4, 3, 64)
    quantizer = get_quantizer(design)
    bits = np.random.default_rng(0).integers(1, 9, size=g.shape)
    cm = CostModel.from_quantizer(quantizer, g, residual_length=residual, context_tokens=tokens)
    expected = expected_nbytes(bits, quantizer, g.head_dim, tokens, residual_length=residual)
    assert cm.bytes_per_token(bits) * tokens == pytest.approx(expected.total, abs=2)
