"""Distortion tables: agreement with brute force, padding, and a metric check that can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ratequant.compat import intercept_attention, original_attention
from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS, Geometry
from ratequant.measure.capture import CalibrationStats, capture
from ratequant.measure.distortion import (
    DEFAULT_METRIC,
    METRICS,
    DistortionTable,
    measure_distortion,
    measure_distortions,
    spearman,
)
from ratequant.quantizers import get_quantizer

L, B, H, HQ, T, D = 3, 2, 2, 4, 12, 8
BITSET = (1, 2, 3, 4)


def _stats(pad: int = 0, seed: int = 0, **extra) -> CalibrationStats:
    gen = torch.Generator().manual_seed(seed)
    shape = (L, B, H, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    if pad:
        mask[1, T - pad :] = False
    keep = mask[None, :, None, :, None]
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    keys = rand(*shape) * torch.tensor([1.0, 3.0])[None, None, :, None, None]
    fields = dict(
        keys=keys * keep,
        values=rand(*shape) * keep,
        queries=rand(L, B, HQ, T, D) * keep,
        key_grads=rand(*shape) * keep,
        value_grads=rand(*shape) * keep,
    )
    fields.update(extra)
    return CalibrationStats(attention_mask=mask, geometry=Geometry(L, H, D, HQ), scalings=(D**-0.5,) * L, **fields)


def _brute_tensor(stats, quantizer, metric):
    """One quantizer call per single (kind, layer, head, bits): the definition, loop by loop."""
    out = np.zeros((2, L, H, len(BITSET)))
    m = stats.attention_mask[:, None, :, None]  # [B, 1, T, 1]
    n = int(stats.attention_mask.sum())
    for k, kind in enumerate(KINDS):
        for layer in range(L):
            for h in range(H):
                x = stats.tensor(kind)[layer][:, h : h + 1]
                g = stats.grads(kind)[layer][:, h : h + 1]
                for j, bits in enumerate(BITSET):
                    err = (quantizer.fake_quantize(x, bits, kind) - x) * m
                    value = (err**2).sum() / (n * D) if metric == "mse" else ((g * err) ** 2).sum() / n
                    out[k, layer, h, j] = float(value)
    return out


def _brute_attention(stats, quantizer):
    """Attention output error with one (layer, head, kind) quantized, all heads recomputed, all queries."""
    out = np.zeros((2, L, H, len(BITSET)))
    mask = stats.attention_mask
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask[:, None, :] & mask[:, :, None]  # [B, T, T]
    rep = HQ // H

    def attend(layer, keys, values):
        q = stats.queries[layer]
        kk, vv = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        s = (q @ kk.transpose(-1, -2)) * D**-0.5
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        return torch.nan_to_num(torch.softmax(s, -1)) @ vv  # [B, HQ, T, D]

    count = int(mask.sum()) * rep * D
    for layer in range(L):
        ref = attend(layer, stats.keys[layer], stats.values[layer])
        for k, kind in enumerate(KINDS):
            for h in range(H):
                for j, bits in enumerate(BITSET):
                    kv = [stats.keys[layer].clone(), stats.values[layer].clone()]
                    kv[k][:, h : h + 1] = quantizer.fake_quantize(kv[k][:, h : h + 1], bits, kind)
                    diff = attend(layer, *kv) - ref
                    group = diff[:, h * rep : (h + 1) * rep]
                    out[k, layer, h, j] = float((group**2).sum() / count)
                    others = torch.cat([diff[:, : h * rep], diff[:, (h + 1) * rep :]], 1)
                    assert float(others.abs().max()) == 0.0  # other groups never see kv-head h
    return out


@pytest.mark.parametrize("design", ["uniform", "kivi"])
@pytest.mark.parametrize("pad", [0, 5])
def test_tensor_metrics_match_brute_force(design, pad):
    q = get_quantizer(design, group_size=4) if design == "kivi" else get_quantizer(design)
    stats = _stats(pad=pad)
    tables = measure_distortions(stats, q, BITSET, ("mse", "fisher"))
    for metric in ("mse", "fisher"):
        np.testing.assert_allclose(tables[metric].values, _brute_tensor(stats, q, metric), rtol=2e-5, atol=1e-12)
        assert tables[metric].token_count == B * T - pad
        # strictly decreasing in bits for this min-max design
        assert (np.diff(tables[metric].values, axis=-1) < 0).all()
    # keys of head 1 are 3x larger: 9x the mse of head 0 on average (min-max error scales with the range)
    ratio = tables["mse"].values[0, :, 1] / tables["mse"].values[0, :, 0]
    assert 7.5 < float(np.exp(np.log(ratio).mean())) < 11 and ratio.min() > 4


def test_layer_chunking_does_not_change_results():
    stats = _stats(pad=3)
    q = get_quantizer("uniform")
    one = measure_distortion(stats, q, BITSET, "fisher", chunk_elements=1)
    everything = measure_distortion(stats, q, BITSET, "fisher", chunk_elements=1 << 30)
    np.testing.assert_allclose(one.values, everything.values, rtol=1e-6)


@pytest.mark.parametrize("pad", [0, 4])
def test_attention_metric_matches_brute_force(pad):
    stats = _stats(pad=pad)
    q = get_quantizer("uniform")
    table = measure_distortion(stats, q, BITSET, "attention", max_queries=T)
    np.testing.assert_allclose(table.values, _brute_attention(stats, q), rtol=1e-4, atol=1e-10)
    # subsampling queries gives a close but cheaper estimate
    sub = measure_distortion(stats, q, BITSET, "attention", max_queries=6)
    assert np.corrcoef(np.log(sub.values.ravel()), np.log(table.values.ravel()))[0, 1] > 0.9


def test_padding_garbage_is_ignored():
    clean = _stats(pad=4)
    dirty_fields = {}
    for name in ("keys", "values", "key_grads", "value_grads"):
        t = getattr(clean, name).clone()
        t[:, 1, :, T - 4 :] = 1e3
        dirty_fields[name] = t
    dirty = _stats(pad=4, **dirty_fields)
    q = get_quantizer("uniform")  # per token: padded tokens do not share groups with real ones
    for metric in ("mse", "fisher"):
        np.testing.assert_allclose(
            measure_distortion(dirty, q, BITSET, metric).values,
            measure_distortion(clean, q, BITSET, metric).values,
            rtol=1e-6,
        )


def test_errors_and_table_round_trip():
    stats = _stats()
    q = get_quantizer("uniform")
    no_grads = _stats(key_grads=None, value_grads=None)
    with pytest.raises(RateQuantError, match="gradients"):
        measure_distortion(no_grads, q, metric="fisher")
    with pytest.raises(RateQuantError, match="queries"):
        measure_distortion(_stats(queries=None), q, metric="attention")
    with pytest.raises(RateQuantError, match="unknown distortion metric"):
        measure_distortion(stats, q, metric="l1")
    with pytest.raises(RateQuantError):
        measure_distortion(stats, q, bitset=(3, 2))
    assert DEFAULT_METRIC in METRICS

    table = measure_distortion(stats, q, BITSET, "mse")
    assert table.values.shape == (2, L, H, 4) and table.quantizer == q.to_config()
    again = DistortionTable.from_dict(table.to_dict())
    assert np.array_equal(again.values, table.values) and again.bitset == BITSET and again.metric == "mse"
    np.testing.assert_array_equal(table.at(2), table.values[..., 1])
    with pytest.raises(RateQuantError, match="format_version"):
        DistortionTable.from_dict({**table.to_dict(), "format_version": 99})
    with pytest.raises(RateQuantError, match="non-negative"):
        DistortionTable(values=-table.values, bitset=BITSET, metric="mse", quantizer=table.quantizer)
    with pytest.raises(ValueError):
        table.values[0, 0, 0, 0] = 1.0  # read-only


# -- informative widths ----------------------------------------------------------------------------------


def _brute_spread(stats):
    """Squared deviation from each sequence's per-channel mean over real tokens, per element."""
    out = np.zeros((2, L, H))
    mask = stats.attention_mask
    n = int(mask.sum())
    for k, kind in enumerate(KINDS):
        for layer in range(L):
            for h in range(H):
                total = 0.0
                for b in range(B):
                    x = stats.tensor(kind)[layer, b, h][mask[b]]  # [tokens, D]
                    total += float(((x - x.mean(0)) ** 2).sum())
                out[k, layer, h] = total / (n * D)
    return out


