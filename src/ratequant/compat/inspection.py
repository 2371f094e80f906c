"""Model inspection across transformers versions: which models are supported, their KV geometry, their attention
modules, sliding-window layers and key/value projections."""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn

from ratequant.compat.placement import module_weight
from ratequant.errors import UnsupportedModelError
from ratequant.geometry import Geometry

SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
"""``config.layer_types`` entries whose layers run standard softmax attention over a full K/V cache."""

# Config attributes that mark attention this tool cannot quantize per kv-head.
_UNSUPPORTED_CONFIG_ATTRS = {
    "kv_lora_rank": "multi-head latent attention (MLA) caches a compressed latent, not per-head keys/values",
    "q_lora_rank": "multi-head latent attention (MLA) caches a compressed latent, not per-head keys/values",
    "linear_num_value_heads": "linear attention layers keep a recurrent state, not a key/value cache",
    "linear_num_key_heads": "linear attention layers keep a recurrent state, not a key/value cache",
    "ssm_state_size": "state-space (Mamba-style) layers keep a recurrent state, not a key/value cache",
    "state_size": "state-space layers keep a recurrent state, not a key/value cache",
    "layers_block_type": "hybrid models mix attention with recurrent blocks",
    "attn_layer_indices": "hybrid models mix attention with recurrent blocks",
}


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `config`; pass a Hugging Face transformers model "
            "(e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@cache
