"""Experiments: ``ratequant compare``, the source papers' comparisons on any model and corpus.

:mod:`~ratequant.experiments.config` (what to run), :mod:`~ratequant.experiments.methods` (every way of spending
a budget, as typed records), :mod:`~ratequant.experiments.run` (:func:`run_compare`),
:mod:`~ratequant.experiments.results` (typed results, ``results.json``). :mod:`ratequant.report` writes the report.
"""

from ratequant.experiments.config import DEFAULT_BUDGETS, DEFAULT_DESIGNS, QUICK_SIZES, CompareConfig, budget_text
from ratequant.experiments.results import CompareResults, DesignResult, MethodResult
from ratequant.experiments.run import run_compare

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_DESIGNS",
    "QUICK_SIZES",
    "CompareConfig",
    "CompareResults",
    "DesignResult",
    "MethodResult",
    "budget_text",
    "run_compare",
]
