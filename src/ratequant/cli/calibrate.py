"""``ratequant calibrate`` and ``inspect``."""

from __future__ import annotations

import argparse

import numpy as np

from ratequant import calibration
from ratequant.allocation import STRATEGIES, Budget
from ratequant.calibration import CalibrationSettings
from ratequant.calibration.report import describe_run
from ratequant.calibration.settings import DEFAULT_CALIBRATION_SEQ_LEN, DEFAULT_CALIBRATION_SEQUENCES
from ratequant.cli import command
from ratequant.cli.options import (
    add_corpus_options,
    add_model_options,
    add_quantizer_options,
    add_storage_options,
    bitset_arg,
    check_output_path,
    load_model_from,
    nonnegative_int,
    positive_float,
    positive_int,
)
from ratequant.errors import RateQuantError
from ratequant.inputs.corpora import load_corpus
from ratequant.lab.report.plots import bits_heatmap, distortion_curves
from ratequant.measure.distortion import DEFAULT_METRIC, METRICS
from ratequant.plan import Plan
from ratequant.progress import note
from ratequant.quantizers import available
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, DEFAULT_RESIDUAL_LENGTH
from ratequant.validation import inert


def configure_calibrate(parser: argparse.ArgumentParser) -> None:

    add_model_options(parser)
    add_corpus_options(parser)
    add_quantizer_options(
        parser,
        help="quantizer design (default kivi); auto: calibrate every design and keep the plan with the least "
        "held-out KL at the same true bytes",
        extra_choices=("auto",),
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-bits", type=positive_float, help="budget: average code bits per element")
    budget.add_argument(
        "--bytes-per-token",
        type=positive_float,
        help="budget: true KV bytes per token (codes, scales, zeros, residual window)",
    )
    parser.add_argument(
        "--context",
        type=positive_int,
        help="with --bytes-per-token: the context length over which the residual window and the sink tokens are "
        f"amortised (default {DEFAULT_CONTEXT_TOKENS})",
    )
    parser.add_argument(
        "--metric", choices=METRICS, default=DEFAULT_METRIC, help=f"distortion metric (default {DEFAULT_METRIC})"
    )
    parser.add_argument(
        "--allocator",
        choices=tuple(STRATEGIES),
        default="ratequant",
        help="which components share a width: " + "; ".join(f"{n}: {c.summary}" for n, c in STRATEGIES.items()),
    )
    parser.add_argument(
        "--curves-from",
        metavar="DESIGN",
        choices=available(),
        help="allocate with another design's distortion curves (the paper's distortion-model mismatch)",
    )
    parser.add_argument(
        "--bits",
        type=bitset_arg,
        help="allowed widths, e.g. 1-8 or 2,3,4,8 (default 2-8: 1 bit hurts more than modelled)",
    )
    parser.add_argument("--b-min", type=positive_int, help="lowest width any component may get")
    parser.add_argument("--b-max", type=positive_int, help="highest width any component may get")
    parser.add_argument(
        "--keep-all-widths",
        action="store_true",
        help="also allow widths whose reconstruction is worse than storing the mean (e.g. 1-bit min-max)",
    )
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=DEFAULT_CALIBRATION_SEQ_LEN,
        help=f"tokens per calibration sequence (default {DEFAULT_CALIBRATION_SEQ_LEN})",
    )
    parser.add_argument(
        "--sequences",
        type=positive_int,
        default=DEFAULT_CALIBRATION_SEQUENCES,
        help=f"calibration sequences (default {DEFAULT_CALIBRATION_SEQUENCES})",
    )
    add_storage_options(
        parser,
        residual=DEFAULT_RESIDUAL_LENGTH,
        sinks="auto",
        notes=(f"default {DEFAULT_RESIDUAL_LENGTH}", "default auto: chosen from the calibration data"),
        auto=True,
    )
    parser.add_argument(
        "--search",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="then refine the widths by N one-bit moves, each kept when the KL from full precision on a "
        "window of calibration text falls, all kept only if they help on a held-out window too (slow: one "
        "simulated pass per move, about 2.5 s per 1,024 tokens on a 135M model; default 0: off)",
    )
    parser.add_argument(
        "--search-tokens",
        type=positive_int,
        default=1024,
        help="with --search: tokens of each of its two windows of the calibration split, the one it searches "
        "and the held-out one its moves must also help (default 1024)",
    )
    parser.add_argument(
        "--no-choice",
        action="store_true",
        help="keep RateQuant's allocation without scoring it against the fixed key/value splits of the budget on "
        "held-out calibration text (faster; by default the candidate with the least KL there is the plan)",
    )
    parser.add_argument(
        "--choice-tokens",
        type=positive_int,
        help="tokens of the held-out window that scores the candidates (default 1024, more with a "
        "long residual window)",
    )
    parser.add_argument("--out", required=True, metavar="PLAN", help="where to write the plan (JSON)")
    parser.add_argument("--force", action="store_true", help="overwrite PLAN if it exists")


