"""Can any per-head allocation beat the best fixed split? A local search on the KL allocations really cause.

RateQuant allocates on a proxy (fitted curves of the Fisher-weighted error) under an additive model; the
headroom table of ``compare`` allocates on each component's measured damage alone, still additive. Neither
sees how the damages of components combine. This benchmark searches allocations on the KL divergence they
really cause, without the additive model, on the embedded default model:

1. for each design of ``--designs`` at ``--budget`` average bits, the RateQuant plan (``calibrate``'s defaults)
   and the best fixed split of the budget (``K3V2`` at 2.5 bits, ``K4V2`` at 3), with the plan's sink tokens;
2. from the one with the lower KL on the search text (the first ``--search-windows`` calibration windows of
   ``--search-tokens`` tokens, every position scored), ``--evaluations`` proposals of moving one bit from one
   component (kind, layer, kv head) to another, at equal or fewer true bytes; a move is kept when the KL on the
   search text falls. Donors and receivers are drawn (seeded) with weights from the fitted curves: the donor
   among the components whose next bit down the curve says costs least, the receiver among those whose next
   bit up it says gains most (:func:`ratequant.calibration.search.search_allocation`, the search of
   ``calibrate --search``);
3. the fixed split, RateQuant and the searched allocation scored on the evaluation windows of ``compare``'s
   headline protocol (``--seq-len`` tokens x ``--windows``, second-half KL, simulated quantization with the
   128-token residual window), so the result says whether what the search found on calibration text holds
   on other text.

If the search cannot recover much of the fixed split's damage even on the text it searches, no per-head
allocation reachable by such moves can on this model; if it can there but not on the evaluation text, the
gain does not transfer; if it can on both, RateQuant's gap is its proxy's or the additive model's.

``--search-text evaluation`` is the oracle bound: the search runs on the first ``--search-windows``
evaluation windows themselves (their protocol: ``--seq-len`` tokens, second-half KL), so it is told the answer
it is scored on; the rest of the evaluation windows are reported apart as unseen text. What it reaches on the
windows it searched is a per-head allocation that does that well there; what it cannot reach, this search does
not find even when told the answer (a local search: evidence, not a proof that no allocation can).

    python benchmarks/joint_search.py --output results/joint_search.json
    python benchmarks/joint_search.py --search-text evaluation --output results/joint_search_oracle.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _common import (
    KEYS_WIDER_SPLITS,
    args_dict,
    design_scores,
    kv_split,
    machine_info,
    print_recovered,
    recovered,
    write_result,
)

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--designs", default="kivi,quarot,turbo")
    parser.add_argument("--budget", type=float, default=2.5, choices=sorted(KEYS_WIDER_SPLITS))
    parser.add_argument("--evaluations", type=int, default=60, help="search proposals per design (default 60)")
    parser.add_argument("--search-text", choices=("calibration", "evaluation"), default="calibration")
    parser.add_argument("--search-tokens", type=int, default=512, help="calibration search windows' length")
    parser.add_argument("--search-windows", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0, help="spread of the proposal softmax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "joint_search.json")
    args = parser.parse_args(argv)
    if args.search_tokens <= 256 or args.seq_len <= 256:
        parser.error(
            "--search-tokens and --seq-len must exceed 256 (the 128-token residual window leaves less unquantized)"
        )
    oracle = args.search_text == "evaluation"
    if oracle and not 0 < args.search_windows < args.windows:
        parser.error("--search-text evaluation needs --search-windows below --windows (the rest are the unseen text)")

    import torch

    from ratequant import load_corpus, load_model
    from ratequant.allocation import DEFAULT_CONTEXT_TOKENS, Budget
    from ratequant.calibration import (
        CalibrationSettings,
        best_start,
        calibrate,
        cost_model_for,
        kl_on,
        search_allocation,
    )
    from ratequant.evaluation import Simulated, WindowProtocol, Windows, make_windows, score_conditions

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded, corpus = load_model(), load_corpus()
    model = loaded.model
    windows = make_windows(
        loaded.tokenizer, corpus.evaluation, WindowProtocol(args.seq_len, args.windows, "auto", "second-half")
    )
    if oracle:
        searched_ids, unseen_ids = windows.ids.split([args.search_windows, windows.count - args.search_windows])
        search = Windows(searched_ids, windows.protocol, windows.bos_token_id)
        unseen = Windows(unseen_ids, windows.protocol, windows.bos_token_id)
    else:
        protocol = WindowProtocol(args.search_tokens, args.search_windows, "auto", "all")
        search, unseen = make_windows(loaded.tokenizer, corpus.calibration, protocol), None
    search_kl = kl_on(model, search)

    k_bits, v_bits = KEYS_WIDER_SPLITS[args.budget]
    fixed_name = f"K{k_bits}V{v_bits}"
    conditions, designs = {}, []
    for design in args.designs.split(","):
        t0 = time.perf_counter()
        run = calibrate(loaded, corpus, CalibrationSettings(quantizer=design, budget=Budget.avg_bits(args.budget)))
        spec = run.plan.resolve(model)
        cost = cost_model_for(spec.policy, loaded, DEFAULT_CONTEXT_TOKENS)
        starts = {fixed_name: kv_split(spec.bits, k_bits, v_bits), "RateQuant": np.array(spec.bits)}
        start, start_kl = best_start(search_kl, spec, starts)
        found = search_allocation(
            search_kl,
            replace(spec, bits=starts[start]),
            run.curves,
            cost,
            proposals=args.evaluations,
            seed=args.seed,
            temperature=args.temperature,
            start_kl=start_kl[start],
        )
        bits, best, accepted, trace = found.bits, found.kl, found.accepted, list(found.trace)
        allocations = {**starts, "searched": bits}
        for name, b in allocations.items():
            conditions[f"{design}/{name}"] = Simulated(replace(spec, bits=b))
        designs.append(
            {
                "design": design,
                "sink_tokens": spec.sink_tokens,
                "search_kl": {**start_kl, "searched": best},
                "search_start": start,
                "accepted_moves": accepted,
                "trace": trace,
                "widths": {
                    name: {int(w): int((b == w).sum()) for w in np.unique(b)} for name, b in allocations.items()
                },
                "bits_changed_from_start": int((bits != starts[start]).sum()),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"{design}: search KL {start} {start_kl[start]:.4f} -> searched {best:.4f} "
            f"({accepted} of {args.evaluations} moves kept, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    scored = {"evaluation": windows} | ({"unseen": unseen} if oracle else {})
    scores = {where: score_conditions(model, w, conditions)["second-half"] for where, w in scored.items()}
    for row in designs:
        d = row["design"]
        kls = {"search": row["search_kl"]}
        for where, by_condition in scores.items():
            row[where] = design_scores(by_condition, d, (fixed_name, "RateQuant", "searched"))
            kls[where] = {name: e["kl"] for name, e in row[where].items()}
        for where, kl in kls.items():
            row[f"recovered_{where}"] = recovered(kl, fixed_name, ("RateQuant", "searched"))
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "joint_search",
        "args": args_dict(args),
        "machine": machine_info(args.threads),
        "search_text": args.search_text,
        "search_windows": search.describe(),
        "evaluation_windows": windows.describe(),
        **({"unseen_windows": unseen.describe()} if oracle else {}),
        "designs": designs,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.output, result)
    print_recovered(designs, args.budget, fixed_name, "searched", ("search", *scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
