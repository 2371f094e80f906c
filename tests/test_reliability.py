"""Edge cases of tensors, models and budgets, each with its stated expectation.

Tensors (quantizers, the cache and the simulation):

* NaN or Inf in keys or values: never quantized into finite numbers. The quantizers refuse them
  (``tests/quantizers/test_conformance.py::test_errors_are_clear``); the cache raises in the update that
  delivers them and stays unchanged; the simulation raises in the forward pass whose quantized prefix
  holds them, and restores the model.
* All-equal groups (constant tokens, constant channels, all zeros): no division by zero, finite output.
  ``uniform`` and ``kivi`` (min-max in the original basis) reconstruct float16-representable constants
  exactly; ``quarot`` within 1% (float16 metadata rounding of the rotated token); ``turbo`` within its
  codebook's RMS distortion (a constant token is, after the random rotation, a generic vector).
* head_dim not a power of two (17, 24, 40, 48, 80, 96, 100): ``uniform``, ``quarot`` (block Hadamard),
  ``turbo`` work with errors like those at 64; ``kivi`` works when its value group divides head_dim and
  otherwise refuses with a message that names head_dim and the fix; a head_dim-40 model generates through
  the cache at 8 bits exactly as at full precision and streams as it simulates.
* float16, bfloat16 and float32 models: cache generation at 8 bits gives the full-precision tokens, the
  cache keeps the model's dtype and its exact byte formula, and streaming equals simulated evaluation
  (logits and perplexity) to within the dtype's own rounding noise.
* Batches with left padding (token-grouped KIVI keys): the cache generates what the simulation does, and
  the unpadded row is unaffected by its neighbour. (Per-token designs: ``tests/cache/test_cache.py``.)
* Sequences shorter than one group: nothing is quantized, the logits are bit-identical to full precision
  and the cache holds only its residual buffers. Longer than the residual window: every whole chunk is
  stored, at the exact chunk boundaries.

Models: unsupported attention is refused by ``load_model`` and the CLI with a clear message; sliding-window
layers (Gemma2 alternating, Qwen2 with ``max_window_layers``) are applied by the mask over the full
history the cache keeps: the result equals the windowed model, not the unwindowed one.

Budgets: every allocator refuses an unreachable budget naming the reachable range.

Fuzzing: the packer's ``unpack`` on arbitrary bytes never yields an out-of-range code and round-trips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, DynamicCache

from ratequant.allocation import STRATEGIES, AllocationOptions, Budget, CostModel, Curves, allocate, check_reachable
from ratequant.allocation.fitting import fit_distortion
from ratequant.cache import RateQuantCache, RateQuantLayer
from ratequant.cache.simulate import simulated_quantization
from ratequant.compat import model_geometry
from ratequant.errors import BudgetError, RateQuantError, UnsupportedModelError
from ratequant.geometry import Geometry
from ratequant.kernels.packing import pack, packed_size, unpack
from ratequant.quantizers import available, get_quantizer
from ratequant.quantizers.turbo import lloyd_max_gaussian
from ratequant.spec import KVQuantSpec, StoragePolicy
from tests.conftest import TINY, tiny_model, tiny_tokenizer

KIVI4 = get_quantizer("kivi", group_size=4)
UNIFORM = get_quantizer("uniform")
TINY_GEOMETRY = Geometry(3, 2, 16, 4)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mixed_bits(model, low=1, high=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=model_geometry(model).shape)


def ids_of(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def streamed(model, ids, cache) -> torch.Tensor:
    """Logits ``[B, T, V]`` of feeding ``ids`` one token at a time through ``cache``."""
    return torch.cat(
        [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(ids.shape[1])], 1
    )


@torch.no_grad()
def simulated(model, ids, bits, quantizer, residual) -> torch.Tensor:
    with simulated_quantization(model, KVQuantSpec(bits, quantizer, residual)):
        return model(ids).logits


def generate(model, ids, cache, n=10, **kw):
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


# --------------------------------------------------------------------------------------------------------
# NaN and Inf
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_cache_refuses_non_finite_values_in_the_update_that_delivers_them(special, kind):
    layer = RateQuantLayer([3, 3], [2, 2], StoragePolicy(KIVI4, 8))
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    (k if kind == "key" else v)[0, 1, 2, 7] = special
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(k, v)  # refused at once, although these tokens would only wait in the residual window
    assert layer.get_seq_length() == 0  # the refused tokens are not counted


def test_cache_refuses_non_finite_values_at_once_and_stays_usable():
    layer = RateQuantLayer([2, 3], [2, 3], StoragePolicy(UNIFORM, 4))
    layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    before = layer.read()
    bad = torch.randn(1, 2, 1, 16)
    bad[0, 1, 0, 0] = float("inf")
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(torch.randn(1, 2, 1, 16), bad)  # would complete the chunk of value head 1 only
    assert layer.get_seq_length() == 3
    after = layer.read()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        layer.update(bad, torch.randn(1, 2, 1, 16))  # inside the residual window too
    assert layer.get_seq_length() == 3


def poisoned(model, layer: int = 1):
    """``model`` whose layer ``layer`` computes NaN keys for kv-head 0 (a NaN weight row)."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.k_proj.weight[0, 0] = float("nan")
    return model


