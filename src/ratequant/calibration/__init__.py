"""Calibration, the one home of the plan-making flow.

:mod:`~ratequant.calibration.settings` owns every calibration default and limit;
:mod:`~ratequant.calibration.pipeline` holds :func:`calibrate` and its stages, each callable alone (capture, sinks,
measure and fit, allocate, candidates, equal bytes for ``auto``, the KL search), which ``compare`` and the
benchmarks call instead of rebuilding the flow; :mod:`~ratequant.calibration.candidates` builds the candidate plans
and chooses among them on held-out text; :mod:`~ratequant.calibration.search` is the optional KL search.
"""

from ratequant.calibration.pipeline import (
    CalibrationRun,
    DesignCalibration,
    DesignFit,
    allocate_design,
    allocate_for,
    calibrate,
    calibrate_design,
    candidates_of,
    choose_sink_tokens,
    collect_statistics,
    cost_model_for,
    covered_widths,
    design_sink_tokens,
    equal_bytes_budget,
    fit_design,
    plan_of,
    refine_allocation,
    search_widths,
    search_windows,
)
from ratequant.calibration.search import best_start, kl_on, search_allocation
from ratequant.calibration.settings import (
    AUTO,
    AUTO_REFERENCE,
    CAPTURE_BATCH_SIZE,
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_SEQUENCES,
    DEFAULT_SEARCH_TOKENS,
    CalibrationSettings,
    check_search_text,
)
from ratequant.plan import bits_histogram

__all__ = [
    "AUTO",
    "AUTO_REFERENCE",
    "CAPTURE_BATCH_SIZE",
    "DEFAULT_CALIBRATION_SEQ_LEN",
    "DEFAULT_CALIBRATION_SEQUENCES",
    "DEFAULT_SEARCH_TOKENS",
    "CalibrationRun",
    "CalibrationSettings",
    "DesignCalibration",
    "DesignFit",
    "allocate_design",
    "allocate_for",
    "best_start",
    "bits_histogram",
    "calibrate",
    "calibrate_design",
    "candidates_of",
    "check_search_text",
    "choose_sink_tokens",
    "collect_statistics",
    "cost_model_for",
    "covered_widths",
    "design_sink_tokens",
    "equal_bytes_budget",
    "fit_design",
    "kl_on",
    "plan_of",
    "refine_allocation",
    "search_allocation",
    "search_widths",
    "search_windows",
]
