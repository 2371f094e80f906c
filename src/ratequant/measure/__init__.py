"""Measuring the model: capture of keys, values and attention on calibration text, the distortion of every
design at every width, and the rank, weight-norm and headroom studies built on them.

The distortion names are exported here: :data:`METRICS` and :data:`DEFAULT_METRIC` (the metric calibration uses),
:func:`measure_distortion` (one table) and :func:`measure_distortions` (several metrics in one pass), and
:func:`spearman` (the rank correlation the metric study reports, exported for the benchmark that validates the
default metric), with :data:`KINDS` (from :mod:`ratequant.geometry`: ``("key", "value")``, the order of every
``[2, layers, heads]`` array). Capture is :func:`ratequant.capture` (this package does not re-export it: the name
would hide the submodule :mod:`ratequant.measure.capture`).
"""

from ratequant.geometry import KINDS
from ratequant.measure.distortion import DEFAULT_METRIC, METRICS, measure_distortion, measure_distortions, spearman

__all__ = [
    "DEFAULT_METRIC",
    "KINDS",
    "METRICS",
    "measure_distortion",
    "measure_distortions",
    "spearman",
]
