"""``ratequant compare``."""

from __future__ import annotations

import argparse
import time

from ratequant.calibration.settings import DEFAULT_CALIBRATION_SEQ_LEN, DEFAULT_CALIBRATION_SEQUENCES
from ratequant.cli import command
from ratequant.cli.options import (
    add_corpus_options,
    add_model_options,
    add_storage_options,
    budget_list,
    device_map_from,
    float_list,
    nonnegative_int,
    positive_int,
)
from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import BOS_CHOICES
from ratequant.inputs import models
from ratequant.inputs.corpora import load_corpus
from ratequant.lab import DEFAULT_BUDGETS, DEFAULT_DESIGNS, QUICK_SIZES, CompareConfig
from ratequant.lab import run_compare as compare
from ratequant.lab.config import EXPERIMENT_FIELDS, MODES, SCORINGS, flag_of
from ratequant.lab.report import check_output, findings, write_report
from ratequant.measure.distortion import DEFAULT_METRIC, METRICS
from ratequant.progress import Stages
from ratequant.validation import inert


def name_list(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def configure_compare(parser: argparse.ArgumentParser) -> None:

    def bits(values) -> str:
        return ",".join(f"{v:g}" for v in values)

    add_model_options(parser)
    add_corpus_options(parser)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        action="store_true",
        help=f"small run (budgets {bits(QUICK_SIZES['budgets'])}, {QUICK_SIZES['windows']} windows of "
        f"{QUICK_SIZES['seq_len']} tokens, {QUICK_SIZES['calibration']['sequences']} calibration sequences), every "
        "design in a few minutes",
    )
    preset.add_argument(
        "--full",
        action="store_true",
        help="the results of docs/results.md (2048-token windows, residual 128, four budgets, the fortunes corpus too, "
        "long-context retrieval at 4096 tokens): what make results runs",
    )
    parser.add_argument(
        "--budgets", type=budget_list, metavar="B,B,...", help=f"average code bits (default {bits(DEFAULT_BUDGETS)})"
    )
    parser.add_argument(
        "--designs",
        type=name_list,
        metavar="D,D,...",
        help=f"quantizer designs (default {','.join(DEFAULT_DESIGNS)})",
    )
    parser.add_argument("--metric", choices=METRICS, help=f"distortion metric (default {DEFAULT_METRIC})")
    parser.add_argument("--seq-len", type=positive_int, help="tokens per evaluation window (default 512)")
    parser.add_argument("--windows", type=positive_int, help="evaluation windows per corpus (default 8)")
    parser.add_argument(
        "--bos", choices=BOS_CHOICES, help="windows start with BOS: auto (as the tokenizer does, default), yes, no"
    )
    parser.add_argument(
        "--scoring", choices=SCORINGS, help="the headline scores: second-half (default, as llama.cpp) or all"
    )
    parser.add_argument(
        "--calibration-sequences",
        type=positive_int,
        help=f"calibration sequences (default {DEFAULT_CALIBRATION_SEQUENCES})",
    )
    parser.add_argument(
        "--calibration-seq-len",
        type=positive_int,
        help=f"tokens per calibration sequence (default {DEFAULT_CALIBRATION_SEQ_LEN})",
    )
    add_storage_options(
        parser,
        residual=None,  # the preset's
        sinks=None,
        notes=(
            "default 0: quantize the whole context, as the papers' figures do",
            "default 0; auto: chosen per design from the calibration data",
        ),
        auto=True,
    )
    parser.add_argument("--mode", choices=MODES, help="simulated quantization (default) or the real cache (streaming)")
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        metavar="N",
        help="streaming: tokens per forward pass (default: the quantization chunk)",
    )
    parser.add_argument(
        "--side-windows",
        type=positive_int,
        metavar="N",
        help="windows of the side evaluations (--eval-corpus, --sink-study; default: --windows)",
    )
    parser.add_argument(
        "--eval-corpus",
        dest="eval_corpora",
        action="append",
        metavar="CORPUS",
        help="also score every method on this corpus's evaluation split, e.g. fortunes (repeatable)",
    )
    parser.add_argument(
        "--long-context",
        "--passkey-context",
        dest="long_context_tokens",
        type=positive_int,
        metavar="N",
        help="also run long-context retrieval (--long-context-tasks, default passkey) at N tokens",
    )
    parser.add_argument(
        "--long-context-tasks",
        type=name_list,
        metavar="T,...",
        help="retrieval tasks of the long-context study: passkey, niah-single, ..., variable-tracking",
    )
    parser.add_argument(
        "--long-context-trials",
        "--passkey-trials",
        dest="long_context_trials",
        type=positive_int,
        metavar="N",
        help="long-context prompts per task and depth (default 2)",
    )
    parser.add_argument(
        "--long-context-depths",
        "--passkey-depths",
        dest="long_context_depths",
        type=float_list,
        metavar="D,D,...",
        help="depths of the long-context needles (default 0.1,0.5,0.9)",
    )
    parser.add_argument(
        "--peers",
        type=name_list,
        metavar="P,...",
        help="peer baselines to add: norms (layer-wise K/V from weight norms), hqq (transformers' QuantizedCache "
        "with HQQ at 2 bits in the long-context study; needs pip install -e '.[bench]')",
    )
    parser.add_argument(
        "--headroom",
        dest="headroom_designs",
        type=name_list,
        metavar="D,...",
        help="designs whose components' damage is measured alone, for the measured-damage allocator (slow)",
    )
    parser.add_argument(
        "--search",
        dest="search_proposals",
        type=nonnegative_int,
        metavar="N",
        help="also score 'RateQuant + KL search': RateQuant's widths refined by N one-bit moves on the KL they "
        "cause on calibration text, as calibrate --search does (slow: one simulated pass per move; default 0: off)",
    )
    parser.add_argument(
        "--search-tokens",
        type=positive_int,
        metavar="T",
        help="with --search: tokens of each of its two calibration windows (default 1024)",
    )
    parser.add_argument(
        "--sink-study",
        type=lambda t: tuple(int(x) for x in t.split(",")),
        metavar="S,S,...",
        help="re-score the focus design with these sink-token counts, with and without BOS",
    )
    parser.add_argument(
        "--out", default="results/compare", metavar="DIR", help="report folder (default results/compare)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite a report that exists in DIR")
    parser.add_argument(
        "--config", metavar="PATH", help="re-run a saved config.json exactly (other experiment options are refused)"
    )


