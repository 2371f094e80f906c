"""Curves (:mod:`ratequant.allocation.curves`): floors and shapes validated, widths a measurement lacks refused,
and another design's curves carried as provenance."""

from __future__ import annotations

import numpy as np
import pytest

from ratequant.allocation import AllocationOptions, Budget, CostModel, Curves, allocate
from ratequant.allocation.fitting import fit_distortion
from ratequant.errors import BudgetError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.spec import StoragePolicy
from tests.allocation.helpers import ALL, FLOOR_WIDTHS, TINY, FakeQuantizer, G, table_for


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
