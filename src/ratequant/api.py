"""The public API in one place: every name ``import ratequant as rq; rq.NAME`` gives (see ``__init__``)."""

# ruff: noqa: F401  (the names are imported to be handed on)
from __future__ import annotations

from ratequant import _API
from ratequant.allocation import STRATEGIES, Allocation, AllocationOptions, Budget, CostModel, Curves, allocate
from ratequant.allocation.fitting import DistortionFit, fit_distortion
from ratequant.cache import RateQuantCache
from ratequant.cache.generation import generate
from ratequant.cache.prefill import prefill
from ratequant.cache.simulate import simulated_quantization
from ratequant.calibration import CalibrationSettings, calibrate
from ratequant.errors import PlanError, RateQuantError
from ratequant.evaluation import TASKS, WindowProtocol, make_windows, perplexity, score_conditions
from ratequant.geometry import Geometry
from ratequant.inputs.corpora import Corpus, load_corpus
from ratequant.inputs.models import LoadedModel, load_model
from ratequant.lab import CompareConfig, run_compare
from ratequant.measure.capture import capture
from ratequant.measure.distortion import METRICS, measure_distortion
from ratequant.plan import Plan
from ratequant.quantizers import DESIGNS, get_quantizer
from ratequant.spec import KVQuantSpec, StoragePolicy

__all__ = list(_API)
