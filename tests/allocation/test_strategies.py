"""Strategies (:func:`ratequant.allocation.allocate` by strategy): every strategy refuses a budget it cannot meet,
naming the reachable range. (Optimality and budgets met: tests/allocation/test_allocation.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from ratequant.allocation import STRATEGIES, AllocationOptions, Budget, CostModel, Curves, allocate
from ratequant.allocation.fitting import fit_distortion
from ratequant.errors import BudgetError
from ratequant.geometry import Geometry
from ratequant.spec import StoragePolicy
from tests.cache.test_layer import KIVI4

G = Geometry(3, 2, 16, 4)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_names_the_reachable_range(strategy):
    table = np.exp(np.random.default_rng(0).normal(0, 1, G.shape))[..., None] * 4.0 ** -np.arange(1, 9)
    curves = Curves.from_fit(fit_distortion(table, tuple(range(1, 9))))
    cost = CostModel.from_policy(StoragePolicy(KIVI4, 8), G, 64)
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
