"""Attention interception: route every attention layer's core attention through a user function, per thread or
for good.

Written against transformers 5.x, whose decoder attention modules compute ``query``, ``key`` and ``value``
(after RoPE and the cache update, before ``repeat_kv``) and then call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``.

How interception works, and what holds with threads. For each implementation a model runs (``sdpa``,
``eager``, ...) one dispatcher ``ratequant_<implementation>`` is registered, once and for good, in transformers'
attention registry and, with that implementation's own mask builder, in the mask registry. While a model is
intercepted or routed its config(s) name the dispatcher; a count per config restores the previous names exactly
when the last context or route ends (also when the body raises). The dispatcher decides per call: the
innermost :func:`intercept_attention` context *of the calling thread* (a :class:`contextvars.ContextVar`)
covering the module, else the model's :func:`route_attention` function, else the implementation itself with
the same arguments. Hence:

* an interception is scoped to the thread (or asyncio task) that entered it, never to the model: another
  thread's forward of the same model meanwhile gets exactly the result of the model's own implementation (the
  mask is built by the same function, the same attention function runs on it), and threads started inside a
  context do not inherit it;
* any number of threads may enter and leave contexts on one model in any order; each sees only its own, and
  the names come back when the last one ends (no name is ever unregistered under a running forward);
* contexts nest within a thread (the inner one wins), and several models may be intercepted at once;
* a model's config reads ``ratequant_sdpa`` (say) instead of ``sdpa`` while intercepted or routed: code that
  compares ``config._attn_implementation`` with a name sees the difference, results do not.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ratequant.compat.inspection import _text_config, attention_modules, check_supported
from ratequant.errors import UnsupportedModelError

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""``fn(module, query [B,Hq,T,D], key [B,Hkv,S,D], value [B,Hkv,S,D], attention_mask, *, scaling, dropout,
**kwargs) -> (attn_output [B,T,Hq,D], attn_weights or None)``."""

_DISPATCH_PREFIX = "ratequant_"
_BASES: dict[str, str] = {}
"""Dispatcher names registered in transformers' two registries -> the implementation each stands in for."""


@dataclass(frozen=True, eq=False)
class _Interception:
    modules: frozenset[int]  # id() of the attention modules covered (alive: the context holds the model)
    attention_fn: AttentionFn


@dataclass(eq=False)
class _Hold:
    config: weakref.ref
    saved: str | None  # the implementation name the config had before the first hold
    count: int


_INTERCEPTIONS: ContextVar[tuple[_Interception, ...]] = ContextVar("ratequant_interceptions", default=())
"""The interceptions the current thread (or asyncio task) has entered, innermost last."""
_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> its route (all threads)
_ROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the configs its route holds
_HOLDS: dict[int, _Hold] = {}  # id(config) -> how many interceptions and routes hold it on its dispatcher
_LOCK = threading.RLock()


def _registries():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


