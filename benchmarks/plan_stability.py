"""How stable a plan is: calibration size and calibration sample against the widths and the evaluation.

On the embedded default model, one design (``--design``, default kivi) at one budget (``--avg-bits``, default
2.5) is calibrated with each of ``--sizes`` calibration windows (default 2, 4, 8 of 512 tokens) on each of
``--samples`` disjoint samples of the calibration split (default 3: the split cut into that many parts at
paragraph boundaries, windows taken from the start of each part). Every plan is then scored on the same
evaluation windows (``--windows`` x ``--seq-len`` tokens, BOS first, second-half scoring, simulated
quantization with the plan's residual and sink tokens), all conditions on each window in turn.

Reported per size: the mean fraction of components whose width differs between two samples' plans, the
mean absolute width difference, the sink tokens chosen, the KL (second half) of each sample's plan and its
spread across samples, beside the calibration time. A size is stable enough when the spread of KL across
samples is within the standard error of one plan's KL.

    python benchmarks/plan_stability.py --output results/plan_stability.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from _common import args_dict, machine_info, write_result

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent


def samples_of(corpus, count: int):
    """``count`` corpora whose calibration text is one disjoint part of ``corpus``'s (same evaluation text)."""
    from ratequant import Corpus

    paragraphs = corpus.calibration.split("\n\n")
    size = -(-len(paragraphs) // count)
    parts = ["\n\n".join(paragraphs[i * size : (i + 1) * size]) for i in range(count)]
    return [Corpus(f"{corpus.name}#{i}", part, corpus.evaluation) for i, part in enumerate(parts)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--design", default="kivi")
    parser.add_argument("--avg-bits", type=float, default=2.5)
    parser.add_argument("--sizes", default="2,4,8", help="calibration windows per plan")
    parser.add_argument("--samples", type=int, default=3, help="disjoint calibration samples")
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=1024, help="evaluation window length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "plan_stability.json")
    args = parser.parse_args(argv)

    import torch

    from ratequant import load_corpus, load_model
    from ratequant.allocation import Budget
    from ratequant.calibration import CalibrationSettings, calibrate
    from ratequant.evaluation import REFERENCE, Simulated, WindowProtocol, make_windows, score_conditions

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded, corpus = load_model(), load_corpus()
    sizes = [int(s) for s in args.sizes.split(",")]
    plans = {}
    for size, (index, sample) in itertools.product(sizes, enumerate(samples_of(corpus, args.samples))):
        settings = CalibrationSettings(
            quantizer=args.design,
            budget=Budget.avg_bits(args.avg_bits),
            sequences=size,
            seq_len=args.calibration_seq_len,
        )
        t0 = time.perf_counter()
        plans[size, index] = (calibrate(loaded, sample, settings).plan, time.perf_counter() - t0)
        print(f"calibrated {size} windows, sample {index}: {plans[size, index][1]:.0f} s", file=sys.stderr)
    windows = make_windows(
        loaded.tokenizer, corpus.evaluation, WindowProtocol(args.seq_len, args.windows, "auto", "second-half")
    )
    conditions = {f"{s}/{i}": Simulated(plan.resolve(loaded.model)) for (s, i), (plan, _) in plans.items()}
    scores = score_conditions(loaded.model, windows, conditions)["second-half"]
    rows = []
    for size in sizes:
        bits = [plans[size, i][0].bits_array().ravel() for i in range(args.samples)]
        pairs = list(itertools.combinations(range(args.samples), 2))
        kls = [scores[f"{size}/{i}"].kl for i in range(args.samples)]
        rows.append(
            {
                "windows": size,
                "changed_fraction": float(np.mean([np.mean(bits[a] != bits[b]) for a, b in pairs])),
                "mean_abs_width_change": float(np.mean([np.mean(np.abs(bits[a] - bits[b])) for a, b in pairs])),
                "sink_tokens": [plans[size, i][0].sink_tokens for i in range(args.samples)],
                "kl": kls,
                "kl_se": [scores[f"{size}/{i}"].kl_se for i in range(args.samples)],
                "kl_spread": float(np.max(kls) - np.min(kls)),
                "ppl": [scores[f"{size}/{i}"].ppl for i in range(args.samples)],
                "calibration_seconds": [plans[size, i][1] for i in range(args.samples)],
            }
        )
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "plan_stability",
        "args": args_dict(args),
        "machine": machine_info(args.threads),
        "full_precision_ppl": scores[REFERENCE].ppl,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.output, result)
    print(f"{'windows':>8} {'changed':>8} {'|dw|':>6} {'sinks':>9} {'KL per sample':>28} {'spread':>7} {'s.e.':>6}")
    for row in rows:
        kl = " ".join(f"{v:.4f}" for v in row["kl"])
        print(
            f"{row['windows']:>8} {row['changed_fraction']:>8.1%} {row['mean_abs_width_change']:>6.2f} "
            f"{row['sink_tokens']!s:>9} {kl:>28} {row['kl_spread']:>7.4f} {np.mean(row['kl_se']):>6.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
