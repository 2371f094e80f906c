"""Budgets (:mod:`ratequant.allocation.budget`): a budget is validated and round-trips through a dict; an average no
allowed width can reach is refused before any measurement, naming the reachable range."""

from __future__ import annotations

import pytest

from ratequant.allocation import Budget, check_reachable
from ratequant.errors import BudgetError


def test_unreachable_average_is_refused_before_any_measurement():
    assert check_reachable(Budget.avg_bits(3.0)) == (1, 2, 3, 4, 5, 6, 7, 8)
    assert check_reachable(Budget.avg_bits(8.0), (2, 4, 8), b_min=4) == (4, 8)
    assert check_reachable(Budget.bytes_per_token(1.0, 64), (2, 4)) == (2, 4)  # bytes: the allocator decides
    for budget, options, match in [
        (Budget.avg_bits(9.0), {}, r"reachable averages lie in \[1, 8\]"),
        (Budget.avg_bits(0.5), {}, r"reachable averages lie in \[1, 8\]"),
        (Budget.avg_bits(1.5), {"b_min": 2}, r"widths \(2, 3, 4, 5, 6, 7, 8\): reachable averages lie in \[2, 8\]"),
        (Budget.avg_bits(4.5), {"bitset": (2, 3, 4)}, r"\[2, 4\]"),
        (Budget.avg_bits(3.0), {"b_min": 6, "b_max": 5}, r"no allowed width .* lies within \[b_min=6, b_max=5\]"),
    ]:
        with pytest.raises(BudgetError, match=match):
            check_reachable(budget, **options)


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
