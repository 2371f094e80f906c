"""Run every benchmark in ``benchmarks/`` (what ``make bench`` runs), writing JSON and PNG into ``results/``.

Each benchmark runs as its own subprocess (so one process's memory and threads do not colour the next)
with one torch thread unless ``--threads`` says otherwise; a failing benchmark is reported and the others
still run. A summary with each benchmark's command, exit status and wall time goes to
``results/bench_summary.json``. ``--quick`` shrinks every benchmark to a smoke run (seconds, for CI).

    python benchmarks/run_all.py [--quick] [--only decode_speed calibration_time]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import subprocess_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def commands(results: Path, threads: int, quick: bool) -> dict[str, list[str]]:
    t = str(threads)
    runs = {
        "quantizers": ["quantizers.py", "--threads", "1", "--out", str(results / "bench_quantizers.json")]
        + (["--bits", "2", "4", "--dtypes", "float32", "--min-time", "0.01"] if quick else []),
        "cache_memory": ["cache_memory.py", "--output", str(results / "cache_memory.json")],  # fast at full size
        "decode_speed": [
            "decode_speed.py",
            "--threads",
            t,
            "--output",
            str(results / "decode_speed.json"),
            "--plot",
            str(results / "decode_speed.png"),
        ]
        + (
            ["--contexts", "256", "512", "--new-tokens", "4", "--warmup", "1", "--calib-sequences", "1"]
            if quick
            else []
        ),
        "calibration_time": ["calibration_time.py", "--threads", t, "--output", str(results / "calibration_time.json")]
        + (["--repeats", "1", "--sequences", "1", "--seq-len", "128"] if quick else []),
        "metric_validation": ["metric_validation.py", "--out", str(results / "metric_validation.json"), "--force"]
        + (
            ["--pairs", "4", "--calib-windows", "1", "--eval-windows", "1", "--seq-len", "128", "--eval-seq-len", "128"]
            if quick
            else []
        ),
    }
    return {name: args for name, args in runs.items() if (HERE / args[0]).exists()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timed benchmarks (default 1)")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="smoke-size runs")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    runs = commands(args.results, args.threads, args.quick)
    if args.only:
        unknown = set(args.only) - set(runs)
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.only}
    env = subprocess_env(args.threads)
    summary, failed = {}, []
    for name, cmd in runs.items():
        full = [sys.executable, str(HERE / cmd[0]), *cmd[1:]]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(full, cwd=ROOT, env=env).returncode
        wall = time.perf_counter() - start
        summary[name] = {"command": ["python", f"benchmarks/{cmd[0]}", *cmd[1:]], "returncode": rc, "wall_s": wall}
        print(f"== {name}: exit {rc} after {wall:.0f} s", flush=True)
        if rc:
            failed.append(name)
    summary_json = json.dumps({"format_version": 1, "runs": summary}, indent=2) + "\n"
    (args.results / "bench_summary.json").write_text(summary_json)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
