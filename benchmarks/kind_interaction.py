"""How do the damages of components combine? Each kind's joint KL beside the sum of its components' proxies.

RateQuant allocates on the sum of the components' separate distortions. This benchmark measures, on the
embedded default model, how far that sum is from what quantizing a whole kind together really does, and
whether an allocation told the difference does better:

1. for each design of ``--designs``, the RateQuant plan at ``--budget`` average bits (``calibrate``'s defaults)
   and its curves ``d_i(b)`` (the fitted Fisher proxy);
2. on ``--kl-windows`` windows of ``--kl-tokens`` tokens of calibration text (``--kl-scoring``), the KL from full
   precision when *every* component of one kind is quantized at width ``b`` and the other kind at 8 bits (less
   the KL of both kinds at 8 bits): the kind's joint damage ``J_k(b)``, for every width of the curves. The
   *interaction factor* ``J_k(b) / sum_i d_i(b)`` is constant across widths where the damages add up (the
   proxy is in its own units, so only its change with the width and between kinds says something);
3. *kind-calibrated* curves ``d_i(b) * J_k(b) / sum_i d_i(b)``: the proxy's split among the components of a
   kind, rescaled so that each kind's curve is its measured joint damage (a width whose joint damage is below
   ``--noise-floor`` takes the factor of the nearest narrower width above it), allocated by the same exact solver;
4. the budget's fixed split with keys wider, RateQuant and the kind-calibrated allocation scored on the
   evaluation windows of ``compare``'s headline protocol (``--seq-len`` x ``--windows``, second-half KL,
   simulated quantization with the 128-token residual window and the plan's sink tokens).

Cost: ``2 x 7`` forward passes over the KL text per design, then the scoring (about 10 minutes per design on
two CPU cores with the defaults).

    python benchmarks/kind_interaction.py --output results/kind_interaction.json
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
REFERENCE_BITS = 8


def kind_calibrated(values: np.ndarray, joint: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """``(curves, factors)``: ``values [2, L, H, nb]`` rescaled per kind and width so that each kind's summed curve
    is ``joint [2, nb]``; a width whose joint damage is at most ``floor`` (noise) takes the factor of the nearest
    narrower width above the floor (its own where there is none). ``factors [2, nb]``."""
    sums = values.sum(axis=(1, 2))
    factors = np.empty_like(joint)
    for k in range(2):
        reliable = joint[k] > floor
        last = 0
        for j in range(joint.shape[1]):
            last = j if reliable[j] else last
            factors[k, j] = joint[k, last] / max(sums[k, last], 1e-300)
    return values * factors[:, None, None, :], factors


def split_kl(kl, spec, key_bits: int, value_bits: int) -> float:
    """``kl`` (see :func:`ratequant.calibration.search.kl_on`) of ``spec`` with every key at ``key_bits`` and every
    value at ``value_bits``."""
    return kl(replace(spec, bits=kv_split(spec.bits, key_bits, value_bits)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--designs", default="kivi,quarot,turbo")
    parser.add_argument("--budget", type=float, default=2.5, choices=sorted(KEYS_WIDER_SPLITS))
    parser.add_argument("--kl-tokens", type=int, default=1024, help="calibration KL windows' length")
    parser.add_argument("--kl-windows", type=int, default=2)
    parser.add_argument("--kl-scoring", choices=("all", "second-half"), default="all")
    parser.add_argument("--noise-floor", type=float, default=1e-4, help="joint KL (nats) below which a width is noise")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "kind_interaction.json")
    args = parser.parse_args(argv)

    import torch

    from ratequant import load_corpus, load_model
    from ratequant.allocation import DEFAULT_CONTEXT_TOKENS, Budget, Curves
    from ratequant.calibration import (
        CalibrationSettings,
        allocate_for,
        bits_histogram,
        calibrate,
        cost_model_for,
        kl_on,
    )
    from ratequant.evaluation import Simulated, WindowProtocol, make_windows, score_conditions

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded, corpus = load_model(), load_corpus()
    model = loaded.model
    kl_text = make_windows(
        loaded.tokenizer, corpus.calibration, WindowProtocol(args.kl_tokens, args.kl_windows, "auto", args.kl_scoring)
    )
    kl = kl_on(model, kl_text)
    k_bits, v_bits = KEYS_WIDER_SPLITS[args.budget]
    fixed_name = f"K{k_bits}V{v_bits}"
    conditions, designs = {}, []
    for design in args.designs.split(","):
        t0 = time.perf_counter()
        settings = CalibrationSettings(quantizer=design, budget=Budget.avg_bits(args.budget))
        run = calibrate(loaded, corpus, settings)
        spec, curves = run.plan.resolve(model), run.curves
        reference_kl = split_kl(kl, spec, REFERENCE_BITS, REFERENCE_BITS)
        key_kls = [split_kl(kl, spec, b, REFERENCE_BITS) for b in curves.bitset]
        value_kls = [split_kl(kl, spec, REFERENCE_BITS, b) for b in curves.bitset]
        joint = np.array([key_kls, value_kls]) - reference_kl
        values, factors = kind_calibrated(curves.values, joint, args.noise_floor)
        calibrated = Curves.measured(
            values, curves.bitset, design=design, label="fisher x kind joint KL", min_bits=curves.min_bits
        )
        cost = cost_model_for(spec.policy, loaded, DEFAULT_CONTEXT_TOKENS, settings.bitset)
        allocations = {
            fixed_name: kv_split(spec.bits, k_bits, v_bits),
            "RateQuant": np.array(spec.bits),
            "kind-calibrated": np.array(allocate_for(settings, calibrated, loaded.geometry, cost).bits),
        }
        calibration_kl = {name: kl(replace(spec, bits=b)) for name, b in allocations.items()}
        for name, b in allocations.items():
            conditions[f"{design}/{name}"] = Simulated(replace(spec, bits=b))
        proxy = curves.values.sum(axis=(1, 2))
        designs.append(
            {
                "design": design,
                "sink_tokens": spec.sink_tokens,
                "widths_measured": list(curves.bitset),
                "reference_kl": reference_kl,
                "joint_kl": {"key": joint[0].tolist(), "value": joint[1].tolist()},
                "proxy_sum": {"key": proxy[0].tolist(), "value": proxy[1].tolist()},
                "interaction_factor": {"key": factors[0].tolist(), "value": factors[1].tolist()},
                "calibration_kl": calibration_kl,
                "widths": {
                    name: {kind: bits_histogram(b[k]) for k, kind in enumerate(("key", "value"))}
                    for name, b in allocations.items()
                },
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{design}: joint KL by width {curves.bitset}", flush=True)
        for k, kind in enumerate(("key", "value")):
            relative = np.array2string(factors[k] / factors[k, -1], precision=2)
            print(f"  {kind:5s} joint {np.array2string(joint[k], precision=5)}  factor / widest {relative}", flush=True)
    windows = make_windows(
        loaded.tokenizer, corpus.evaluation, WindowProtocol(args.seq_len, args.windows, "auto", "second-half")
    )
    scores = score_conditions(model, windows, conditions)["second-half"]
    for row in designs:
        row["evaluation"] = design_scores(scores, row["design"], row["calibration_kl"])
        kls = {"calibration": row["calibration_kl"], "evaluation": {n: e["kl"] for n, e in row["evaluation"].items()}}
        for where, by_name in kls.items():
            row[f"recovered_{where}"] = recovered(by_name, fixed_name, ("RateQuant", "kind-calibrated"))
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "kind_interaction",
        "args": args_dict(args),
        "machine": machine_info(args.threads),
        "kl_windows": kl_text.describe(),
        "evaluation_windows": windows.describe(),
        "designs": designs,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.output, result)
    print_recovered(designs, args.budget, fixed_name, "kind-calibrated", ("calibration", "evaluation"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