def test_simulation_refuses_non_finite_keys_and_restores_the_model():
    model = tiny_model("llama")
    clean = tiny_model("llama")
    ids = ids_of(12)
    bits = np.full(model_geometry(model).shape, 4)
    poisoned(model)
    with pytest.raises(RateQuantError, match="NaN or Inf"), torch.no_grad():
        with simulated_quantization(model, KVQuantSpec(bits, UNIFORM, 4)):
            model(ids)
    with torch.no_grad():  # the model's own result (whatever its attention makes of the NaN): attention restored
        untouched = poisoned(tiny_model("llama"))(ids).logits
        torch.testing.assert_close(model(ids).logits, untouched, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(simulated(clean, ids[:, :3], bits, UNIFORM, 4), clean(ids[:, :3]).logits)


def test_cache_generation_with_non_finite_keys_is_refused():
    model = poisoned(tiny_model("llama"))
    with pytest.raises(RateQuantError, match="NaN or Inf"):
        generate(model, ids_of(6), RateQuantCache(KVQuantSpec(np.full(model_geometry(model).shape, 4), UNIFORM, 4)))


# --------------------------------------------------------------------------------------------------------
# all-equal groups
# --------------------------------------------------------------------------------------------------------
CONSTANTS = (0.0, 1.5, -3.25, 7.0, 1024.0, 0.1)


@pytest.mark.parametrize("name", sorted(available()))
def test_all_equal_groups(name):
    design = get_quantizer(name)
    for bits in range(1, 9):
        for c in CONSTANTS:
            x = torch.full((2, 2, 8, 64), c)
            for kind in ("key", "value"):
                y = design.fake_quantize(x, bits, kind)
                assert torch.isfinite(y).all()
                if c == 0.0:
                    assert torch.equal(y, x)
                    continue
                rel = float((y - x).norm(dim=-1).max() / x.norm(dim=-1).max())
                if name in ("uniform", "kivi"):
                    exact = c == float(torch.tensor(c, dtype=torch.float16))
                    assert torch.equal(y, x) if exact else rel <= 2**-11, (bits, c, kind, rel)
                elif name == "quarot":
                    assert rel <= 1e-2, (bits, c, kind, rel)
                else:
                    assert rel <= 1.05 * math.sqrt(lloyd_max_gaussian(bits).distortion) + 1e-3, (bits, c, rel)


def test_constant_key_channels_are_exact_with_kivi():
    """KIVI keys: each channel constant over its token group (values differ across channels): range 0."""
    channel = torch.linspace(-4, 4, 16).half().float()  # float16-representable
    x = channel.expand(1, 3, 12, 16).clone()
    for bits in range(1, 9):
        assert torch.equal(KIVI4.fake_quantize(x, bits, "key"), x)


@pytest.mark.parametrize("name", sorted(available()))
def test_cache_of_all_zero_keys_and_values_is_exact(name):
    design = get_quantizer(name)
    layer = RateQuantLayer([1, 8], [2, 3], StoragePolicy(design, 0))
    zeros = torch.zeros(2, 2, 64, 32)
    k, v = layer.update(zeros, zeros)
    assert layer.stored_lengths()[0] > 0 and torch.equal(k, zeros) and torch.equal(v, zeros)
    assert torch.equal(layer.read()[0], zeros)


# --------------------------------------------------------------------------------------------------------
# head_dim not a power of two
# --------------------------------------------------------------------------------------------------------
def relative_rmse(design, x, bits=4, kind="value") -> float:
    return float((design.fake_quantize(x, bits, kind) - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())


@pytest.mark.parametrize("head_dim", [17, 24, 40, 48, 80, 96, 100])
def test_designs_on_head_dims_that_are_not_powers_of_two(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    x = torch.randn(1, 2, 64, head_dim, generator=gen)
    x64 = torch.randn(1, 2, 64, 64, generator=gen)
    for name in ("uniform", "quarot", "turbo"):
        design = get_quantizer(name)
        err, ref = relative_rmse(design, x), relative_rmse(design, x64)
        assert err <= 1.5 * ref, (name, head_dim, err, ref)  # 4 bits: about 0.1 relative error at any head_dim
    kivi = get_quantizer("kivi")
    if head_dim % min(32, head_dim) == 0:
        assert relative_rmse(kivi, x) <= 1.5 * relative_rmse(kivi, x64)
    else:
        with pytest.raises(RateQuantError, match=f"head_dim {head_dim} is not divisible by group_size 32; choose"):
            kivi.fake_quantize(x, 4, "value")
        fitting = get_quantizer("kivi", group_size=math.gcd(head_dim, 32))
        assert relative_rmse(fitting, x) <= 1.5 * relative_rmse(kivi, x64)


def test_model_with_head_dim_40_through_cache_and_simulation():
    model = tiny_model("llama", head_dim=40)
    assert model_geometry(model).head_dim == 40
    ids = ids_of(14)
    eight = np.full(model_geometry(model).shape, 8)
    quarot = get_quantizer("quarot")
    assert torch.equal(
        generate(model, ids, RateQuantCache(KVQuantSpec(eight, quarot, 4))),
        generate(model, ids, DynamicCache(config=model.config)),
    )
    bits = mixed_bits(model)
    for design in (quarot, get_quantizer("turbo"), get_quantizer("kivi", group_size=8)):
        stream = streamed(model, ids, RateQuantCache(KVQuantSpec(bits, design, 8)))
        assert (stream - simulated(model, ids, bits, design, 8)).abs().max() < 1e-4
    with pytest.raises(RateQuantError, match="head_dim 40 is not divisible"):  # kivi's default value group
        generate(model, ids, RateQuantCache(KVQuantSpec(bits, get_quantizer("kivi"), 32)), n=40)


# --------------------------------------------------------------------------------------------------------
# float16, bfloat16, float32 models
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float32_logits():
    with torch.no_grad():
        return tiny_model("llama", seed=1)(ids_of(40)).logits


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_models_in_every_dtype_stream_as_they_simulate(dtype, float32_logits):
    model = tiny_model("llama", seed=1).to(dtype)
    ids, bits = ids_of(40), mixed_bits(model, seed=1)
    with torch.no_grad():
        full = model(ids).logits.float()
    noise = float((full - float32_logits).abs().max())  # the dtype's own rounding noise at full precision
    cache = RateQuantCache(KVQuantSpec(bits, KIVI4, 8))
    stream = streamed(model, ids, cache).float()
    sim = simulated(model, ids, bits, KIVI4, 8).float()
    gap = float((stream - sim).abs().max())
    # In float32 the two paths agree to rounding. In 16-bit dtypes the keys a token-by-token forward computes
    # differ from the whole-sequence ones by the dtype's rounding, which can move a value across a code
    # boundary; the gap then stays within a few times that noise (and far below the quantization effect).
    allowed = 2 * noise + 1e-5 if dtype == torch.float32 else 10 * noise
    assert stream.dtype == torch.float32 and gap <= allowed, (gap, noise)
    assert float((sim - full).abs().max()) > 10 * gap  # the quantization effect is far above the disagreement
    k, v = cache.layers[0].read()
    assert k.dtype == v.dtype == dtype and cache.layers[0]._stores[0].residual.dtype == dtype
    want = KVQuantSpec(bits, KIVI4, 8).expected_bytes(16, 40, dtype=dtype)
    got = cache.nbytes()
    assert got.residual == want.residual and got.codes == want.codes
    assert abs(got.metadata - want.metadata) <= 0.01 * want.metadata


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_models_in_every_dtype_generate_and_evaluate(dtype):
    from ratequant.evaluation import Simulated, Streaming, WindowProtocol, Windows, score_conditions
    from ratequant.plan import Plan

    model = tiny_model("llama", seed=2).to(dtype)
    g = model_geometry(model)
    ids = ids_of(8, seed=2)
    eight = np.full(g.shape, 8)
    assert torch.equal(
        generate(model, ids, RateQuantCache(KVQuantSpec(eight, KIVI4, 4)), n=12),
        generate(model, ids, DynamicCache(config=model.config), n=12),
    )
    bits = mixed_bits(model, seed=2)
    plan = Plan(
        model={"name": "tiny", **g.to_dict()},
        quantizer=KIVI4.to_config(),
        budget={"kind": "avg_bits", "value": float(bits.mean())},
        allocator="test",
        avg_bits=float(bits.mean()),
        bits={"key": bits[0].tolist(), "value": bits[1].tolist()},
        residual_length=8,
    )
    windows = Windows(ids_of(24, batch=2, seed=3), WindowProtocol(24, 2), None)
    spec = plan.resolve(model)
    scores = score_conditions(model, windows, {"sim": Simulated(spec), "stream": Streaming(spec)}, progress=False)[
        "all"
    ]
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert scores["stream"].ppl == pytest.approx(scores["sim"].ppl, rel=tolerance)
    assert math.isfinite(scores["sim"].ppl) and scores["sim"].tokens == scores["stream"].tokens == 2 * 23


# --------------------------------------------------------------------------------------------------------
# left padding, short and long sequences
# --------------------------------------------------------------------------------------------------------
def test_left_padded_batch_with_token_grouped_keys():
    model = tiny_model("llama", seed=4)
    bits = mixed_bits(model, 2, 5, seed=6)
    ids = ids_of(7, batch=2, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0
    kw = dict(attention_mask=mask, pad_token_id=1)
    # residual 8 > prompt 7: the prefill sees only full-precision keys, as in token-by-token decoding
    cache = RateQuantCache(KVQuantSpec(bits, KIVI4, 8))
    out = generate(model, ids, cache, n=14, **kw)
    with simulated_quantization(model, KVQuantSpec(bits, KIVI4, 8)):
        ref = generate(model, ids, DynamicCache(config=model.config), n=14, **kw)
    alone = generate(model, ids[1:], RateQuantCache(KVQuantSpec(bits, KIVI4, 8)), n=14)
    assert torch.equal(out, ref)
    assert torch.equal(out[1], alone[0])  # key groups are per row: the neighbour's padding does not leak
    assert cache.layers[0].stored_lengths() == (16, 16) and torch.isfinite(cache.layers[0].read()[0]).all()


@pytest.mark.parametrize("length", [1, 3, 31])
def test_sequence_shorter_than_one_group_stays_full_precision(length):
    model = tiny_model("qwen2", seed=5)
    g = model_geometry(model)
    kivi = get_quantizer("kivi")  # groups of 32 tokens, residual window 128
    bits = mixed_bits(model, seed=5)
    ids = ids_of(length, seed=5)
    cache = RateQuantCache(KVQuantSpec(bits, kivi, 128))
    with torch.no_grad():
        got = model(ids, past_key_values=cache, use_cache=True).logits
        want = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    assert torch.equal(got, want)
    assert torch.equal(simulated(model, ids, bits, kivi, 128), want)
    nb = cache.nbytes()
    assert cache.layers[0].stored_lengths() == (0, 0) and nb.codes == nb.metadata == 0
    assert nb.residual == KVQuantSpec(bits, kivi).expected_bytes(g.head_dim, length, dtype=torch.float32).residual
    # residual 0: values (per token) are stored at once, keys wait for a whole group of 32
    short = RateQuantCache(KVQuantSpec(bits, kivi, 0))
    with torch.no_grad():
        model(ids, past_key_values=short, use_cache=True)
    assert short.layers[0].stored_lengths() == (0, length)


@pytest.mark.parametrize("length", [7, 8, 9, 15, 16, 17, 41])
def test_sequence_longer_than_the_residual_window_stores_whole_chunks(length):
    layer = RateQuantLayer([2, 5], [3, 1], StoragePolicy(KIVI4, 8))
    gen = torch.Generator().manual_seed(length)
    keys, values = torch.randn(1, 2, length, 16, generator=gen), torch.randn(1, 2, length, 16, generator=gen)
    for i in range(length):
        layer.update(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    stored = (length // 8) * 8
    assert layer.stored_lengths() == (stored, stored) and layer.get_seq_length() == length
    k, v = layer.read()
    assert torch.equal(k[:, :, stored:], keys[:, :, stored:]) and torch.equal(v[:, :, stored:], values[:, :, stored:])
    if stored:
        assert not torch.equal(k[:, :, :stored], keys[:, :, :stored])
        assert (k[:, :, :stored] - keys[:, :, :stored]).abs().max() < 1.5  # 2 and 5 bits over 4-token groups


# --------------------------------------------------------------------------------------------------------
# models: unsupported attention, sliding windows
# --------------------------------------------------------------------------------------------------------
def test_unsupported_attention_is_refused_by_load_model_and_the_cli(tmp_path, capsys):
    from transformers import MambaConfig

    from ratequant.cli import main
    from ratequant.inputs.models import load_model

    path = tmp_path / "mamba"
    AutoModelForCausalLM.from_config(
        MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300, state_size=4)
    ).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported: state-space"):
        load_model(str(path))
    capsys.readouterr()
    assert main(["info", "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ratequant: error: model type 'mamba' is not supported")
    model = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300))
    with pytest.raises(UnsupportedModelError):
        with simulated_quantization(model, KVQuantSpec(np.full((2, 2, 1), 4), UNIFORM)):
            pass


def windowed_pair(kind: str):
    """(model with sliding-window layers, the same weights with the windows switched off)."""
    import transformers as tf

    common = {**TINY, "num_hidden_layers": 4}
    if kind == "gemma2":
        configs = [tf.Gemma2Config(**common, head_dim=16, sliding_window=w) for w in (5, 4096)]
    else:
        configs = [
            tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=w, max_window_layers=2) for w in (5, 4096)
        ]
    out = []
    for config in configs:
        torch.manual_seed(9)
        out.append(AutoModelForCausalLM.from_config(config).eval())
    return out


@pytest.mark.parametrize("kind", ["gemma2", "qwen2"])
def test_sliding_window_layers_are_applied_over_the_full_history(kind):
    from ratequant.compat import sliding_window_layers

    model, unwindowed = windowed_pair(kind)
    assert any(sliding_window_layers(model)) and not all(sliding_window_layers(model))
    ids = ids_of(24, seed=9)
    with torch.no_grad():
        windowed_ref, unwindowed_ref = model(ids).logits, unwindowed(ids).logits
    cache = RateQuantCache(KVQuantSpec(np.full(model_geometry(model).shape, 8), KIVI4, 4))
    stream = streamed(model, ids, cache)
    assert cache.get_seq_length() == 24 and cache.layers[0].stored_lengths() == (24, 24)  # the whole history
    gap = float((stream - windowed_ref).abs().max())
    assert gap < 0.05 * float((windowed_ref - unwindowed_ref).abs().max()), gap
    assert torch.equal(
        generate(
            model, ids[:, :9], RateQuantCache(KVQuantSpec(np.full(model_geometry(model).shape, 8), KIVI4, 4)), n=12
        ),
        generate(model, ids[:, :9], DynamicCache(config=model.config), n=12),
    )


# --------------------------------------------------------------------------------------------------------
# budgets that cannot be met, for every allocator
# --------------------------------------------------------------------------------------------------------
G = Geometry(3, 2, 16, 4)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_names_the_reachable_range(strategy):
    table = np.exp(np.random.default_rng(0).normal(0, 1, G.shape))[..., None] * 4.0 ** -np.arange(1, 9)
    curves = Curves.from_fit(fit_distortion(table, tuple(range(1, 9))))
    cost = CostModel.from_policy(StoragePolicy(KIVI4, 8), G, 64)
    reach = r"reachable averages lie in \[1, 8\]"
    cases = [
        (Budget.avg_bits(9.0), {}, reach),
        (Budget.avg_bits(0.5), {}, reach),
        (Budget.avg_bits(1.5), {"b_min": 2}, r"\[2, 8\]"),
        (Budget.avg_bits(3.5), {"b_max": 3}, r"\[1, 3\]"),
        (Budget.avg_bits(2.9), {"bitset": (2, 4)}, r"\[2, 4\]"),
        (Budget.bytes_per_token(10.0, 64), {}, r"outside the reachable range \[216, 384\]"),
    ]
    for budget, options, match in cases:
        with pytest.raises(BudgetError, match=match):
            allocate(curves, budget, strategy, AllocationOptions(cost_model=cost, **options))


def test_unreachable_average_is_refused_before_any_measurement():
    assert check_reachable(Budget.avg_bits(3.0)) == (1, 2, 3, 4, 5, 6, 7, 8)
    assert check_reachable(Budget.avg_bits(8.0), (2, 4, 8), b_min=4) == (4, 8)
    assert check_reachable(Budget.bytes_per_token(1.0, 64), (2, 4)) == (2, 4)  # bytes: the allocator decides
    for budget, options, match in [
        (Budget.avg_bits(9.0), {}, r"reachable averages lie in \[1, 8\]"),
        (Budget.avg_bits(0.5), {}, r"reachable averages lie in \[1, 8\]"),
        (Budget.avg_bits(1.5), {"b_min": 2}, r"widths \(2, 3, 4, 5, 6, 7, 8\): reachable averages lie in \[2, 8\]"),
        (Budget.avg_bits(4.5), {"bitset": (2, 3, 4)}, r"\[2, 4\]"),
        (Budget.avg_bits(3.0), {"b_min": 6, "b_max": 5}, r"no allowed width .* lies within \[b_min=6, b_max=5\]"),
    ]:
        with pytest.raises(BudgetError, match=match):
            check_reachable(budget, **options)


# --------------------------------------------------------------------------------------------------------
# fuzzing the packer with arbitrary bytes
# --------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 70), rows=st.integers(1, 3), data=st.data())
def test_unpack_of_arbitrary_bytes_is_in_range_and_round_trips(bits, n, rows, data):
    size = packed_size(n, bits)
    raw = data.draw(st.binary(min_size=rows * size, max_size=rows * size))
    packed = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(rows, size)
        if size
        else torch.zeros(rows, 0, dtype=torch.uint8)
    )
    codes = unpack(packed, bits, n)
    assert codes.shape == (rows, n) and (codes.numel() == 0 or int(codes.max()) < 2**bits)
    again = pack(codes, bits)
    if size:  # the unused high bits of the last byte come back as zeros, every other bit exactly
        spare = size * 8 - n * bits
        keep = torch.full((size,), 0xFF, dtype=torch.uint8)
        keep[-1] = 0xFF >> spare
        assert torch.equal(again, packed & keep)
    with pytest.raises(RateQuantError, match="take"):
        unpack(torch.zeros(rows, size + 1, dtype=torch.uint8), bits, n)


# --------------------------------------------------------------------------------------------------------
# outputs: two writers racing for one new path
# --------------------------------------------------------------------------------------------------------
def race(monkeypatch, module, name, work):
    """Run ``work(0)`` and ``work(1)`` in two threads that both stop at ``module.name`` (a step after the
    "does the output exist?" check and before the output is published) until the other arrives there too.
    Returns what each returned or raised."""
    import threading

    barrier = threading.Barrier(2, timeout=30)
    original = getattr(module, name)

    def meet(*args, **kwargs):
        barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, meet)
    outcomes = [None, None]

    def run(i):
        try:
            outcomes[i] = work(i)
        except Exception as exc:  # the outcome is what the test checks
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_two_writers_racing_for_one_new_plan_path_one_is_refused(tmp_path, monkeypatch):
    """Both pass the "exists?" check before either publishes: the publish itself is exclusive (a hard link),
    so exactly one plan is written, whole, and the other writer gets the one-line refusal."""
    import os

    from ratequant.errors import PlanError
    from ratequant.plan import Plan

    def plan(name):
        widths = [[2, 3]] * 3
        return Plan(
            model={"name": name, **TINY_GEOMETRY.to_dict()},
            quantizer=UNIFORM.to_config(),
            budget={"kind": "avg_bits", "value": 2.5},
            allocator="test",
            avg_bits=2.5,
            bits={"key": widths, "value": widths},
        )

    plans = [plan("first"), plan("second")]
    path = tmp_path / "plan.json"
    outcomes = race(monkeypatch, os, "fsync", lambda i: plans[i].to_json(path))
    written = [i for i, o in enumerate(outcomes) if o == path]
    refused = [o for o in outcomes if isinstance(o, PlanError)]
    assert len(written) == 1 and len(refused) == 1, outcomes
    assert "already exists" in str(refused[0]) and "--force" in str(refused[0])
    assert Plan.load(path) == plans[written[0]]
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary file left by the loser


def test_two_compare_runs_racing_for_one_new_report_folder_one_is_refused(tmp_path, monkeypatch):
    from pathlib import Path

    from ratequant.lab.report import writer
    from ratequant.lab.results import CompareResults

    saved = Path(__file__).parents[1] / "docs" / "results" / "results.json"
    if not saved.exists():
        pytest.skip("docs/results/results.json is not in this checkout")
    results = CompareResults.load(saved)
    monkeypatch.setattr(writer, "draw_figures", lambda results, folder: [])  # the race is about the files
    out = tmp_path / "report"
    outcomes = race(monkeypatch, writer, "_remove_stale", lambda i: writer.write_report(results, out, command=str(i)))
    done = [o for o in outcomes if isinstance(o, writer.ReportFiles)]
    refused = [o for o in outcomes if isinstance(o, RateQuantError)]
    assert len(done) == 1 and len(refused) == 1, outcomes
    assert "already holds a report" in str(refused[0])
    assert sorted(p.name for p in out.iterdir()) == sorted(done[0].files)  # one whole report, no staging left
