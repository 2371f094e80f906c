"""The transformers shim: interception is exact, always undone, and covers the common decoder families."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3NextConfig,
)

from ratequant.compat import (
    boolean_attention_mask,
    check_supported,
    intercept_attention,
    model_geometry,
    original_attention,
    sliding_window_layers,
)
from ratequant.errors import UnsupportedModelError
from ratequant.geometry import Geometry
from tests.conftest import tiny_model

COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    intermediate_size=96,
    vocab_size=97,
)


def _configs() -> dict[str, PretrainedConfig]:
    configs = {
        "llama": LlamaConfig(**COMMON),
        "qwen2": Qwen2Config(**COMMON),
        "qwen3": Qwen3Config(**COMMON, head_dim=24),
        "mistral": MistralConfig(**COMMON, sliding_window=4),
        "gemma": GemmaConfig(**COMMON, head_dim=16),
        "gpt2": GPT2Config(n_embd=64, n_head=4, n_layer=3, vocab_size=97, bos_token_id=0, eos_token_id=0),
    }
    try:
        from transformers import Gemma2Config, Gemma3TextConfig

        configs["gemma2"] = Gemma2Config(**COMMON, head_dim=16, sliding_window=4)
        configs["gemma3"] = Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4)
    except ImportError:  # older transformers
        pass
    return configs


CONFIGS = _configs()
# (family, implementation) pairs; Gemma2 only supports eager attention.
CASES = [(f, impl) for f in CONFIGS for impl in ("sdpa", "eager") if not (f == "gemma2" and impl == "sdpa")]
EXPECTED_GEOMETRY = {
    "llama": Geometry(3, 2, 16, 4),
    "qwen2": Geometry(3, 2, 16, 4),
    "qwen3": Geometry(3, 2, 24, 4),
    "mistral": Geometry(3, 2, 16, 4),
    "gemma": Geometry(3, 2, 16, 4),
    "gemma2": Geometry(3, 2, 16, 4),
    "gemma3": Geometry(3, 2, 16, 4),
    "gpt2": Geometry(3, 4, 16, 4),
}


def _model(family: str, impl: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family], attn_implementation=impl).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def _attn_state(model: nn.Module) -> list:
    return [getattr(m.config, "_attn_implementation_internal", None) for m in model.modules() if hasattr(m, "config")]


@pytest.mark.parametrize("family,impl", CASES)
def test_pass_through_is_bit_exact_and_sees_cache_shapes(family, impl):
    model = _model(family, impl)
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    before = _attn_state(model)
    geometry = model_geometry(model)
    calls = []

    def fn(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        assert "scaling" in kwargs
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    with torch.no_grad(), intercept_attention(model, fn):
        assert model.config._attn_implementation != impl  # really switched
        patched = model(ids, attention_mask=mask).logits
    assert torch.equal(patched, reference)
    g = geometry
    assert calls == [
        (layer, (2, g.num_heads, 9, g.head_dim), (2, g.num_kv_heads, 9, g.head_dim), (2, g.num_kv_heads, 9, g.head_dim))
        for layer in range(g.num_layers)
    ]
    assert _attn_state(model) == before
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("family", list(CONFIGS))
def test_geometry_and_sliding_windows(family):
    model = _model(family, "eager")
    assert model_geometry(model) == EXPECTED_GEOMETRY[family]
    if family in ("gemma2", "gemma3"):  # per-layer pattern from the config (Gemma2 alternates)
        expected = [t == "sliding_attention" for t in CONFIGS[family].layer_types]
        assert True in expected
    else:
        expected = [family == "mistral"] * 3
    assert sliding_window_layers(model) == expected


def test_modifying_attention_changes_output_and_state_is_restored_after_error():
    model = _model("llama", "sdpa")
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits

    def zero_layer1_values(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 1:
            value = torch.zeros_like(value)
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    with torch.no_grad(), intercept_attention(model, zero_layer1_values):
        changed = model(ids, attention_mask=mask).logits
    assert (changed - reference).abs().max() > 1e-4

    before = _attn_state(model)
    with pytest.raises(RuntimeError, match="boom"), intercept_attention(model, zero_layer1_values):
        raise RuntimeError("boom")
    with pytest.raises(ZeroDivisionError), intercept_attention(model, lambda *a, **k: 1 / 0):
        model(ids)
    assert _attn_state(model) == before
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # one dispatcher per implementation stays registered (no name is removed under a running forward); contexts
    # add no names of their own
    ours = {k for k in ALL_ATTENTION_FUNCTIONS if k.startswith("ratequant")}
    assert ours == {k for k in ALL_MASK_ATTENTION_FUNCTIONS if k.startswith("ratequant")}
    assert ours <= {"ratequant_sdpa", "ratequant_eager"}
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)


def test_nested_interception_inner_wins_and_original_is_the_model_implementation():
    model = _model("llama", "eager")
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    seen = []

    def outer(module, *args, **kwargs):
        seen.append("outer")
        return original_attention(module, *args, **kwargs)

    def inner(module, *args, **kwargs):
        seen.append("inner")
        return original_attention(module, *args, **kwargs)

    with torch.no_grad(), intercept_attention(model, outer):
        with intercept_attention(model, inner):
            out = model(ids, attention_mask=mask).logits
        assert seen == ["inner"] * 3
        out2 = model(ids, attention_mask=mask).logits
    assert seen == ["inner"] * 3 + ["outer"] * 3
    assert torch.equal(out, reference) and torch.equal(out2, reference)
    assert model.config._attn_implementation == "eager"


def test_generation_with_cache_is_unchanged_and_keys_include_the_cache():
    model = _model("llama", "sdpa")
    ids = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    lengths = []

    def fn(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            lengths.append((query.shape[2], key.shape[2]))
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    with intercept_attention(model, fn):
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, reference)
    assert lengths == [(5, 5), (1, 6), (1, 7), (1, 8)]


def test_boolean_attention_mask_formats_agree():
    from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask

    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    as_bool = sdpa_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=pad, allow_is_causal_skip=False)
    as_float = eager_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=pad, mask_function=causal_mask_function)
    assert torch.equal(boolean_attention_mask(as_bool, 5, 5), as_bool)
    assert torch.equal(boolean_attention_mask(as_float, 5, 5), as_bool)
    causal = boolean_attention_mask(None, 5, 5)
    assert torch.equal(causal[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(as_bool[0:1], causal)
    # a decoding step: the one query sees every key; a chunk of 2 queries over 4 keys is end-aligned
    assert boolean_attention_mask(None, 1, 7).all()
    assert boolean_attention_mask(None, 2, 4)[0, 0].tolist() == [[True, True, True, False], [True] * 4]
    assert boolean_attention_mask(None, 3, 3, is_causal=False).all()


UNSUPPORTED = {
    "mla": lambda: DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        vocab_size=97,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    "linear": lambda: Qwen3NextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=96,
        vocab_size=97,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
    "mamba": lambda: MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=97, state_size=8),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_models_raise_clear_errors(kind):
    model = AutoModelForCausalLM.from_config(UNSUPPORTED[kind]())
    with pytest.raises(UnsupportedModelError, match="not supported"):
        check_supported(model)
    with pytest.raises(UnsupportedModelError), intercept_attention(model, original_attention):
        pass  # pragma: no cover - the context must refuse to open


def test_models_without_attention_interface_or_with_odd_layer_types_are_rejected():
    class Plain(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="no attention layers"):
        check_supported(Plain(PretrainedConfig()))
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        check_supported(Plain(PretrainedConfig(layer_types=["full_attention", "linear_attention"])))
    with pytest.raises(UnsupportedModelError, match="no `config`"):
        check_supported(nn.Linear(2, 2))


def test_cache_argument_uses_the_keyword_the_model_declares():
    from ratequant.compat import cache_argument

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return cache

    marker = object()
    assert cache_argument(Old(), marker) == {"past_key_values": marker}
    assert New()(None, **cache_argument(New(), marker)) is marker
    for family in CONFIGS:  # every family's forward takes its cache by the keyword chosen
        model = _model(family, "eager")
        (name,) = cache_argument(model, marker)
        assert name in inspect.signature(type(model).forward).parameters, family


@pytest.mark.parametrize("mask_kind", ["none", "causal-offset", "padding"])
def test_grouped_attention_equals_the_models_sdpa(mask_kind):
    from ratequant.compat import attention_modules, grouped_attention, original_attention

    model = tiny_model("llama", seed=3)
    module = attention_modules(model)[0]
    g = torch.Generator().manual_seed(0)
    b, hq, hk, t, s, d = 2, 4, 2, 5, 12 if mask_kind != "none" else 5, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, t), (hk, s), (hk, s)))
    mask = None
    if mask_kind != "none":
        mask = (torch.arange(s)[None, :] <= torch.arange(t)[:, None] + s - t)[None, None].repeat(b, 1, 1, 1)
        if mask_kind == "padding":
            mask[0, ..., :3] = False
    got, _ = grouped_attention(module, q, k, v, mask, scaling=d**-0.5)
    want, _ = original_attention(module, q, k, v, mask, scaling=d**-0.5)
    assert got.shape == (b, t, hq, d)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# -- two threads, one model: an interception belongs to the thread that entered it ------------------------------


def _in_two_threads(first, second) -> list:
    """Run ``first()`` and ``second()`` in two threads at once; their results (an error in either is raised)."""
    results, errors = [None, None], []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_a_plain_forward_in_another_thread_is_exact_while_one_thread_quantizes():
    import numpy as np

    from ratequant.cache.simulate import simulated_quantization
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    model = tiny_model("llama", seed=3)
    spec = KVQuantSpec(np.full(model_geometry(model).shape, 2), get_quantizer("kivi", group_size=4), 4)
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids).logits
        with simulated_quantization(model, spec):
            quantized = model(ids).logits
    assert (plain - quantized).abs().max() > 1e-3
    both_inside = threading.Barrier(2, timeout=60)

    def quantizing():
        with torch.no_grad(), simulated_quantization(model, spec):
            both_inside.wait()  # the context is open before the other thread's forwards ...
            out = [model(ids).logits for _ in range(3)]
            both_inside.wait()  # ... and stays open until they are done
        return out

    def full_precision():
        both_inside.wait()
        with torch.no_grad():
            out = [model(ids).logits for _ in range(3)]
        both_inside.wait()
        return out

    got_quantized, got_plain = _in_two_threads(quantizing, full_precision)
    assert all(torch.equal(x, plain) for x in got_plain)
    assert all(torch.equal(x, quantized) for x in got_quantized)
    assert model.config._attn_implementation == "sdpa"


def test_interceptions_of_two_threads_end_in_any_order():
    """Thread A opens, thread B opens, A closes, B runs and closes: B keeps its own interception to the end, and the
    model has its own implementation back afterwards (before, B restored a name A had already unregistered)."""
    model = _model("llama", "sdpa")
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    before = _attn_state(model)
    calls = {"a": 0, "b": 0}
    step = threading.Barrier(2, timeout=60)

    def counting(name):
        def fn(module, *args, **kwargs):
            calls[name] += 1
            return original_attention(module, *args, **kwargs)

        return fn

    def first():
        with intercept_attention(model, counting("a")):
            step.wait()  # both contexts open
        step.wait()  # A closed before B's forward

    def second():
        with intercept_attention(model, counting("b")):
            step.wait()
            step.wait()
            with torch.no_grad():
                return model(ids, attention_mask=mask).logits

    _, out = _in_two_threads(first, second)
    assert torch.equal(out, reference)
    assert calls == {"a": 0, "b": 3}
    assert _attn_state(model) == before and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)


def test_a_routed_model_keeps_other_calls_exact_and_is_restored():
    """route_attention (what a RateQuantCache made for the model installs) sends calls to its function in every
    thread, but an interception of the calling thread wins; unroute_attention gives the names back."""
    from ratequant.compat import current_attention, route_attention, unroute_attention

    model = _model("qwen2", "eager")
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    routed, inner = [], []

    def route(module, *args, **kwargs):
        routed.append(module.layer_idx)
        return original_attention(module, *args, **kwargs)

    def intercept(module, *args, **kwargs):
        inner.append(module.layer_idx)
        return original_attention(module, *args, **kwargs)

    modules = route_attention(model, route)
    assert [m.layer_idx for m in modules] == [0, 1, 2] and model.config._attn_implementation == "ratequant_eager"
    assert current_attention(modules[0]) is route
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)
        with intercept_attention(model, intercept):
            assert current_attention(modules[0]) is intercept
            assert torch.equal(model(ids, attention_mask=mask).logits, reference)
            other, _ = _in_two_threads(lambda: current_attention(modules[0]), lambda: None)
    assert other is route and routed == [0, 1, 2] and inner == [0, 1, 2]
    unroute_attention(model)
    unroute_attention(model)  # twice: nothing more to undo
    assert model.config._attn_implementation == "eager" and current_attention(modules[0]) is None
