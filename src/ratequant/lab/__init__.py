"""The lab: ``ratequant compare``, the source papers' comparisons on any model and corpus, and their reports.

:mod:`~ratequant.lab.config` (what to run), :mod:`~ratequant.lab.methods` (every way of spending
a budget, as typed records), :mod:`~ratequant.lab.run` (:func:`run_compare`),
:mod:`~ratequant.lab.results` (typed results, ``results.json``). :mod:`ratequant.lab.report` writes the report. The
library's core never imports this package.
"""

from ratequant.lab.config import DEFAULT_BUDGETS, DEFAULT_DESIGNS, QUICK_SIZES, CompareConfig, budget_text
from ratequant.lab.results import CompareResults, DesignResult, MethodResult
from ratequant.lab.run import run_compare

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
