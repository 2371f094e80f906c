"""Calibration time, phase by phase, beside one plain forward pass over the same tokens.

On the embedded default model and the calibration split of the default corpus (``--sequences`` windows of
``--seq-len`` tokens, the ``ratequant calibrate`` defaults), with the default settings (KIVI, Fisher
metric, 2.5 average bits unless ``--avg-bits``), it times in one process:

* ``forward``: one plain forward pass over the calibration tokens (inference mode, no hooks): the yardstick;
* ``capture``: recording keys and values with hooks (forward only, ``gradients=False``; one window per pass,
  as ``ratequant calibrate`` runs it);
* ``sensitivity``: the extra time of recording the loss gradients too (capture with ``gradients=True``
  minus ``capture``), i.e. the backward pass the Fisher metric needs;
* ``distortion`` and ``fit``: the two phases of :func:`ratequant.calibration.pipeline.fit_design`, as its
  :class:`~ratequant.calibration.pipeline.DesignFit` times them: ``distortion`` is the distortion table (every component
  at every width; ``measure_distortion``), ``fit`` the choice of widths and the curve fit (``fit_distortion``
  and the allocation curves). The informative-width test now rides on the measurement pass:
  ``measure_distortion`` records each width's reconstruction error and the tensor's spread in the same pass,
  and ``DistortionTable.informative_widths("pooled")`` only compares them, so its cost is in ``distortion``
  (it used to be a separate pass inside ``fit``);
* ``allocation``: cost model + exact integer allocation (``cost_model_for`` + ``allocate_for``);
* ``plan``: building the plan object.

Each phase runs ``--repeats`` times and the median is reported (``runs_s`` holds every repeat;
``runs_s["fit_design"]`` the wall time of each whole ``fit_design`` call). "Statistics to plan" is distortion + fit
+ allocation + plan (target: under 2 s). Then the whole command ``ratequant calibrate`` runs once in a
subprocess with the same thread count (wall time, including start-up and model loading), against the
forward pass (target: under 4x).

    python benchmarks/calibration_time.py --output results/calibration_time.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import args_dict, corpus_windows, machine_info, subprocess_env, write_result

FORMAT_VERSION = 1


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), [float(t) for t in times], result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantizer", default="kivi")
    parser.add_argument("--avg-bits", type=float, default=2.5)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cli", action="store_true", help="do not time the ratequant calibrate command")
    parser.add_argument("--output", type=Path, default=Path("results/calibration_time.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ratequant import capture, load_corpus, load_model
    from ratequant.allocation import DEFAULT_CONTEXT_TOKENS, Budget
    from ratequant.calibration import (
        CAPTURE_BATCH_SIZE,
        CalibrationSettings,
        allocate_for,
        cost_model_for,
        fit_design,
        plan_of,
    )

    loaded = load_model()
    corpus = load_corpus()
    settings = CalibrationSettings(
        quantizer=args.quantizer, budget=Budget.avg_bits(args.avg_bits), seq_len=args.seq_len, sequences=args.sequences
    )
    policy = settings.policy()
    quantizer = policy.quantizer
    ids = corpus_windows(loaded.tokenizer, corpus.calibration, args.seq_len, args.sequences).to(loaded.device)
    r = args.repeats
    phases, runs = {}, {}

    def forward():
        with torch.inference_mode():
            return loaded.model(ids, use_cache=False).logits.shape

    phases["forward"], runs["forward"], _ = timed(forward, r)
    batch = CAPTURE_BATCH_SIZE  # as ratequant calibrate runs it

    def record(gradients: bool):
        return capture(loaded.model, ids, gradients=gradients, queries=False, batch_size=batch)

    phases["capture"], runs["capture"], _ = timed(lambda: record(False), r)
    with_grads, runs["capture_with_gradients"], stats = timed(lambda: record(True), r)
    phases["sensitivity"] = max(0.0, with_grads - phases["capture"])
    designs = []

    def design_fit():
        designs.append(
            fit_design(
                stats,
                quantizer,
                metric=settings.metric,
                bitset=settings.bitset,
                informative_only=settings.informative_only,
            )
        )
        return designs[-1]

    _, runs["fit_design"], fitted = timed(design_fit, r)
    for phase in ("distortion", "fit"):  # the library's own split of each fit_design call
        runs[phase] = [float(d.seconds[phase]) for d in designs]
        phases[phase] = float(np.median(runs[phase]))
    context = settings.budget.context_tokens or DEFAULT_CONTEXT_TOKENS

    def allocation():
        cost = cost_model_for(policy, loaded, context, settings.bitset)
        return allocate_for(settings, fitted.curves, loaded.geometry, cost)

    phases["allocation"], runs["allocation"], alloc = timed(allocation, r)

    def plan():
        return plan_of(
            loaded,
            corpus,
            alloc,
            policy,
            fitted,
            budget=settings.budget,
            metric=settings.metric,
            calibration={"tokens": int(ids.numel()), "seconds": 0.0},
        )

    phases["plan"], runs["plan"], _ = timed(plan, r)
    stats_to_plan = phases["distortion"] + phases["fit"] + phases["allocation"] + phases["plan"]
    library_total = phases["capture"] + phases["sensitivity"] + stats_to_plan

    cli = None
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "plan.json"
            env = subprocess_env(args.threads)
            cmd = [
                sys.executable,
                "-m",
                "ratequant.cli",
                "calibrate",
                "--quantizer",
                args.quantizer,
                "--avg-bits",
                str(args.avg_bits),
                "--seq-len",
                str(args.seq_len),
                "--sequences",
                str(args.sequences),
                "--out",
                str(out),
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            cli = {
                "command": " ".join(["ratequant", *cmd[3:-1], "PLAN"]),
                "returncode": proc.returncode,
                "wall_s": wall,
                "vs_forward": wall / phases["forward"],
            }
            if proc.returncode:
                cli["stderr_tail"] = proc.stderr[-2000:]
            elif out.exists():
                cli["plan_phases"] = json.loads(out.read_text()).get("calibration", {}).get("phases")

    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "calibration_time",
        "machine": {**machine_info(args.threads), "model": loaded.describe()},
        "settings": args_dict(args),
        "tokens": int(ids.numel()),
        "phases_s": phases,
        "runs_s": runs,
        "statistics_to_plan_s": stats_to_plan,
        "library_total_s": library_total,
        "library_total_vs_forward": library_total / phases["forward"],
        "cli": cli,
        "targets": {
            "statistics_to_plan_under_2s": stats_to_plan < 2.0,
            "cli_under_4x_forward": None if cli is None else cli["wall_s"] < 4 * phases["forward"],
        },
    }
    write_result(args.output, result)
    for name, value in phases.items():
        print(f"{name:12s} {value:8.3f} s  ({value / phases['forward']:.2f}x forward)")
    print(
        f"statistics -> plan {stats_to_plan:.3f} s; library total {library_total:.2f} s "
        f"({library_total / phases['forward']:.2f}x forward)"
    )
    if cli:
        print(f"ratequant calibrate: {cli['wall_s']:.2f} s ({cli['vs_forward']:.2f}x forward), rc {cli['returncode']}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
