"""The packed KV cache: :class:`RateQuantCache` (a transformers cache of :class:`RateQuantLayer` objects).

:mod:`ratequant.cache.layer` holds the transformers-facing layer and cache classes; :mod:`ratequant.cache.storage`
the packed storage of one layer's keys or values; :mod:`ratequant.cache.attention` attention straight from the
packed codes, which a cache made with ``model=`` routes that model to (:func:`restore_attention` undoes it;
:func:`packed_attention` does it for one ``with`` block); :mod:`ratequant.cache.prefill` a prompt fed a chunk at a
time (``ratequant.prefill``; :func:`piece_attention` is the attention its pieces run under, exported for benchmarks
that time the prefill paths). The token rule and the byte formula they follow live in :mod:`ratequant.spec`
(:data:`DEFAULT_RESIDUAL_LENGTH`, the default full-precision window, is exported here for benchmarks that build a
spec by hand).
"""

from ratequant.cache.attention import packed_attention, restore_attention
from ratequant.cache.layer import RateQuantCache, RateQuantLayer
from ratequant.cache.prefill import piece_attention
from ratequant.spec import DEFAULT_RESIDUAL_LENGTH

__all__ = [
    "DEFAULT_RESIDUAL_LENGTH",
    "RateQuantCache",
    "RateQuantLayer",
    "packed_attention",
    "piece_attention",
    "restore_attention",
]