def _model_configs(model: nn.Module) -> list:
    """Every distinct config object reachable from the model (shared text configs appear once)."""
    seen: dict[int, object] = {}
    stack = [getattr(model, "config", None)]
    stack += [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            stack.append(getattr(config, key, None))
    return list(seen.values())


def _eager_function(module: nn.Module) -> Callable:
    """The model file's own ``eager_attention_forward`` (Gemma2's carries soft-capping, GPT-2's its scaling)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__}: its modeling file defines no eager_attention_forward; load the model with "
            "attn_implementation='sdpa'"
        )
    return fn


def _resolve(module: nn.Module, implementation: str | None) -> Callable:
    all_attention, _, _, _ = _registries()
    if implementation is None or implementation == "eager":
        return _eager_function(module)
    return all_attention.get_interface(implementation, _eager_function(module))


def _base(config) -> str:
    """The implementation a config runs, seen through a dispatcher standing in for it (None means eager)."""
    name = config._attn_implementation_internal
    return _BASES.get(name, name) or "eager"


def _mask_function(base: str) -> Callable | None:
    """The attention-mask builder transformers uses for implementation ``base`` (None: it builds no mask)."""
    all_attention, _, _, mask_interface = _registries()
    if base != "eager" and base not in all_attention:
        return None
    return mask_interface._global_mapping.get(base)


def _check_implementation(base: str) -> None:
    all_attention, _, _, _ = _registries()
    if base != "eager" and base not in all_attention:
        raise UnsupportedModelError(
            f"attention implementation {base!r} is not registered in transformers' AttentionInterface; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    # The mask must be built exactly as for the original implementation: transformers skips mask creation
    # for names it does not know, which would silently drop padding masks.
    if _mask_function(base) is None:
        raise UnsupportedModelError(
            f"attention implementation {base!r} has no mask function in transformers' AttentionMaskInterface; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )


def _switchable_configs(model: nn.Module) -> list:
    """The configs of ``model`` to point at dispatchers: every one whose implementation has a mask function
    (the decoder's must, else :class:`UnsupportedModelError`)."""
    check_supported(model)
    _check_implementation(_base(_text_config(model)))
    return [config for config in _model_configs(model) if _mask_function(_base(config)) is not None]


def _dispatch_name(base: str) -> str:
    """The dispatcher standing in for implementation ``base``, registered once and for good in transformers'
    attention and mask registries (never removed: a thread may have read the name just before a restore)."""
    name = _DISPATCH_PREFIX + base
    with _LOCK:
        if name not in _BASES:
            _, attention_interface, _, mask_interface = _registries()
            attention_interface.register(name, _dispatcher(base))
            mask_interface.register(name, _mask_function(base))
            _BASES[name] = base
    return name


def _hold(configs: list) -> None:
    """Point each config at the dispatcher of its implementation (the first hold saves the name it had)."""
    with _LOCK:
        for config in configs:
            key = id(config)
            hold = _HOLDS.get(key)
            if hold is not None:
                hold.count += 1
                continue
            ref = weakref.ref(config, lambda _, key=key: _HOLDS.pop(key, None))
            _HOLDS[key] = _Hold(ref, config._attn_implementation_internal, 1)
            config._attn_implementation_internal = _dispatch_name(_base(config))


def _release(configs: list) -> None:
    """Undo one :func:`_hold`: the last one restores each config's name (unless someone has changed it since)."""
    with _LOCK:
        for config in configs:
            hold = _HOLDS.get(id(config))
            if hold is None or hold.config() is not config:
                continue
            hold.count -= 1
            if hold.count == 0:
                del _HOLDS[id(config)]
                if config._attn_implementation_internal in _BASES:
                    config._attn_implementation_internal = hold.saved


def _selected(module: nn.Module) -> AttentionFn | None:
    for entry in reversed(_INTERCEPTIONS.get()):
        if id(module) in entry.modules:
            return entry.attention_fn
    return _ROUTES.get(module)


def current_attention(module: nn.Module) -> AttentionFn | None:
    """The function the core attention of ``module`` runs now in the calling thread: that of the innermost
    :func:`intercept_attention` covering it, else its model's :func:`route_attention`; None when the model's own
    implementation runs (:func:`original_attention`)."""
    if getattr(getattr(module, "config", None), "_attn_implementation_internal", None) not in _BASES:
        return None
    return _selected(module)


def original_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the attention implementation the model was configured with (sdpa, eager, ...).

    Inside :func:`intercept_attention` this is the implementation in force before the context; the mask
    the attention function received is already in that implementation's format, so calling this with
    unchanged arguments reproduces the unpatched model bit for bit. Returns ``(attn_output [B, T, Hq, D],
    attn_weights or None)``.
    """
    return _resolve(module, _original_name(module))(module, query, key, value, attention_mask, **kwargs)


def _original_name(module: nn.Module) -> str:
    """The attention implementation ``module`` runs outside any interception or route."""
    return _base(module.config)


def attention_is_causal(module: nn.Module, kwargs: dict) -> bool:
    """Whether an attention call is causal: its ``is_causal`` argument, else the module's (default True)."""
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`original_attention`, except where the model runs transformers' ``sdpa`` with grouped-query
    attention on the CPU for more than one query token: there keys and values ``[B, Hkv, S, D]`` go to SDPA
    once per kv head (``enable_gqa``) instead of being repeated to ``[B, Hq, S, D]``, which transformers does
    whenever a mask is given. For a prefill piece over a long history those two copies are the largest
    tensors of the step. The result equals the original's to float rounding (tested); everything else
    (position bias, soft-capping, dropout, other implementations, decode steps) goes to the original."""
    groups = getattr(module, "num_key_value_groups", 1)
    unsupported = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))
    if (
        groups <= 1
        or unsupported
        or kwargs.get("dropout")
        or query.shape[2] == 1
        or query.device.type != "cpu"
        or _original_name(module) != "sdpa"
    ):
        return original_attention(module, query, key, value, attention_mask, **kwargs)
    is_causal = attention_mask is None and attention_is_causal(module, kwargs)
    if is_causal and key.shape[2] > query.shape[2]:  # transformers' rule for a causal pass without a mask
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"), is_causal=is_causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _dispatcher(base: str) -> Callable:
    """The attention function registered for a dispatcher name: the calling thread's interception or the
    model's route where there is one, else implementation ``base`` itself, called with the same arguments."""

    def dispatch(module, query, key, value, attention_mask, **kwargs):
        fn = _selected(module) or _resolve(module, base)
        return fn(module, query, key, value, attention_mask, **kwargs)

    dispatch.__name__ = f"ratequant_dispatch_{base}"
    return dispatch


@contextmanager
def intercept_attention(model: nn.Module, attention_fn: AttentionFn) -> Iterator[nn.Module]:
    """Route the core attention of every layer of ``model`` through ``attention_fn`` inside the context, for
    the calling thread only.

    ``attention_fn(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs)`` receives
    ``query`` ``[B, Hq, T, D]`` and ``key``/``value`` ``[B, Hkv, S, D]`` exactly as the cache stores them
    (after RoPE, before ``repeat_kv``; S includes cached tokens), ``module.layer_idx`` names the layer,
    and ``attention_mask`` is in the format of the model's original implementation (see
    :func:`boolean_attention_mask`). It returns ``(attn_output [B, T, Hq, D], attn_weights or None)``;
    :func:`original_attention` computes the unmodified result.

    The context points the model's config(s) at a dispatcher (see the module docstring) and records the
    interception in a context variable of the calling thread; the last context or route of the model to end
    restores the implementation names exactly, also when the body raises. Contexts may nest (the inner one
    wins), several models may be intercepted at once, and other threads' forwards of the same model run
    unintercepted meanwhile.
    """
    configs = _switchable_configs(model)
    entry = _Interception(frozenset(id(m) for m in attention_modules(model)), attention_fn)
    _hold(configs)
    _INTERCEPTIONS.set((*_INTERCEPTIONS.get(), entry))
    try:
        yield model
    finally:
        _INTERCEPTIONS.set(tuple(e for e in _INTERCEPTIONS.get() if e is not entry))  # exits in any order
        _release(configs)


def route_attention(model: nn.Module, attention_fn: AttentionFn) -> list[nn.Module]:
    """Until :func:`unroute_attention`, send every attention call of ``model`` that no interception covers to
    ``attention_fn`` (same signature as for :func:`intercept_attention`), in every thread. The function decides
    per call and runs :func:`original_attention` for calls it leaves alone, so the model's results stay those
    of its own implementation for them. Routing a routed model again replaces its function. Returns the
    attention modules, ordered by ``layer_idx``."""
    configs = _switchable_configs(model)
    modules = attention_modules(model)
    with _LOCK:
        if model not in _ROUTED:
            _hold(configs)
            _ROUTED[model] = configs
        for module in modules:
            _ROUTES[module] = attention_fn
    return modules


def unroute_attention(model: nn.Module) -> None:
    """Undo :func:`route_attention` (nothing when ``model`` is not routed): the model's own implementation
    names come back once no interception of it is active either."""
    with _LOCK:
        configs = _ROUTED.pop(model, None)
        if configs is None:
            return
        for module in attention_modules(model):
            _ROUTES.pop(module, None)
        _release(configs)


def boolean_attention_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    *,
    device: torch.device | str = "cpu",
    is_causal: bool = True,
) -> torch.Tensor:
    """The mask an attention function received, as booleans ``[B or 1, 1, q_len, kv_len]`` (True = attend).

    ``None`` means what transformers' sdpa path means by it: causal attention aligned to the end of the
    keys (query ``i`` sees keys ``j <= kv_len - q_len + i``), or full attention when ``is_causal`` is
    False. Boolean masks are returned as they are, additive float masks are thresholded.
    """
    if attention_mask is None:
        if not is_causal:
            return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        q = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        k = torch.arange(kv_len, device=device)[None, :]
        return (k <= q)[None, None]
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
    else:
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return mask[..., -q_len:, -kv_len:] if mask.dim() == 4 else mask


__all__ = [
    "AttentionFn",
    "attention_is_causal",
    "boolean_attention_mask",
    "current_attention",
    "grouped_attention",
    "intercept_attention",
    "original_attention",
    "route_attention",
    "unroute_attention",
]