@command("calibrate", configure_calibrate)
def run_calibrate(args: argparse.Namespace) -> int:

    check_output_path(args.out, args.force, what="plan")
    if args.avg_bits is not None:
        if args.context is not None:
            raise RateQuantError(
                "--context applies to --bytes-per-token budgets only; drop it or pass --bytes-per-token"
            )
        budget = Budget.avg_bits(args.avg_bits)
    else:
        budget = Budget.bytes_per_token(args.bytes_per_token, args.context or DEFAULT_CONTEXT_TOKENS)
    settings = CalibrationSettings(
        quantizer=args.quantizer,
        quantizer_params=dict(args.param),
        budget=budget,
        metric=args.metric,
        strategy=args.allocator,
        curves_from=args.curves_from,
        **({} if args.bits is None else {"bitset": args.bits}),
        b_min=args.b_min,
        b_max=args.b_max,
        seq_len=args.seq_len,
        sequences=args.sequences,
        residual_length=args.residual,
        sink_tokens=args.sink_tokens,
        informative_only=not args.keep_all_widths,
        search_proposals=args.search,
        search_tokens=args.search_tokens,
        choose=not args.no_choice,
        choice_tokens=args.choice_tokens,
    )
    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    for what, name in (("corpus", corpus.name), ("model", loaded.name)):  # the plan records both: check before work
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise RateQuantError(
                f"the {what} name {inert(name)} is not valid UTF-8 and cannot be written into a plan; rename it"
            ) from None
    run = calibration.calibrate(loaded, corpus, settings)  # looked up now: a stand-in on the package reaches it
    used = run.plan.calibration["tokens"] // settings.seq_len
    if used < settings.sequences:
        note(f"the calibration split holds only {used} sequence(s) of {settings.seq_len} tokens; all of them were used")
    print("\n".join(describe_run(run, settings, loaded)))
    run.plan.to_json(args.out, overwrite=args.force)
    print(f"plan written to {args.out}")
    return 0


# -- inspect ---------------------------------------------------------------------------------------------
def configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan file (JSON)")
    parser.add_argument("--heatmap", metavar="PNG", help="draw bits per layer and kv head for keys and values")
    parser.add_argument("--curves", metavar="PNG", help="draw measured distortion points with the fitted curves")
    parser.add_argument("--force", action="store_true", help="overwrite PNG files that exist")


@command("inspect", configure_inspect)
def run_inspect(args: argparse.Namespace) -> int:

    plan = Plan.load(args.plan)
    plan.design()  # refuses a quantizer design that cannot be built or does not fit the plan
    print(plan.summary())
    for target in (args.heatmap, args.curves):
        check_output_path(target, args.force, what="figure", figure=True)
    title = f"{plan.model['name']} / {plan.quantizer['name']} / {plan.allocator} / {plan.avg_bits:.2f} bits"
    if args.heatmap:
        print(f"heatmap written to {bits_heatmap(plan.bits_array(), args.heatmap, title)}")
    if args.curves:
        if plan.fit is None or "measured" not in plan.fit:
            raise RateQuantError(
                f"{args.plan} holds no measured distortions (a baseline plan); nothing to draw for --curves"
            )
        fit = plan.fit_object()
        measured = np.array([plan.fit["measured"]["key"], plan.fit["measured"]["value"]])
        path = distortion_curves(measured, fit.alpha, (fit.beta_key, fit.beta_value), fit.bitset, args.curves, title)
        print(f"curves written to {path}")
    return 0
