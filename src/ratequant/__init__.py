"""ratequant: mixed-precision KV-cache quantization chosen by rate-distortion theory.

The public API, in the order of the pipeline::

    import ratequant as rq

    loaded = rq.load_model()                       # the embedded SmolLM2-135M, a directory, a .gguf or a hub id
    corpus = rq.load_corpus()                      # the embedded pydoc corpus, a text file, "fortunes", ...
    run = rq.calibrate(loaded, corpus, rq.CalibrationSettings(quantizer="kivi", budget=rq.Budget.avg_bits(2.5)))
    spec = run.plan.resolve(loaded.model)          # a KVQuantSpec: widths, design, residual window, sinks
    cache = rq.RateQuantCache(spec, model=loaded.model)

The names live in :mod:`ratequant.api` and are imported on first use, so ``import ratequant`` stays light.
"""

from __future__ import annotations

__version__ = "0.2.0"

_API = (
    "Allocation",
    "AllocationOptions",
    "Budget",
    "CalibrationSettings",
    "CompareConfig",
    "Corpus",
    "CostModel",
    "Curves",
    "DESIGNS",
    "DistortionFit",
    "Geometry",
    "KVQuantSpec",
    "LoadedModel",
    "METRICS",
    "Plan",
    "PlanError",
    "RateQuantCache",
    "RateQuantError",
    "STRATEGIES",
    "StoragePolicy",
    "TASKS",
    "WindowProtocol",
    "allocate",
    "calibrate",
    "capture",
    "fit_distortion",
    "generate",
    "get_quantizer",
    "load_corpus",
    "load_model",
    "make_windows",
    "measure_distortion",
    "perplexity",
    "prefill",
    "run_compare",
    "score_conditions",
    "simulated_quantization",
)
"""The public names; :mod:`ratequant.api` imports each from its module."""
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:  # submodules ("api", "cache", ...) are found by the import system, not here
        raise AttributeError(f"module 'ratequant' has no attribute {name!r}")
    from ratequant import api

    return getattr(api, name)


def __dir__() -> list[str]:
    return list(__all__)