def _uses_attention_interface(cls: type) -> bool:
    """True when the module class dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model``, ordered by ``layer_idx`` (one per layer).

    A module counts when it has an integer ``layer_idx`` and its class dispatches through transformers'
    attention interface. Raises :class:`UnsupportedModelError` when there are none.
    """
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and not isinstance(m.layer_idx, bool)
        and type(m).__name__.endswith("Attention")
        and _uses_attention_interface(type(m))
    ]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no attention layers that use transformers' attention interface "
            "(modules with `layer_idx` calling ALL_ATTENTION_FUNCTIONS); only standard softmax-attention "
            "decoders (Llama, Qwen2/3, Mistral, Gemma, GPT-2, ...) are supported"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless every layer of ``model`` runs standard attention.

    Standard means: one self-attention module per layer, dispatched through transformers' attention
    interface, caching per-head keys and values of equal head dimension. Rejected: MLA (DeepSeek-V2/V3),
    linear attention and state-space layers (Qwen3-Next, Mamba, hybrids), encoder-decoder models,
    cross-attention, and GPT-2's ``reorder_and_upcast_attn`` path.
    """
    config = _text_config(model)
    name = getattr(config, "model_type", type(model).__name__)
    for attr, why in _UNSUPPORTED_CONFIG_ATTRS.items():
        if getattr(config, attr, None) is not None:
            raise UnsupportedModelError(
                f"model type {name!r} is not supported: {why} (config has `{attr}`); "
                "use a model with standard multi-head or grouped-query attention"
            )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if other:
            raise UnsupportedModelError(
                f"model type {name!r} is not supported: it has layers of type {', '.join(other)}; only "
                f"{' and '.join(sorted(SUPPORTED_LAYER_TYPES))} layers can be quantized"
            )
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"model type {name!r} is not supported: encoder-decoder / cross-attention models are out of "
            "scope; use a decoder-only causal language model"
        )
    if getattr(config, "reorder_and_upcast_attn", False):
        raise UnsupportedModelError(
            f"model type {name!r} with reorder_and_upcast_attn=True bypasses the attention interface; "
            "load it with reorder_and_upcast_attn=False"
        )
    modules = attention_modules(model)
    indices = [m.layer_idx for m in modules]
    num_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    expected = list(range(num_layers if num_layers is not None else len(modules)))
    if indices != expected:
        raise UnsupportedModelError(
            f"model type {name!r} is not supported: expected one attention layer per decoder layer with "
            f"layer_idx 0..{len(expected) - 1}, found layer indices {indices[:8]}{'...' if len(indices) > 8 else ''}"
        )
    for attr in ("v_head_dim", "qk_rope_head_dim", "qk_nope_head_dim"):
        if getattr(config, attr, None) is not None:
            raise UnsupportedModelError(
                f"model type {name!r} is not supported: keys and values have different head dimensions "
                f"(config has `{attr}`)"
            )


def model_geometry(model: nn.Module) -> Geometry:
    """The KV geometry of ``model``: layers, kv heads, head dim and query heads.

    Reads the config with every naming in use (``num_hidden_layers``/``n_layer``, ``num_attention_heads``/
    ``n_head``, ``num_key_value_heads`` / ``multi_query``, ``head_dim`` / ``hidden_size // heads``) and
    cross-checks it against the attention modules' own ``head_dim`` when they expose one.
    """
    check_supported(model)
    config = _text_config(model)
    modules = attention_modules(model)
    num_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers") or len(modules)
    num_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if num_heads is None:
        raise UnsupportedModelError("config names no number of attention heads (num_attention_heads / n_head)")
    num_kv_heads = _config_int(config, "num_key_value_heads", "n_kv_heads", "num_kv_heads")
    if num_kv_heads is None:
        num_kv_heads = 1 if getattr(config, "multi_query", False) else num_heads
    head_dim = _config_int(config, "head_dim")
    if head_dim is None:
        hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
        if hidden is None or hidden % num_heads:
            raise UnsupportedModelError(
                f"cannot infer head_dim: config has no head_dim and hidden_size={hidden} is not a multiple "
                f"of num_heads={num_heads}"
            )
        head_dim = hidden // num_heads
    module_dims = {m.head_dim for m in modules if isinstance(getattr(m, "head_dim", None), int)}
    if module_dims and module_dims != {head_dim}:
        raise UnsupportedModelError(
            f"head_dim from the config ({head_dim}) disagrees with the attention modules ({sorted(module_dims)})"
        )
    groups = {getattr(m, "num_key_value_groups", None) for m in modules} - {None}
    if groups and groups != {num_heads // num_kv_heads}:
        raise UnsupportedModelError(
            f"kv-head grouping from the config ({num_heads}/{num_kv_heads}) disagrees with the attention "
            f"modules (num_key_value_groups={sorted(groups)})"
        )
    return Geometry(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_heads=num_heads)


def kv_projections(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the key and value projection weights ``(W_K, W_V)``, each ``[num_kv_heads * head_dim, hidden]``
    (rows of kv head ``h``: ``h * head_dim .. (h + 1) * head_dim``): ``k_proj``/``v_proj`` (Llama, Qwen, Mistral,
    Gemma) or the key and value thirds of GPT-2's fused ``c_attn``."""
    out = []
    for m in attention_modules(model):
        if hasattr(m, "k_proj") and hasattr(m, "v_proj"):
            out.append((module_weight(m.k_proj), module_weight(m.v_proj)))
        elif hasattr(m, "c_attn") and getattr(m, "split_size", None):
            w = module_weight(m.c_attn).T  # GPT-2's Conv1D stores [hidden, 3 * hidden]
            _, k, v = w.split(m.split_size, dim=0)
            out.append((k, v))
        else:
            raise UnsupportedModelError(
                f"{type(m).__name__} exposes no key/value projection ratequant knows (k_proj/v_proj or c_attn)"
            )
    return out


def max_positions(model: nn.Module) -> int | None:
    """The longest context the model's position embeddings cover (``max_position_embeddings`` / ``n_positions``),
    or None when the config names none."""
    return _config_int(_text_config(model), "max_position_embeddings", "n_positions", "n_ctx")


def sliding_window_layers(model: nn.Module) -> list[bool]:
    """Per layer, whether its attention uses a sliding window (Mistral with ``sliding_window``, Gemma2/3)."""
    config = _text_config(model)
    modules = attention_modules(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) == len(modules):
        return [t == "sliding_attention" for t in layer_types]
    out = []
    for m in modules:
        if hasattr(m, "sliding_window"):
            out.append(m.sliding_window is not None)
        else:
            window = getattr(config, "sliding_window", None)
            use = getattr(config, "use_sliding_window", True)
            out.append(bool(window) and bool(use))
    return out


__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "attention_modules",
    "check_supported",
    "kv_projections",
    "max_positions",
    "model_geometry",
    "sliding_window_layers",
]
