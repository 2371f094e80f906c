"""The packed KV cache: :class:`RateQuantCache` (a transformers cache of :class:`RateQuantLayer` objects).

:mod:`ratequant.cache.layer` holds the transformers-facing layer and cache classes; :mod:`ratequant.cache.storage`
the packed storage of one layer's keys or values; :mod:`ratequant.cache.attention` attention straight from the
packed codes, which a cache made with ``model=`` routes that model to (:func:`restore_attention` undoes it;
:func:`packed_attention` does it for one ``with`` block). The token rule and the byte formula they follow live in
:mod:`ratequant.spec`.
"""

from ratequant.cache.attention import packed_attention, restore_attention
from ratequant.cache.layer import RateQuantCache, RateQuantLayer

__all__ = ["RateQuantCache", "RateQuantLayer", "packed_attention", "restore_attention"]
