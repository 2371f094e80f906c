"""What changes RateQuant's result: its allocation against variants of it and the best fixed split, one run.

On the embedded default model, for each design of ``--designs`` and budget of ``--budgets``, the same
calibration statistics (``--calibration-sequences`` x 512 tokens, Fisher metric, sink tokens chosen from the
data) give four allocations, scored on the same evaluation windows (``--windows`` x ``--seq-len`` tokens,
second-half scoring, simulated quantization with the real 128-token residual window):

* ``rq-fit``: RateQuant on the fitted curves (one beta per kind), widths from ``--widths`` (default 1..8);
* ``rq-table``: RateQuant on the measured calibration distortion table itself (no fit);
* ``rq-fit-from-2``: RateQuant on the fitted curves with widths from 2 bits;
* ``K{k}V{v}``: the fixed key/value split of the budget with keys wider (the best fixed scheme here);
* ``rq-keys-x{w}`` for each ``--key-weights`` w: RateQuant on the fitted curves with every key curve
  multiplied by w, a family between per-head allocation and a key/value split that probes whether the damages
  of keys and values interact beyond what adding them assumes (w = 1 is ``rq-fit-from-2``).

It prints KL ± s.e. and perplexity with the width histogram of each, and writes them as JSON. This is the
experiment behind the default widths 2..8 (:data:`ratequant.allocation.DEFAULT_WIDTHS`).

    python benchmarks/allocation_variants.py --output results/allocation_variants.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _common import KEYS_WIDER_SPLITS, args_dict, machine_info, write_result

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--designs", default="kivi,quarot,turbo")
    parser.add_argument("--budgets", default="2.5,3")
    parser.add_argument("--widths", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--key-weights", default="", help="comma-separated weights of the key curves ('' for none)")
    parser.add_argument("--calibration-sequences", type=int, default=4)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "allocation_variants.json")
    args = parser.parse_args(argv)

    import torch

    from ratequant import KVQuantSpec, StoragePolicy, load_corpus, load_model
    from ratequant.allocation import DEFAULT_CONTEXT_TOKENS, AllocationOptions, Budget, Curves, allocate, get_strategy
    from ratequant.cache import DEFAULT_RESIDUAL_LENGTH
    from ratequant.calibration import choose_sink_tokens, collect_statistics, cost_model_for, fit_design
    from ratequant.evaluation import Simulated, WindowProtocol, make_windows, score_conditions
    from ratequant.quantizers import get_quantizer

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded, corpus = load_model(), load_corpus()
    widths = tuple(int(b) for b in args.widths.split(","))
    stats = collect_statistics(loaded, corpus, seq_len=512, sequences=args.calibration_sequences)
    windows = make_windows(
        loaded.tokenizer, corpus.evaluation, WindowProtocol(args.seq_len, args.windows, "auto", "second-half")
    )
    conditions, widths_used = {}, {}
    for design in args.designs.split(","):
        quantizer = get_quantizer(design)
        sinks = choose_sink_tokens(stats, quantizer)[0]
        fitted = fit_design(stats, quantizer, bitset=widths, sink_tokens=sinks)
        table, allowed = fitted.table, fitted.curves.bitset
        measured = Curves.measured(
            table.values[..., [table.bitset.index(b) for b in allowed]], allowed, min_bits=fitted.curves.min_bits
        )
        cost = cost_model_for(StoragePolicy(quantizer, DEFAULT_RESIDUAL_LENGTH, sinks), loaded, DEFAULT_CONTEXT_TOKENS)
        flat = Curves.flat(loaded.geometry, widths)
        for budget in (float(b) for b in args.budgets.split(",")):
            k, v = KEYS_WIDER_SPLITS[budget]
            variants = {
                "rq-fit": (fitted.curves, "ratequant", None),
                "rq-table": (measured, "ratequant", None),
                "rq-fit-from-2": (fitted.curves, "ratequant", 2),
                f"K{k}V{v}": (flat, get_strategy("kv-split", key_bits=k, value_bits=v), None),
            }
            for w in (float(x) for x in args.key_weights.split(",") if x):
                scale = np.array([w, 1.0])[:, None, None, None]
                weighted = Curves.measured(fitted.curves.values * scale, allowed, min_bits=fitted.curves.min_bits)
                variants[f"rq-keys-x{w:g}"] = (weighted, "ratequant", 2)
            for name, (curves, strategy, b_min) in variants.items():
                options = AllocationOptions(bitset=curves.bitset, b_min=b_min, cost_model=cost)
                bits = allocate(curves, Budget.avg_bits(budget), strategy, options).bits
                key = f"{design}/{budget:g}/{name}"
                conditions[key] = Simulated(KVQuantSpec(bits, quantizer, DEFAULT_RESIDUAL_LENGTH, sinks))
                widths_used[key] = {int(b): int((bits == b).sum()) for b in np.unique(bits)}
    scores = score_conditions(loaded.model, windows, conditions)["second-half"]
    rows = [
        {"condition": key, "kl": scores[key].kl, "kl_se": scores[key].kl_se, "ppl": scores[key].ppl, "widths": w}
        for key, w in widths_used.items()
    ]
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "allocation_variants",
        "args": args_dict(args),
        "machine": machine_info(args.threads),
        "windows": windows.describe(),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.output, result)
    for row in rows:
        print(f"{row['condition']:28s} KL {row['kl']:.4f} ± {row['kl_se']:.4f}  PPL {row['ppl']:.3f}  {row['widths']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
