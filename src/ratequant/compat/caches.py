"""The layered Cache API that :mod:`ratequant.cache` builds on, and the keywords a model takes its cache and
``logits_to_keep`` by."""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn


def cache_base_classes() -> tuple[type, type]:
    """``(Cache, CacheLayerMixin)`` from ``transformers.cache_utils``.

    transformers 5.x builds every cache from per-layer objects (``Cache(layers=[CacheLayerMixin, ...])``);
    :class:`ratequant.cache.RateQuantLayer` is such a layer. Releases without the layered API are refused.
    """
    try:
        from transformers.cache_utils import Cache, CacheLayerMixin
    except ImportError:
        from ratequant.errors import RateQuantError

        raise RateQuantError(
            "this transformers release has no layered cache API (transformers.cache_utils.CacheLayerMixin); "
            "install transformers>=5.0"
        ) from None
    return Cache, CacheLayerMixin


def cache_argument(model: nn.Module, cache) -> dict:
    """``{keyword: cache}`` for passing a cache to ``model(...)`` or ``model.generate(...)``.

    transformers 5.24 renamed the argument ``past_key_values`` to ``cache`` (the old name warns and goes
    away in a later release); this picks the name the model's ``forward`` declares.
    """
    return {_cache_keyword(type(model)): cache}


@cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def logits_to_keep_argument(model: nn.Module, keep: int) -> dict:
    """``{"logits_to_keep": keep}`` where the model's ``forward`` takes it (the head then projects only the last
    ``keep`` positions), else ``{}`` (the caller slices the logits)."""
    return {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}


@cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


__all__ = ["cache_argument", "cache_base_classes", "logits_to_keep_argument"]
