"""The packed KV cache: :class:`RateQuantCache` (a transformers cache of :class:`RateQuantLayer` objects).

:mod:`ratequant.cache.layer` holds the transformers-facing layer and cache classes; :mod:`ratequant.cache.storage`
the packed storage of one layer's keys or values; :mod:`ratequant.cache.attention` attention straight from the
packed codes (:func:`packed_attention`). The token rule and the byte formula they follow live in
:mod:`ratequant.spec`.
"""

from ratequant.cache.attention import packed_attention
from ratequant.cache.layer import RateQuantCache, RateQuantLayer

__all__ = ["RateQuantCache", "RateQuantLayer", "packed_attention"]
