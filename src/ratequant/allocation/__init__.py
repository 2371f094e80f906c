"""Bit allocation: budgets, the cost of widths in true bytes, exact solvers and grouping strategies.

The entry point is :func:`allocate`::

    curves = Curves.from_fit(fit)                       # or Curves.measured(table, bitset)
    options = AllocationOptions(cost_model=CostModel.from_policy(policy, geometry, 4096))
    allocation = allocate(curves, Budget.avg_bits(2.5), "ratequant", options)

One module per concept: :mod:`~ratequant.allocation.budget`, :mod:`~ratequant.allocation.cost`,
:mod:`~ratequant.allocation.curves`, :mod:`~ratequant.allocation.solvers` and
:mod:`~ratequant.allocation.strategies` (the registry of groupings: ``ratequant``, ``uniform``,
``kv-split``, ``layerwise``, ``layer-kind``). :data:`DEFAULT_CONTEXT_TOKENS` (from :mod:`ratequant.spec`) is the
context a cost model states bytes per token at by default, exported for benchmarks that build cost models by hand.
"""

from ratequant.allocation.budget import BUDGET_KINDS, Budget, check_reachable
from ratequant.allocation.cost import DEFAULT_WIDTHS, CostModel
from ratequant.allocation.curves import Curves
from ratequant.allocation.solvers import allocate_closed_form, allocate_integer, is_convex, solve_groups, solve_integer
from ratequant.allocation.strategies import (
    STRATEGIES,
    Allocation,
    AllocationOptions,
    Strategy,
    allocate,
    get_strategy,
)
from ratequant.spec import DEFAULT_CONTEXT_TOKENS

__all__ = [
    "BUDGET_KINDS",
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_WIDTHS",
    "STRATEGIES",
    "Allocation",
    "AllocationOptions",
    "Budget",
    "CostModel",
    "Curves",
    "Strategy",
    "allocate",
    "allocate_closed_form",
    "allocate_integer",
    "check_reachable",
    "get_strategy",
    "is_convex",
    "solve_groups",
    "solve_integer",
]