@pytest.mark.parametrize("metric", ["mse", "fisher", "attention"])
def test_every_table_records_the_informative_width_evidence(metric):
    stats = _stats(pad=3)
    q = get_quantizer("uniform")
    table = measure_distortion(stats, q, BITSET, metric, max_queries=4)
    assert table.error is not None and table.spread is not None
    np.testing.assert_allclose(table.error, _brute_tensor(stats, q, "mse"), rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(table.spread, _brute_spread(stats), rtol=1e-5)
    if metric == "mse":
        np.testing.assert_array_equal(table.error, table.values)
    again = DistortionTable.from_dict(table.to_dict())
    np.testing.assert_array_equal(again.error, table.error)
    np.testing.assert_array_equal(again.spread, table.spread)
    # the widths are those whose summed error beats the summed spread, from the lowest passing one up
    passing = table.error.sum(axis=(1, 2)) < table.spread.sum(axis=(1, 2))[:, None]
    expected = tuple(BITSET[int(np.argmax(p)) :] if p.any() else BITSET[-1:] for p in passing)
    assert table.informative_widths("kind") == expected


def _synthetic_table(key_error, value_error, spread=1.0):
    """A table whose summed error per width is ``key_error`` / ``value_error`` against a summed spread of
    ``spread`` per kind (spread over 2 layers x 2 heads)."""
    bitset = (1, 2, 3, 4)
    error = np.empty((2, 2, 2, 4))
    error[0] = np.asarray(key_error, float) / 4
    error[1] = np.asarray(value_error, float) / 4
    return DistortionTable(
        values=error,
        bitset=bitset,
        metric="mse",
        quantizer={"name": "uniform", "params": {}},
        error=error,
        spread=np.full((2, 2, 2), spread / 4),
    )


def test_informative_widths_per_kind_and_pooled():
    # keys fail at 1 and 2 bits (error >= what storing the mean costs), values fail at 1 and pass at 2
    table = _synthetic_table(key_error=[3.0, 1.5, 0.4, 0.1], value_error=[2.0, 0.5, 0.1, 0.02])
    assert table.informative_widths("kind") == ((3, 4), (2, 3, 4))
    assert table.informative_widths() == ((3, 4), (2, 3, 4))  # per kind by default
    # pooled: a width must pass for keys and values alike; both get the same widths
    assert table.informative_widths("pooled") == ((3, 4), (3, 4))
    # equal to the spread is not better than the mean: it fails
    tie = _synthetic_table(key_error=[3.0, 1.0, 0.4, 0.1], value_error=[2.0, 0.5, 0.1, 0.02])
    assert tie.informative_widths("kind") == ((3, 4), (2, 3, 4))
    # nothing passes: the widest width is kept
    hopeless = _synthetic_table(key_error=[9.0, 8.0, 7.0, 6.0], value_error=[2.0, 0.5, 0.1, 0.02])
    assert hopeless.informative_widths("kind") == ((4,), (2, 3, 4))
    assert hopeless.informative_widths("pooled") == ((4,), (4,))
    # everything passes
    fine = _synthetic_table(key_error=[0.9, 0.5, 0.1, 0.01], value_error=[0.9, 0.5, 0.1, 0.01])
    assert fine.informative_widths("kind") == fine.informative_widths("pooled") == ((1, 2, 3, 4),) * 2


def test_component_floors_are_decided_per_component():
    """Each component starts at its own lowest informative width: one outlier does not floor its whole kind."""
    table = _synthetic_table(key_error=[0.8, 0.4, 0.1, 0.01], value_error=[0.8, 0.4, 0.1, 0.01])
    error = np.array(table.error)
    error[0, 1, 0] = [0.5, 0.4, 0.3, 0.01]  # layer 1 kv-head 0's keys: only 4 bits beat their mean (0.25)
    error[1, 0, 1] = [0.1, 0.3, 0.27, 0.01]  # 1 bit passes alone (noise), 2 and 3 fail: starts at 4
    error[1, 1, 1] = [9.0, 8.0, 7.0, 6.0]  # never passes: the widest
    noisy = DistortionTable(table.values, table.bitset, "mse", table.quantizer, error=error, spread=table.spread)
    floors = noisy.component_floors()
    assert floors.shape == (2, 2, 2) and floors.dtype == np.int64
    assert floors[0, 1, 0] == 4 and floors[1, 0, 1] == 4 and floors[1, 1, 1] == 4
    assert floors[0, 0, 0] == floors[0, 0, 1] == floors[0, 1, 1] == floors[1, 0, 0] == 1
    assert noisy.informative_widths("kind")[0][0] == 2  # summed over the kind, the outlier floors every key at 2


def test_informative_widths_needs_the_evidence():
    table = _synthetic_table(key_error=[3.0, 1.5, 0.4, 0.1], value_error=[2.0, 0.5, 0.1, 0.02])
    with pytest.raises(RateQuantError, match="per must be"):
        table.informative_widths("layer")
    bare = DistortionTable(values=table.values, bitset=table.bitset, metric="mse", quantizer=table.quantizer)
    with pytest.raises(RateQuantError, match="no reconstruction error"):
        bare.informative_widths()
    with pytest.raises(RateQuantError, match="reconstruction error must be"):
        DistortionTable(
            values=table.values,
            bitset=table.bitset,
            metric="mse",
            quantizer=table.quantizer,
            error=table.error[..., :2],
        )
    with pytest.raises(RateQuantError, match="spread must be"):
        DistortionTable(
            values=table.values, bitset=table.bitset, metric="mse", quantizer=table.quantizer, spread=table.spread[0]
        )


def test_metrics_registry():
    assert set(METRICS) == {"mse", "fisher", "attention"} and "fisher" in METRICS
    assert METRICS.get("fisher").needs_gradients and not METRICS.get("fisher").needs_queries
    assert METRICS.get("attention").needs_queries and not METRICS.get("mse").needs_gradients


# -- does the metric predict damage? -------------------------------------------------------------------


def _tiny_model_with_a_hidden_important_head() -> torch.nn.Module:
    """A Llama whose kv-head 0 values are scaled by 1/s and the matching o_proj columns by s.

    The function computed is unchanged (attention output is linear in V), so quantizing head 0's values
    (a scale-equivariant min-max design) damages the model exactly as before, but its plain MSE shrinks by
    s^2. A metric that ignores how much the model cares about a head ranks this head wrongly.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    s, d = 30.0, 16
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.v_proj.weight[:d] /= s  # kv-head 0
            attn.o_proj.weight[:, : 2 * d] *= s  # query heads 0 and 1 read kv-head 0
    return model


def test_fisher_predicts_damage_better_than_mse_on_a_rescaled_head():
    model = _tiny_model_with_a_hidden_important_head()
    gen = torch.Generator().manual_seed(5)
    calib, held_out = torch.randint(0, 64, (4, 32), generator=gen), torch.randint(0, 64, (4, 32), generator=gen)
    stats = capture(model, calib)
    q = get_quantizer("uniform", scale_dtype="float32")
    bitset = (1, 2, 3)
    tables = measure_distortions(stats, q, bitset, METRICS, max_queries=32)

    with torch.no_grad():
        reference = torch.log_softmax(model(held_out).logits, -1)

    def damage(layer, head, bits):
        """KL(full precision || only this value head quantized), mean over held-out positions."""

        def fn(module, query, key, value, mask, **kwargs):
            if module.layer_idx == layer:
                value = value.clone()
                value[:, head : head + 1] = q.fake_quantize(value[:, head : head + 1], bits, "value")
            return original_attention(module, query, key, value, mask, **kwargs)

        with torch.no_grad(), intercept_attention(model, fn):
            logp = torch.log_softmax(model(held_out).logits, -1)
        return float((reference.exp() * (reference - logp)).sum(-1).mean())

    pairs = [(layer, h, j) for layer in range(2) for h in range(2) for j in range(len(bitset))]
    true = [damage(layer, h, bitset[j]) for layer, h, j in pairs]
    rho = {m: spearman([tables[m].values[1, layer, h, j] for layer, h, j in pairs], true) for m in METRICS}
    assert rho["fisher"] > 0.9
    assert rho["fisher"] > rho["mse"] + 0.4
    # the attention output is taken before o_proj, so it cannot see the rescaling either
    assert rho["fisher"] > rho["attention"] + 0.3
    # the hidden head: MSE says head 0 is ~s^2 less harmful than head 1; the true damage says otherwise
    assert (tables["mse"].values[1, :, 0] < tables["mse"].values[1, :, 1] / 100).all()
