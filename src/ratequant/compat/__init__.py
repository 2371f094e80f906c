"""Every workaround for transformers versions lives here, and only here.

Three modules, every name re-exported here:

1. :mod:`~ratequant.compat.inspection`, model inspection: :func:`check_supported`, :func:`model_geometry`,
   :func:`attention_modules`, :func:`sliding_window_layers`.
2. :mod:`~ratequant.compat.attention`, attention interception: :func:`intercept_attention` (a context manager
   routing every attention layer's core attention through a user function, for the calling thread),
   :func:`route_attention` (a lasting default for every thread, what a :class:`~ratequant.cache.RateQuantCache`
   made for a model installs) and :func:`original_attention` (the model's own implementation), plus
   :func:`boolean_attention_mask` to read the mask an attention function receives.
3. :mod:`~ratequant.compat.caches`: :func:`cache_base_classes` (the layered Cache API) and
   :func:`cache_argument` (the keyword a model takes its cache by).

Written against transformers 5.x; how interception works, and what holds with threads, is in
:mod:`~ratequant.compat.attention`.
"""

from ratequant.compat.attention import (
    AttentionFn,
    attention_is_causal,
    boolean_attention_mask,
    current_attention,
    grouped_attention,
    intercept_attention,
    original_attention,
    route_attention,
    unroute_attention,
)
from ratequant.compat.caches import cache_argument, cache_base_classes, logits_to_keep_argument
from ratequant.compat.inspection import (
    SUPPORTED_LAYER_TYPES,
    attention_modules,
    check_supported,
    kv_projections,
    max_positions,
    model_geometry,
    sliding_window_layers,
)

__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "AttentionFn",
    "attention_is_causal",
    "attention_modules",
    "boolean_attention_mask",
    "cache_argument",
    "cache_base_classes",
    "check_supported",
    "current_attention",
    "grouped_attention",
    "intercept_attention",
    "kv_projections",
    "logits_to_keep_argument",
    "max_positions",
    "model_geometry",
    "original_attention",
    "route_attention",
    "sliding_window_layers",
    "unroute_attention",
]
