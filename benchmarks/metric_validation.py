"""Which distortion metric predicts model damage? Evidence for ``ratequant.measure.distortion.DEFAULT_METRIC``.

On the embedded default model (SmolLM2-135M) and corpus, this

1. captures calibration statistics (keys, values, queries, loss gradients) on calibration windows,
2. measures every metric of :data:`ratequant.measure.distortion.METRICS` for every component at bits 1..4,
3. draws a random sample of (kind, layer, kv-head, bits) pairs and measures the *true damage* of
   fake-quantizing only that component on held-out evaluation windows: the KL divergence from the
   full-precision next-token distribution and the increase of the next-token cross-entropy,
4. reports the Spearman rank correlation between each metric and the true damage.

It also times the measurement of the mse and fisher tables over the full bit set 1..8.

Run: ``PYTHONPATH=src python benchmarks/metric_validation.py [--out results/metric_validation.json]``.
Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from _common import corpus_windows, machine_info, write_result

FORMAT_VERSION = 1


def _damage(model, ids, quantizer, kind, layer, head, bits, reference_logp):
    """(KL, delta CE) when only (kind, layer, head) is fake-quantized at ``bits``."""
    from ratequant.compat import intercept_attention, original_attention

    def fn(module, query, key, value, mask, **kwargs):
        if module.layer_idx == layer:
            if kind == "key":
                key = key.clone()
                key[:, head : head + 1] = quantizer.fake_quantize(key[:, head : head + 1], bits, "key")
            else:
                value = value.clone()
                value[:, head : head + 1] = quantizer.fake_quantize(value[:, head : head + 1], bits, "value")
        return original_attention(module, query, key, value, mask, **kwargs)

    with torch.no_grad(), intercept_attention(model, fn):
        logp = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), -1)
    return _kl_ce(reference_logp, logp, ids)


def _kl_ce(reference_logp, logp, ids):
    kl = float((reference_logp.exp() * (reference_logp - logp)).sum(-1).mean())
    ce = float(-logp.gather(-1, ids[:, 1:, None]).mean())
    return kl, ce


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/metric_validation.json")
    parser.add_argument("--quantizer", default="kivi", help="quantizer design (default: kivi)")
    parser.add_argument("--pairs", type=int, default=40, help="random (component, bits) pairs to test")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)

    from ratequant import capture, load_corpus, load_model
    from ratequant.measure import DEFAULT_METRIC, KINDS, METRICS, measure_distortion, measure_distortions, spearman
    from ratequant.quantizers import get_quantizer

    started = time.perf_counter()
    loaded = load_model("default")
    model, geometry = loaded.model, loaded.geometry
    corpus = load_corpus("default")
    calib = corpus_windows(loaded.tokenizer, corpus.calibration, args.seq_len, args.calib_windows)
    held_out = corpus_windows(loaded.tokenizer, corpus.evaluation, args.eval_seq_len, args.eval_windows)
    quantizer = get_quantizer(args.quantizer)
    print(f"model {loaded.name} {geometry}; calibration {tuple(calib.shape)}, held-out {tuple(held_out.shape)}")

    stats = capture(model, calib)
    timings = {k: round(v, 2) for k, v in stats.timings.items()}
    print(f"capture: {timings} s")

    bitset = (1, 2, 3, 4)
    tables = measure_distortions(stats, quantizer, bitset, METRICS)

    # speed of the tables the planner uses: full bit set 1..8, best of 3 runs
    speed = {}
    for metric in ("mse", "fisher"):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            measure_distortion(stats, quantizer, metric=metric)
            runs.append(time.perf_counter() - t0)
        speed[metric] = min(runs)
    t0 = time.perf_counter()
    measure_distortion(stats, quantizer, metric="attention")
    speed["attention"] = time.perf_counter() - t0
    print("measurement seconds (bits 1..8, all components): " + ", ".join(f"{m} {s:.2f}" for m, s in speed.items()))

    rng = random.Random(args.seed)
    all_pairs = [
        (k, layer, head, bits)
        for k in range(2)
        for layer in range(geometry.num_layers)
        for head in range(geometry.num_kv_heads)
        for bits in bitset
    ]
    pairs = rng.sample(all_pairs, min(args.pairs, len(all_pairs)))
    with torch.no_grad():
        reference_logp = torch.log_softmax(model(held_out, use_cache=False).logits[:, :-1].float(), -1)
    base_ce = float(-reference_logp.gather(-1, held_out[:, 1:, None]).mean())
    rows = []
    t0 = time.perf_counter()
    for k, layer, head, bits in pairs:
        kl, ce = _damage(model, held_out, quantizer, KINDS[k], layer, head, bits, reference_logp)
        row = {"kind": KINDS[k], "layer": layer, "head": head, "bits": bits, "kl": kl, "delta_ce": ce - base_ce}
        for m in METRICS:
            row[m] = float(tables[m].values[k, layer, head, bitset.index(bits)])
        rows.append(row)
    damage_seconds = time.perf_counter() - t0

    correlation = {
        m: {
            "spearman_kl": spearman([r[m] for r in rows], [r["kl"] for r in rows]),
            "spearman_delta_ce": spearman([r[m] for r in rows], [r["delta_ce"] for r in rows]),
        }
        for m in METRICS
    }
    # the same check restricted to one bit width: can the metric rank components against each other?
    within_bits = {}
    for m in METRICS:
        per = []
        for b in bitset:
            sel = [r for r in rows if r["bits"] == b]
            if len(sel) >= 4:
                per.append(spearman([r[m] for r in sel], [r["kl"] for r in sel]))
        within_bits[m] = float(np.mean(per)) if per else None
        correlation[m]["mean_spearman_kl_within_bits"] = within_bits[m]
    winner = max(METRICS, key=lambda m: correlation[m]["spearman_kl"])

    print(f"\n{'metric':<10} {'rho(KL)':>8} {'rho(dCE)':>9} {'rho(KL) within bits':>20} {'seconds':>8}")
    for m in METRICS:
        c = correlation[m]
        wb = "n/a" if c["mean_spearman_kl_within_bits"] is None else f"{c['mean_spearman_kl_within_bits']:.3f}"
        print(f"{m:<10} {c['spearman_kl']:>8.3f} {c['spearman_delta_ce']:>9.3f} {wb:>20} {speed[m]:>8.2f}")
    print(f"best predictor of KL: {winner} (library default: {DEFAULT_METRIC}); base CE {base_ce:.4f}")

    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "metric_validation",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "model": loaded.name,
            "geometry": geometry.to_dict(),
            "corpus": corpus.describe(),
            "quantizer": quantizer.to_config(),
            "bitset": list(bitset),
            "pairs": len(pairs),
            "calibration_shape": list(calib.shape),
            "held_out_shape": list(held_out.shape),
            "seed": args.seed,
        },
        "capture_seconds": dict(stats.timings),
        "measurement_seconds_bits_1_to_8": speed,
        "damage_seconds": damage_seconds,
        "base_cross_entropy": base_ce,
        "correlation": correlation,
        "best_metric": winner,
        "default_metric": DEFAULT_METRIC,
        "pairs": rows,
        "total_seconds": time.perf_counter() - started,
    }
    write_result(args.out, result, overwrite=args.force)
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
