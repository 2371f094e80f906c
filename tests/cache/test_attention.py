"""Attention straight from the packed codes (decode steps) and block by block (long passes) equals
decode-then-attend.

Tolerances: float32 models agree to 1e-4 in logits (measured: below 4e-5; the packed path sums in another
order); float16 and bfloat16 models to 3e-2, because the decode path rounds the decoded history to the model's
dtype before attention and the packed path computes in float32.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch

from ratequant.cache import RateQuantCache, attention, packed_attention, restore_attention
from ratequant.cache.attention import MAX_QUERY
from ratequant.compat import cache_argument, model_geometry
from ratequant.kernels import native
from ratequant.quantizers import available, get_quantizer
from ratequant.spec import KVQuantSpec
from tests.conftest import TINY, tiny_model, tiny_tokenizer

KIVI4 = get_quantizer("kivi", group_size=4)
QUAROT = get_quantizer("quarot")
PACKED = {"kivi": KIVI4, "quarot": QUAROT, "turbo": get_quantizer("turbo")}
"""A min-max design and the rotated ones (attending in the rotated space; turbo with its codebook as the kernel's
table of code values): the designs the fused call serves."""


def spec_for(model, quantizer, *, seed=0, low=1, residual=8, sinks=1):
    bits = np.random.default_rng(seed).integers(low, 9, size=model_geometry(model).shape)
    return KVQuantSpec(bits, quantizer, residual_length=residual, sink_tokens=sinks)


@torch.no_grad()
def decode_logits(model, spec, ids, mask=None, *, packed, prompt=24, step=1):
    """Prefill ``ids[:, :prompt]`` (one pass), then feed the rest ``step`` tokens at a time; the logits of the
    fed tokens. With ``packed`` the steps run inside :func:`packed_attention`; without it the cache decodes the
    history (``attention="decode"``)."""
    cache = RateQuantCache(spec, model=model, attention="decode")

    def run(lo, hi):
        kw = {} if mask is None else {"attention_mask": mask[:, :hi]}
        return model(ids[:, lo:hi], **kw, **cache_argument(model, cache), use_cache=True).logits

    run(0, prompt)
    context = packed_attention(model, cache) if packed else contextlib.nullcontext()
    with context:
        out = torch.cat([run(i, min(i + step, ids.shape[1])) for i in range(prompt, ids.shape[1], step)], dim=1)
    assert not any(layer.attend_packed for layer in cache.layers)  # the context switched it off again
    return out


def ids_for(batch=1, tokens=56, seed=0):
    return torch.randint(2, 300, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def assert_same(model, spec, ids, mask=None, tol=1e-4, *, served=False, **kw):
    """Packed attention equals the decode path, by the fused native call (which must then serve every step
    it is given) and, with that call switched off, by the step composed op by op. With ``served``, the steps
    must really have read the packed stores (not fallen back to the decode path)."""
    want = decode_logits(model, spec, ids, mask, packed=False, **kw)
    steps = []

    def composed_step_refused(*args):
        raise AssertionError("a step the fused native call should serve was composed op by op")

    def counted(real):
        def fn(*args, **kwargs):
            steps.append(1)
            return real(*args, **kwargs)

        return fn

    fused = (
        mock.patch.object(attention, "_attend_step", composed_step_refused),
        mock.patch.object(native, "attend_layer", counted(native.attend_layer)),
    )
    composed = (
        mock.patch.object(native, "attend_layer", lambda *args: None),
        mock.patch.object(attention, "_attend_step", counted(attention._attend_step)),
    )
    for patches in (fused, composed) if native.available() else ((),):
        steps.clear()
        with contextlib.ExitStack() as path:
            for patch in patches:
                path.enter_context(patch)
            got = decode_logits(model, spec, ids, mask, packed=True, **kw)
        assert (got - want).abs().max() <= tol, float((got - want).abs().max())
        assert steps or not (served and native.available()), "the steps took the decode path"


@pytest.mark.parametrize("design", available())
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_every_design_and_width_equals_the_decode_path(design, family):
    quantizer = KIVI4 if design == "kivi" else get_quantizer(design)
    model = tiny_model(family, seed=1)
    assert_same(model, spec_for(model, quantizer), ids_for())


@pytest.mark.parametrize("design", sorted(PACKED))
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_ratios(kv_heads, design):
    model = tiny_model("llama", seed=2, num_key_value_heads=kv_heads)
    assert_same(model, spec_for(model, PACKED[design], seed=2), ids_for(seed=2), served=True)


@pytest.mark.parametrize("design", ["quarot", "quarot-g8", "turbo"])
@pytest.mark.parametrize(("sinks", "residual"), [(0, 0), (1, 8), (3, 16), (4, 0)])
def test_rotated_design_with_sinks_and_residual_windows(sinks, residual, design):
    """quarot and turbo attend in the rotated space: the query rotated once, the full-precision sinks and tail
    rotated per step, the output rotated back; every width (low=1), with and without sinks and a residual window."""
    model = tiny_model("llama", seed=13)
    quantizer = {"quarot": QUAROT, "quarot-g8": get_quantizer("quarot", group_size=8), "turbo": PACKED["turbo"]}[design]
    spec = spec_for(model, quantizer, seed=13, residual=residual, sinks=sinks)
    assert_same(model, spec, ids_for(seed=13), served=True)
    assert_same(model, spec, ids_for(seed=14), step=3, served=True)  # several query tokens, a causal mask


def test_sliding_window_softcapping_and_several_query_tokens():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    gemma2 = AutoModelForCausalLM.from_config(
        tf.Gemma2Config(**{**TINY, "head_dim": 16, "sliding_window": 5, "attn_implementation": "eager"})
    ).eval()
    for model in (tiny_model("mistral", seed=3, sliding_window=5), gemma2):
        spec = spec_for(model, KIVI4, seed=3)
        assert_same(model, spec, ids_for(seed=3))
        assert_same(model, spec, ids_for(seed=4), step=4)  # pieces of 4 tokens: a causal mask among them


@pytest.mark.parametrize("design", ["uniform", "quarot"])
def test_left_padded_batch(design):
    model = tiny_model("llama", seed=5)
    ids = ids_for(batch=3, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :13] = 0, 0
    spec = spec_for(model, get_quantizer(design), seed=5, residual=0, sinks=0)
    assert_same(model, spec, ids, mask, served=True)


@pytest.mark.parametrize("design", sorted(PACKED))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_models(dtype, design):
    model = tiny_model("llama", seed=6).to(dtype)
    assert_same(model, spec_for(model, PACKED[design], seed=6, low=2), ids_for(seed=6), tol=3e-2, served=True)


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("design", ["kivi", "uniform", "quarot", "quarot-g8", "turbo", "turbo-f32"])
def test_kernel_scores_and_weighted_values_equal_decode_then_matmul(bits, design, kind):
    quantizer = {
        "kivi": KIVI4,
        "uniform": get_quantizer("uniform", group_size=8),
        "quarot": QUAROT,
        "quarot-g8": get_quantizer("quarot", group_size=8, clip_ratio=0.9),
        "turbo": get_quantizer("turbo", seed=3),
        "turbo-f32": get_quantizer("turbo", scale_dtype="float32"),
    }[design]
    check_kernel(quantizer, bits, kind, tokens=8)


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize(
    ("group", "tokens", "kind"),
    [(8, 24, "key"), (6, 6, "key"), (8, 24, "value"), (8, 7, "value")],
    ids=["keys-full-tiles", "keys-tile-tail", "values-full-tiles", "values-tile-tail"],
)
def test_folded_kernel_paths_equal_decode_then_matmul(bits, group, tokens, kind):
    """KIVI's layouts take the folded paths (scale and zero moved onto the query or the weights; rows in tiles
    of 4 tokens): whole tiles, and heads or metadata rows that end inside a tile."""
    check_kernel(get_quantizer("kivi", group_size=group), bits, kind, tokens=tokens)


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("group", "kind"), [(8, "key"), (32, "value"), (8, "value")])
def test_kernel_paths_for_rows_of_64_codes(bits, d, group, kind):
    """Head dims that are multiples of 64 read rows of up to 4 bits in a transposed order (the last rows of a
    buffer one code at a time); wider codes keep the plain order."""
    check_kernel(get_quantizer("kivi", group_size=group), bits, kind, tokens=24 if kind == "key" else 7, d=d)


def check_kernel(quantizer, bits: int, kind: str, tokens: int, d: int = 16) -> None:
    """The kernel's scores and weighted values against decode-then-matmul; a rotated design's kernel reads the
    decoded rows times its rotation ``R`` (``decoded @ R``, what it stores), and ``R`` is orthogonal."""
    chunks, batch, heads, rows = 3, 2, 2, 5
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(chunks * batch, heads, tokens, d, generator=gen)
    q = quantizer.quantize(x, bits, kind)
    prepared = quantizer.prepare_attend(q)
    assert prepared is not None
    decoded = quantizer.dequantize(q).view(chunks, batch, heads, tokens, d).permute(1, 2, 0, 3, 4)
    decoded = decoded.reshape(batch, heads, chunks * tokens, d)
    rotation = quantizer.attend_rotation(d)
    if rotation is not None:
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(d), rtol=0, atol=1e-6)
        decoded = decoded @ rotation
    queries = torch.randn(batch, heads, rows, d, generator=gen)
    scores = torch.empty(batch, heads, rows, chunks * tokens)
    assert prepared.attend(batch, queries, scores, weighted=False)
    # the folded paths round differently (s * (q . c) + z * sum(q)): float32 rounding of the summed magnitudes
    rounding = 16 * torch.finfo(torch.float32).eps * (queries.abs() @ decoded.abs().transpose(-1, -2))
    assert ((scores - queries @ decoded.transpose(-1, -2)).abs() <= rounding + 1e-6).all()
    weights = torch.softmax(scores, dim=-1)
    acc = torch.zeros(batch, heads, rows, d)
    assert prepared.attend(batch, weights, acc, weighted=True)
    torch.testing.assert_close(acc, weights @ decoded, rtol=1e-5, atol=1e-5)
    assert not prepared.attend(batch, queries.double(), scores, weighted=False)  # refused, not misread
    assert not prepared.attend(batch, queries, scores[..., :-1], weighted=False)


def layer_kind(kind: str, widths, *, group, batch, chunks, chunk, sinks, tail, d, dtype, gen):
    """Random sinks, bit groups (heads of one width together, in any order) and tail of one kind for
    :func:`native.attend_layer`, and the same tokens decoded, ``[B, H, n, D]`` float32."""
    quantizer = get_quantizer("kivi", group_size=group)
    heads = len(widths)
    sink = torch.randn(batch, heads, sinks, d, generator=gen).to(dtype)
    recent = torch.randn(batch, heads, tail, d, generator=gen).to(dtype)
    stored = torch.empty(batch, heads, chunks * chunk, d)
    groups = []
    for bits in sorted(set(widths)) if chunks else ():
        members = tuple(h for h, w in enumerate(widths) if w == bits)
        q = quantizer.quantize(torch.randn(chunks * batch, len(members), chunk, d, generator=gen), bits, kind)
        groups.append((quantizer.prepare_attend(q), members))
        decoded = quantizer.dequantize(q).view(chunks, batch, len(members), chunk, d).permute(1, 2, 0, 3, 4)
        stored[:, list(members)] = decoded.reshape(batch, len(members), chunks * chunk, d)
    return (sink, groups, recent), torch.cat([sink.float(), stored, recent.float()], dim=2)


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
@pytest.mark.parametrize("case", ["plain", "masked", "softcap", "no-chunks", "bfloat16-no-sinks", "odd-dim"])
def test_fused_layer_call_equals_its_definition(case):
    """One native call per layer: scores over sinks, bit groups and tail, soft-capping, the mask (a row that sees
    nothing gives zeros), softmax and the weighted values, against the same in PyTorch."""
    gen = torch.Generator().manual_seed(7)
    batch, tokens, per_head, d = 2, 3, 2, 12 if case == "odd-dim" else 16
    common = {
        "group": 4 if case == "odd-dim" else 8,  # head dims not a multiple of 8 take the scalar code
        "batch": batch,
        "chunks": 0 if case == "no-chunks" else 3,
        "chunk": 8,
        "sinks": 0 if "no-sinks" in case else 2,
        "tail": 5,
        "d": d,
        "dtype": torch.bfloat16 if case.startswith("bfloat16") else torch.float32,
        "gen": gen,
    }
    keys, k_full = layer_kind("key", (3, 2, 3), **common)  # heads 0 and 2 share a group
    values, v_full = layer_kind("value", (4, 4, 1), **common)
    rows = torch.randn(batch, 3, per_head * tokens, d, generator=gen) * d**-0.5
    n = k_full.shape[2]
    mask = None
    if case == "masked":
        mask = torch.rand(batch, tokens, n, generator=gen) > 0.3
        mask[1, 2] = False  # a query that sees nothing
    softcap = 2.0 if case == "softcap" else None
    logits = rows @ k_full.transpose(-1, -2)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits.view(batch, 3, per_head, tokens, n).masked_fill(~mask[:, None, None], float("-inf"))
    want = torch.softmax(logits, dim=-1).nan_to_num(0.0).view(batch, 3, -1, n) @ v_full
    got = native.attend_layer(rows, tokens, keys, values, mask, softcap)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert got.view(batch, 3, per_head, tokens, d)[1, :, :, 2].abs().max() == 0
    # arguments it cannot serve are refused, not misread
    assert native.attend_layer(rows.double(), tokens, keys, values, mask, softcap) is None
    assert native.attend_layer(rows, tokens + 1, keys, values, None, softcap) is None
    short = (values[0], values[1], values[2][:, :, 1:])
    assert native.attend_layer(rows, tokens, keys, short, mask, softcap) is None


def test_only_stores_the_kernel_serves_are_read_packed():
    model = tiny_model("llama", seed=9)
    ids = ids_for(tokens=30, seed=9)
    for design, served in (("kivi", native.available()), ("quarot", native.available()), ("turbo", native.available())):
        quantizer = KIVI4 if design == "kivi" else get_quantizer(design)
        cache = RateQuantCache(spec_for(model, quantizer, seed=9, low=2), model=model)
        with torch.no_grad():
            model(ids, **cache_argument(model, cache), use_cache=True)  # stores chunks
        assert all(store.reads_packed() == served for layer in cache.layers for store in layer._stores), design


@pytest.mark.parametrize("design", sorted(PACKED))
def test_generate_gives_the_same_tokens_with_either_attention(design):
    from ratequant.cache.generation import generate
    from ratequant.inputs.models import LoadedModel

    model = tiny_model("llama", seed=8)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", "memory", model_geometry(model))
    spec = spec_for(model, PACKED[design], seed=8, low=2)
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    decode = generate(loaded, prompt, spec, max_new_tokens=24, attention="decode")
    packed = generate(loaded, prompt, spec, max_new_tokens=24, attention="packed")
    assert packed.text == decode.text and packed.attention == "packed" and decode.attention == "decode"
    assert packed.cache_bytes == decode.cache_bytes


@pytest.mark.slow
def test_default_model_generates_the_same_64_tokens_after_a_1k_prompt(default_model):
    from ratequant.cache.generation import generate
    from ratequant.evaluation.protocol import encode_prefix
    from ratequant.inputs.corpora import load_corpus

    g = default_model.geometry
    bits = np.where(np.arange(g.num_components).reshape(g.shape) % 2, 3, 2)  # 2.5 bits on average
    spec = KVQuantSpec(bits, get_quantizer("kivi"), residual_length=128, sink_tokens=1)
    ids = encode_prefix(default_model.tokenizer, load_corpus().evaluation, 1024)[:1024]
    prompt = default_model.tokenizer.decode(ids)
    outs = [generate(default_model, prompt, spec, max_new_tokens=64, attention=a) for a in ("decode", "packed")]
    assert outs[0].new_tokens == outs[1].new_tokens == 64
    assert outs[0].text == outs[1].text


# -- long passes (prefill pieces) attend block by block --------------------------------------------------------


def _forbid_whole_history(monkeypatch):
    """Make decoding the whole stored history fail: long passes must read it one block at a time."""
    from ratequant.cache.storage import KindStore, PackedView

    def refuse(*args):
        raise AssertionError("the whole history was decoded")

    def read_nothing(store, out):  # the first pass (outside packed attention) finds nothing stored
        assert out.shape[2] == 0, "the whole history was decoded"

    monkeypatch.setattr(PackedView, "materialize", refuse)
    monkeypatch.setattr(KindStore, "read_stored", read_nothing)


def _count_block_passes(monkeypatch) -> list:
    calls = []
    real = attention.attention_in_blocks

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "attention_in_blocks", counted)
    return calls


@pytest.mark.parametrize("design", available())
@pytest.mark.parametrize("block", [4, 1024])  # several blocks per pass (rounded up to the chunks), or one
def test_long_passes_attend_in_blocks_as_the_decode_path(design, block, monkeypatch):
    quantizer = KIVI4 if design == "kivi" else get_quantizer(design)
    model = tiny_model("llama", seed=7)
    spec = spec_for(model, quantizer, seed=7)
    want = decode_logits(model, spec, ids_for(tokens=24 + 2 * 19, seed=7), packed=False, step=19)
    monkeypatch.setattr(attention, "BLOCK_TOKENS", block)
    calls = _count_block_passes(monkeypatch)
    _forbid_whole_history(monkeypatch)
    got = decode_logits(model, spec, ids_for(tokens=24 + 2 * 19, seed=7), packed=True, step=19)
    assert calls == [19] * 2 * model.config.num_hidden_layers
    assert (got - want).abs().max() <= 1e-4, float((got - want).abs().max())


@pytest.mark.parametrize(
    "case", ["gqa-1", "gqa-4", "sliding", "padded", "no-sinks", "three-sinks", "bfloat16", "qwen3", "gpt2"]
)
def test_long_passes_in_blocks_with_grouped_heads_windows_padding_sinks_and_dtypes(case, monkeypatch):
    overrides = {"gqa-1": {"num_key_value_heads": 1}, "gqa-4": {"num_key_value_heads": 4}}.get(case, {})
    family = {"sliding": "mistral", "qwen3": "qwen3", "gpt2": "gpt2"}.get(case, "llama")
    if case == "sliding":
        overrides = {"sliding_window": 5}
    model = tiny_model(family, seed=8, **overrides)
    if case == "bfloat16":
        model = model.to(torch.bfloat16)
    sinks = {"no-sinks": 0, "three-sinks": 3}.get(case, 1)
    spec = spec_for(model, KIVI4, seed=8, low=2, sinks=sinks)
    ids = ids_for(batch=3 if case == "padded" else 1, tokens=24 + 2 * 20, seed=8)
    mask = None
    if case == "padded":
        mask = torch.ones_like(ids)
        mask[1, :7], mask[2, :13] = 0, 0
    want = decode_logits(model, spec, ids, mask, packed=False, step=20)
    monkeypatch.setattr(attention, "BLOCK_TOKENS", 4)
    calls = _count_block_passes(monkeypatch)
    _forbid_whole_history(monkeypatch)
    got = decode_logits(model, spec, ids, mask, packed=True, step=20)
    assert calls, "no pass attended in blocks"
    tol = 3e-2 if case == "bfloat16" else 1e-4
    assert (got - want).abs().max() <= tol, float((got - want).abs().max())


def test_long_passes_with_soft_capping_keep_the_models_attention(monkeypatch):
    import transformers as tf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    gemma2 = AutoModelForCausalLM.from_config(
        tf.Gemma2Config(**{**TINY, "head_dim": 16, "sliding_window": 5, "attn_implementation": "eager"})
    ).eval()
    calls = _count_block_passes(monkeypatch)
    assert_same(gemma2, spec_for(gemma2, KIVI4, seed=3), ids_for(tokens=24 + 2 * 17, seed=3), step=17)
    assert not calls


def test_float64_models_keep_the_decode_path(monkeypatch):
    """The packed paths compute in float32; a float64 model (exact checks) must not lose its precision."""
    model = tiny_model("llama", seed=10).double()
    calls = _count_block_passes(monkeypatch)
    for step in (1, MAX_QUERY + 3):
        assert_same(
            model, spec_for(model, KIVI4, seed=10), ids_for(tokens=24 + 2 * step, seed=10), step=step, tol=1e-12
        )
    assert not calls


# -- a plain model.generate with a cache made for the model: the packed path without a context manager ------------


def _count_packed_calls(monkeypatch) -> dict:
    """Count the packed paths' entry points: a prompt's pass block by block, and each decode step's one native call
    per layer (or its composition op by op where the kernel is missing)."""
    calls = {"blocks": 0, "steps": 0}
    real_blocks, real_layer, real_step = attention.attention_in_blocks, native.attend_layer, attention._attend_step

    def counted(key, real):
        def fn(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        return fn

    monkeypatch.setattr(attention, "attention_in_blocks", counted("blocks", real_blocks))
    monkeypatch.setattr(native, "attend_layer", counted("steps", real_layer))
    monkeypatch.setattr(attention, "_attend_step", counted("steps", real_step))
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_plain_generate_with_a_cache_made_for_the_model_reads_the_packed_codes(family, monkeypatch):
    """``model.generate(..., cache=RateQuantCache(spec, model=model))`` with no context manager: the prompt's pass
    attends block by block (blocks of 4 tokens here: the diagonal bands of a causal pass without a mask), every
    decode step from the packed codes, and the tokens are those of the decode path and of packed_attention."""
    model = tiny_model(family, seed=11)
    spec = spec_for(model, KIVI4, seed=11, low=2)
    ids = ids_for(tokens=40, seed=11)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain_before = model(ids).logits
    want = model.generate(ids, **cache_argument(model, RateQuantCache(spec, model=model, attention="decode")), **kw)
    context_cache = RateQuantCache(spec)  # made without the model: decodes unless inside the context
    with packed_attention(model, context_cache):
        in_context = model.generate(ids, **cache_argument(model, context_cache), **kw)
    monkeypatch.setattr(attention, "BLOCK_TOKENS", 4)
    calls = _count_packed_calls(monkeypatch)
    cache = RateQuantCache(spec, model=model)
    got = model.generate(ids, **cache_argument(model, cache), **kw)
    layers = model.config.num_hidden_layers
    assert calls == {"blocks": layers, "steps": 19 * layers}  # one prompt pass, 19 decode steps
    assert torch.equal(got.sequences, want.sequences) and torch.equal(in_context.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert cache.nbytes() == context_cache.nbytes() and cache.layers[0].stored_lengths()[0] > 0
    # every other call of the model is exactly what it was, and restore_attention gives the name back
    assert model.config._attn_implementation == "ratequant_sdpa"
    assert torch.equal(model(ids).logits, plain_before)
    calls.update(blocks=0, steps=0)
    with torch.no_grad():
        from transformers import DynamicCache

        dynamic = model(ids, **cache_argument(model, DynamicCache(config=model.config)), use_cache=True).logits
    assert torch.equal(dynamic, plain_before) and calls == {"blocks": 0, "steps": 0}
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    restored = model.generate(ids, **cache_argument(model, RateQuantCache(spec, model=model, attention="decode")), **kw)
    assert torch.equal(restored.sequences, want.sequences) and calls == {"blocks": 0, "steps": 0}
    restore_attention(model)


def test_simulated_quantization_inside_a_routed_model_gets_decoded_keys():
    """An interception of the calling thread wins over the route: a routed cache then hands it real keys and
    values (the decode path), not packed handles it could not read."""
    from ratequant.cache.simulate import simulated_quantization

    model = tiny_model("llama", seed=12)
    spec = spec_for(model, KIVI4, seed=12, low=2)
    ids = ids_for(tokens=30, seed=12)
    with torch.no_grad():
        want = decode_logits(model, spec, ids, packed=False, prompt=20)
        with simulated_quantization(model, spec):  # quantizes the already quantized history once more
            got = decode_logits(model, spec, ids, packed=False, prompt=20)
            routed = RateQuantCache(spec, model=model)
            model(ids[:, :20], **cache_argument(model, routed), use_cache=True)
            assert not routed.layers[0]._hands_over(1)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert routed.layers[0]._hands_over(1) == native.available()  # outside the interception: packed again
    restore_attention(model)


@pytest.mark.parametrize("t", [1, 5, 17])
def test_blocks_of_a_causal_pass_without_a_mask_cover_exactly_the_causal_mask(t):
    """The bands :func:`attention_in_blocks` attends for a pass without a mask, put together, are the causal mask
    aligned to the end of the keys (what transformers means by no mask), block by block."""
    from ratequant.compat import boolean_attention_mask

    n = 23
    want = boolean_attention_mask(None, t, n)[0, 0]
    for lo, hi in ((0, 4), (4, 9), (9, 23), (20, 23), (0, 23)):
        got = torch.zeros(t, hi - lo, dtype=torch.bool)
        for r0, r1, seen in attention._bands(None, True, t, n, lo, hi, "cpu"):
            assert not got[r0:r1].any()  # bands do not overlap
            got[r0:r1] = True if seen is None else seen[0, 0]
            assert seen is None or (seen.shape[-1] == hi - lo and r1 - r0 <= hi - lo)  # masks only on the diagonal
        assert torch.equal(got, want[:, lo:hi]), (lo, hi)


def test_two_generates_in_two_threads_on_one_model_give_the_single_threaded_results():
    """Two ``rq.generate`` calls at once on one model, one through a quantized cache and one at full precision, in
    lock step through their prompts (each thread's prefill intercepts the model meanwhile): both equal their
    single-threaded results (before, one thread's interception ended the other's, or restored an unregistered
    name: KeyError)."""
    import threading

    from ratequant.cache.generation import generate
    from ratequant.inputs.models import LoadedModel

    model = tiny_model("llama", seed=8)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", "memory", model_geometry(model))
    spec = spec_for(model, KIVI4, seed=8, low=2)
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    kw = dict(max_new_tokens=12, prefill_chunk=8)
    want = [generate(loaded, prompt, spec, **kw).text, generate(loaded, prompt, None, **kw).text]
    lock_step, seen = threading.Barrier(2, timeout=60), {}

    def in_lock_step(module, args):  # the first forwards of both threads (prefill pieces) run side by side
        me = threading.get_ident()
        seen[me] = seen.get(me, 0) + 1
        if seen[me] <= 4:
            lock_step.wait()

    results, errors = [None, None], []

    def run(i, s):
        try:
            results[i] = generate(loaded, prompt, s, **kw).text
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
            lock_step.abort()

    hook = model.register_forward_pre_hook(in_lock_step)
    try:
        threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate((spec, None))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        hook.remove()
    if errors:
        raise errors[0]
    assert results == want
    assert model.config._attn_implementation == "ratequant_sdpa"  # routed by the packed cache: other calls exact
    restore_attention(model)
