"""``ratequant compare``."""

from __future__ import annotations

import argparse

from ratequant.cli import command
from ratequant.cli.options import add_corpus_options, add_model_options, budget_list, positive_int
from ratequant.errors import RateQuantError


def configure_compare(parser: argparse.ArgumentParser) -> None:
    from ratequant.distortion import DEFAULT_METRIC, METRICS
    from ratequant.experiments import DEFAULT_BUDGETS, DEFAULT_DESIGNS, QUICK_SIZES

    def bits(values) -> str:
        return ",".join(f"{v:g}" for v in values)

    add_model_options(parser)
    add_corpus_options(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small run (budgets {bits(QUICK_SIZES['budgets'])}, {QUICK_SIZES['windows']} windows of "
        f"{QUICK_SIZES['seq_len']} tokens, {QUICK_SIZES['calibration_sequences']} calibration "
        "sequences): what make demo runs",
    )
    parser.add_argument(
        "--budgets", type=budget_list, metavar="B,B,...", help=f"average code bits (default {bits(DEFAULT_BUDGETS)})"
    )
    parser.add_argument(
        "--designs",
        type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
        metavar="D,D,...",
        help=f"quantizer designs (default {','.join(DEFAULT_DESIGNS)})",
    )
    parser.add_argument("--metric", choices=METRICS, help=f"distortion metric (default {DEFAULT_METRIC})")
    parser.add_argument("--seq-len", type=positive_int, help="tokens per evaluation window (default 512)")
    parser.add_argument("--windows", type=positive_int, help="evaluation windows (default 8)")
    parser.add_argument("--calibration-sequences", type=positive_int, help="calibration sequences (default 4)")
    parser.add_argument(
        "--calibration-seq-len", type=positive_int, help="tokens per calibration sequence (default 512)"
    )
    parser.add_argument(
        "--residual",
        type=int,
        metavar="N",
        help="full-precision residual window of the simulated cache (default 0: quantize the whole "
        "context, as the papers' figures do)",
    )
    parser.add_argument(
        "--out", default="results/compare", metavar="DIR", help="report folder (default results/compare)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite a report that exists in DIR")
    parser.add_argument(
        "--config", metavar="PATH", help="re-run a saved config.json exactly (other experiment options are refused)"
    )


@command(
    "compare", "every allocation method at every budget for every quantizer design: writes a report", configure_compare
)
def run_compare(args: argparse.Namespace) -> int:
    import time

    from ratequant.data import load_corpus
    from ratequant.experiments import CompareConfig
    from ratequant.experiments import run_compare as compare
    from ratequant.models import load_model
    from ratequant.progress import Stages
    from ratequant.report import check_output, findings, write_report

    experiment = {
        name: getattr(args, name)
        for name in (
            "budgets",
            "designs",
            "metric",
            "seq_len",
            "windows",
            "calibration_sequences",
            "calibration_seq_len",
            "residual",
        )
    }
    if args.config:
        given = [f"--{name.replace('_', '-')}" for name, value in experiment.items() if value is not None]
        given += [
            flag
            for flag, on in (
                ("--quick", args.quick),
                ("--model", args.model != "default"),
                ("--corpus", args.corpus != "default"),
                ("--dtype", args.dtype is not None),
            )
            if on
        ]
        if given:
            raise RateQuantError(f"--config re-runs a saved configuration exactly; drop {', '.join(given)}")
        config = CompareConfig.load(args.config)
    else:
        make = CompareConfig.quick if args.quick else CompareConfig
        config = make(
            model=args.model,
            corpus=args.corpus,
            dtype=args.dtype,
            **{name: value for name, value in experiment.items() if value is not None},
        )
    check_output(args.out, args.force)
    say = Stages(True, time.perf_counter())
    corpus = load_corpus(config.corpus)
    loaded = load_model(config.model, dtype=config.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    say(f"loaded model {loaded.name} and corpus {corpus.name}")
    results = compare(loaded, corpus, config, progress=say)
    files = write_report(results, args.out, overwrite=args.force, command=config.command(args.out))
    fp = results.full_precision
    print(
        f"full precision: perplexity {fp.ppl:.3f} on {len(fp.window_nll)} windows of the evaluation split "
        f"({results.evaluation['scored_tokens']} scored tokens)"
    )
    for line in findings(results):
        print(f"- {line}")
    print(f"report written to {files.report} (numbers in {files.results}, {len(files.files)} files)")
    return 0
