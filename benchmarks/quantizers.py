"""Throughput and true storage of every quantizer design, against a plain copy measured in the same run.

For each design, bit width (default 2, 3, 4, 8), input dtype (float32, float16) and tensor kind (key,
value), on one realistic block (default ``[1, 3, 4096, 64]``: one layer of SmolLM2-135M's KV heads over
4096 tokens), it times

* ``quantize``      float input -> packed codes + metadata,
* ``dequantize``    packed -> float output,
* ``fake_quantize`` float -> float without packing (the path of distortion measurement),
* ``clone``         a plain copy of the same float tensor (the memory-bandwidth yardstick),

and reports GB/s of the *float* tensor (``x.numel() * x.element_size()`` bytes, read for quantize, written
for dequantize) so every number is comparable with the copy, plus bits per element from the design's
formula and from the packed object's real ``nbytes()``. Timings are medians of repeated runs after a
warm-up; the copy is re-timed beside every row (``clone_gbps``) because a shared machine drifts. On a
busy 2-core machine ``--threads 1`` gives steadier numbers (two threads spin against each other).
Results go to a JSON file with ``format_version``.

    python benchmarks/quantizers.py --out results/bench_quantizers.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from _common import machine_info, write_result
from ratequant.quantizers import available, get_quantizer

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_seconds(fn, min_time: float, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median wall time of ``fn()`` over at least ``min_reps`` runs and ``min_time`` seconds (1 warm-up)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synced_seconds(fn, *, sync, min_time: float) -> float:
    """:func:`median_seconds` of ``fn()`` followed by ``sync()`` (the device's synchronize; None on the CPU)."""
    if sync is None:
        return median_seconds(fn, min_time)

    def wrapped():
        fn()
        sync()

    return median_seconds(wrapped, min_time)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(args.shape)
    gen = torch.Generator().manual_seed(args.seed)
    base = torch.randn(*shape, generator=gen)
    results = []
    baselines = {}
    for dtype_name in args.dtypes:
        x = base.to(device=device, dtype=DTYPES[dtype_name])
        float_bytes = x.numel() * x.element_size()
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        timed = partial(synced_seconds, sync=sync, min_time=args.min_time)
        clone_s = timed(x.clone)
        baselines[dtype_name] = {"seconds": clone_s, "gbps": float_bytes / clone_s / 1e9}  # run start
        for name in args.designs:
            design = get_quantizer(name)
            for kind in args.kinds:
                for bits in args.bits:
                    q = design.quantize(x, bits, kind)
                    row = {
                        "design": name,
                        "config": design.to_config(),
                        "dtype": dtype_name,
                        "kind": kind,
                        "bits": bits,
                        "bits_per_element_formula": design.bits_per_element(shape[-1], bits, kind),
                        "bits_per_element_measured": 8 * q.nbytes() / x.numel(),
                        "nbytes": q.nbytes(),
                        "float_bytes": float_bytes,
                    }
                    for op, fn in (
                        ("quantize", partial(design.quantize, x, bits, kind)),
                        ("dequantize", partial(design.dequantize, q)),
                        ("fake_quantize", partial(design.fake_quantize, x, bits, kind)),
                    ):
                        s = timed(fn)
                        row[f"{op}_seconds"] = s
                        row[f"{op}_gbps"] = float_bytes / s / 1e9
                    # the copy again, right beside this row's timings: on a shared machine the
                    # bandwidth drifts, and ratios against a contemporaneous copy stay meaningful
                    row["clone_gbps"] = float_bytes / timed(x.clone) / 1e9
                    results.append(row)
                    print(
                        f"{name:8s} {dtype_name:8s} {kind:5s} {bits}b  "
                        f"bpe {row['bits_per_element_measured']:6.3f}  "
                        f"q {row['quantize_gbps']:6.2f}  dq {row['dequantize_gbps']:6.2f}  "
                        f"fake {row['fake_quantize_gbps']:6.2f}  clone {row['clone_gbps']:6.2f} GB/s",
                        flush=True,
                    )
    return {
        "format_version": FORMAT_VERSION,
        "benchmark": "quantizers",
        "machine": machine_info() | {"device": str(device)},
        "settings": {
            "shape": list(shape),
            "dtypes": args.dtypes,
            "bits": args.bits,
            "kinds": args.kinds,
            "designs": args.designs,
            "min_time_s": args.min_time,
            "seed": args.seed,
            "gbps_definition": "bytes of the float tensor (input of quantize, output of dequantize) / median s",
        },
        "clone_baseline": baselines,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench_quantizers.json"))
    p.add_argument("--shape", type=int, nargs=4, default=[1, 3, 4096, 64], metavar=("B", "H", "T", "D"))
    p.add_argument("--designs", nargs="+", default=available())
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=sorted(DTYPES))
    p.add_argument("--kinds", nargs="+", default=["key", "value"], choices=["key", "value"])
    p.add_argument("--min-time", type=float, default=0.05, help="seconds of timing per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = time.perf_counter() - t0
    write_result(args.out, report)
    print(f"wrote {args.out} ({report['wall_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
