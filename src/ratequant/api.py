"""The public API in one place: every name ``import ratequant as rq; rq.NAME`` gives (see ``__init__``)."""

# ruff: noqa: F401  (the names are imported to be handed on)
from __future__ import annotations

from ratequant import _API
from ratequant.allocation import STRATEGIES, Allocation, AllocationOptions, Budget, CostModel, Curves, allocate
from ratequant.cache import RateQuantCache
from ratequant.calibration import capture
from ratequant.data import Corpus, load_corpus
from ratequant.distortion import METRICS, measure_distortion
from ratequant.errors import PlanError, RateQuantError
from ratequant.evaluation import TASKS, WindowProtocol, make_windows, perplexity, score_conditions
from ratequant.experiments import CompareConfig, run_compare
from ratequant.fitting import DistortionFit, fit_distortion
from ratequant.generation import generate
from ratequant.geometry import Geometry
from ratequant.models import LoadedModel, load_model
from ratequant.pipeline import CalibrationSettings, calibrate
from ratequant.plan import Plan
from ratequant.quantizers import DESIGNS, get_quantizer
from ratequant.simulate import simulated_quantization
from ratequant.spec import KVQuantSpec, StoragePolicy

__all__ = list(_API)