def config_from(args: argparse.Namespace):
    """The :class:`CompareConfig` the options describe (or the saved one ``--config`` names)."""
    experiment = {name: getattr(args, name) for name in EXPERIMENT_FIELDS if getattr(args, name) is not None}
    if args.config:
        given = [flag_of(name) for name in experiment]
        given += [
            flag
            for flag, on in (
                ("--quick", args.quick),
                ("--full", args.full),
                ("--model", args.model != "default"),
                ("--corpus", args.corpus != "default"),
                ("--dtype", args.dtype is not None),
            )
            if on
        ]
        if given:
            raise RateQuantError(f"--config re-runs a saved configuration exactly; drop {', '.join(given)}")
        return CompareConfig.load(args.config)
    preset = "quick" if args.quick else "full" if args.full else "default"
    return CompareConfig.from_options(preset, model=args.model, corpus=args.corpus, dtype=args.dtype, **experiment)


@command("compare", configure_compare)
def run_compare(args: argparse.Namespace) -> int:

    config = config_from(args)
    check_output(args.out, args.force)
    say = Stages(True, time.perf_counter())
    corpus = load_corpus(config.corpus)
    others = {name: load_corpus(name) for name in config.eval_corpora}
    loaded = models.load_model(
        config.model,
        dtype=config.dtype,
        device=args.device,
        device_map=device_map_from(args.device_map),
        offload_folder=args.offload_folder,
        trust_remote_code=args.trust_remote_code,
    )
    say(f"loaded model {loaded.name} and corpus {', '.join([corpus.name, *others])}")
    results = compare(loaded, corpus, config, progress=say, eval_corpora=others)
    files = write_report(results, args.out, overwrite=args.force, command=config.command(args.out))
    fp = results.full_precision.score()
    lines = [
        f"full precision: perplexity {fp.ppl:.3f} ± {fp.ppl_se:.3f} on {len(fp.window_nll)} windows of the evaluation "
        f"split ({results.evaluation['scored_tokens']} scored tokens, {results.evaluation['scoring']})",
        *(f"- {line}" for line in findings(results)),
        f"report written to {files.report} (numbers in {files.results}, {len(files.files)} files)",
    ]
    for line in lines:
        print(inert(line))  # names of the model, the corpora and the folder print inert
    return 0
