"""``ratequant calibrate`` and ``inspect``."""

from __future__ import annotations

import argparse

import numpy as np

from ratequant.calibration.settings import DEFAULT_CALIBRATION_SEQ_LEN, DEFAULT_CALIBRATION_SEQUENCES
from ratequant.cli import command
from ratequant.cli.options import (
    add_corpus_options,
    add_model_options,
    add_quantizer_options,
    bitset_arg,
    check_output_path,
    load_model_from,
    nonnegative_int,
    positive_float,
    positive_int,
    sink_arg,
)
from ratequant.errors import RateQuantError
from ratequant.progress import note
from ratequant.validation import inert


def configure_calibrate(parser: argparse.ArgumentParser) -> None:
    from ratequant.allocation import STRATEGIES
    from ratequant.measure.distortion import DEFAULT_METRIC, METRICS
    from ratequant.quantizers import available
    from ratequant.spec import DEFAULT_CONTEXT_TOKENS, DEFAULT_RESIDUAL_LENGTH

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
    parser.add_argument(
        "--residual",
        type=int,
        default=DEFAULT_RESIDUAL_LENGTH,
        help=f"full-precision residual window the cache will keep (default {DEFAULT_RESIDUAL_LENGTH})",
    )
    parser.add_argument(
        "--sink-tokens",
        type=sink_arg,
        default="auto",
        metavar="N|auto",
        help="first tokens of every sequence kept at full precision (default auto: chosen from the calibration data)",
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


@command("calibrate", "fit distortion curves and allocate bits per head: writes a plan file", configure_calibrate)
def run_calibrate(args: argparse.Namespace) -> int:

    from ratequant.allocation import Budget
    from ratequant.calibration import CalibrationSettings, bits_histogram, calibrate
    from ratequant.inputs.corpora import load_corpus
    from ratequant.spec import DEFAULT_CONTEXT_TOKENS

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
    run = calibrate(loaded, corpus, settings)
    plan, fit = run.plan, run.fit
    print(
        f"plan for {inert(loaded.name)} with {plan.quantizer['name']}, allocator {plan.allocator}, budget "
        f"{budget.describe()}"
    )
    used = plan.calibration["tokens"] // settings.seq_len
    if used < settings.sequences:
        note(f"the calibration split holds only {used} sequence(s) of {settings.seq_len} tokens; all of them were used")
    print(
        f"  fitted on {plan.calibration['tokens']} calibration tokens, metric {settings.metric}"
        + (f", curves of {settings.curves_from}" if settings.curves_from else "")
    )
    for line in floor_lines(run.curves.component_min_bits(), settings.bitset[0]):
        print(f"  {line}")
    c = plan.calibration
    if run.candidates:
        windows = run.candidate_windows
        scored = ", ".join(
            f"{name} {kl:.4f}" + (f" ({windows[name]} windows)" if windows[name] > 1 else "")
            for name, kl in sorted(run.candidates.items(), key=lambda kv: kv[1])
        )
        print(
            f"  candidates by mean KL on held-out calibration windows of {c['choice_tokens']} tokens (second halves "
            f"scored; close ones on more windows): {scored}"
        )
        print(
            f"  chosen: {run.chosen}"
            + (f" (requested budget {c['requested_budget']})" if "requested_budget" in c else "")
        )
    if "search_kl" in c:
        starts = ", ".join(
            f"{k.removeprefix('search_kl_')} {v:.4f}"
            for k, v in c.items()
            if k.startswith("search_kl_") and k != "search_kl_start"
        )
        print(
            f"  KL search on {c['search_tokens']} calibration tokens (starts: {starts}): from {c['search_start']} "
            f"{c['search_kl_start']:.4f} to {c['search_kl']:.4f} ({c['search_moves_kept']} of "
            f"{c['search_proposals']} moves kept, {c['phases']['search']:.0f} s)"
        )
        if "search_kept" in c:
            verdict = "kept" if c["search_kept"] else f"dropped: the plan is {c['search_start']}"
            print(
                f"  on a held-out window: {c['search_held_out_kl_start']:.4f} -> {c['search_held_out_kl']:.4f}, "
                f"the moves {verdict}"
            )
    print(f"  beta  key {fit.beta_key:.3f}   value {fit.beta_value:.3f}")
    print(f"  R^2   overall {fit.r2_overall:.4f}   worst component {float(np.min(fit.r2)):.4f}")
    bits = plan.bits_array()
    for k, kind in enumerate(("key", "value")):
        hist = "  ".join(f"{w}b:{n}" for w, n in bits_histogram(bits[k]).items())
        print(f"  {kind:<5} bits mean {bits[k].mean():.3f}   {hist}")
    print(f"  average code bits {plan.avg_bits:.4f}")
    if plan.bytes_per_token:
        dtype = str(loaded.dtype).removeprefix("torch.")
        print(
            f"  memory: {loaded.geometry.against_full_precision(plan.bytes_per_token, dtype, loaded.dtype.itemsize)} "
            f"at {plan.stated_context_tokens:,} tokens of context, codes, scales and zeros, the {plan.residual_length} "
            "newest tokens (the residual window) and the sinks at full precision included"
        )
    chosen = " (chosen from the calibration data)" if settings.sink_tokens == "auto" else ""
    print(f"  sink tokens kept at full precision: {plan.sink_tokens}{chosen}")
    print(
        "  time "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in run.phases.items())
        + f"; total {sum(run.phases.values()):.2f} s"
    )
    plan.to_json(args.out, overwrite=args.force)
    print(f"plan written to {args.out}")
    return 0


def floor_lines(floors: np.ndarray, narrowest: int, shown: int = 4) -> list[str]:
    """What the per-component floors ``[2, L, H]`` leave out, a line per kind that has any above ``narrowest``."""
    lines = []
    for k, kind in enumerate(("keys", "values")):
        high = np.argwhere(floors[k] > narrowest)
        if not len(high):
            continue
        named = ", ".join(f"layer {layer} kv-head {head} at {floors[k, layer, head]}" for layer, head in high[:shown])
        more = f" and {len(high) - shown} more" if len(high) > shown else ""
        lines.append(
            f"{kind}: {len(high)} of {floors[k].size} components start above {narrowest} bits ({named}{more}): "
            "narrower widths reconstruct them worse than their mean (--keep-all-widths to allow them)"
        )
    return lines


# -- inspect ---------------------------------------------------------------------------------------------
def configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan file (JSON)")
    parser.add_argument("--heatmap", metavar="PNG", help="draw bits per layer and kv head for keys and values")
    parser.add_argument("--curves", metavar="PNG", help="draw measured distortion points with the fitted curves")
    parser.add_argument("--force", action="store_true", help="overwrite PNG files that exist")


@command("inspect", "summarise a plan file and draw its bits and curves", configure_inspect)
def run_inspect(args: argparse.Namespace) -> int:

    from ratequant.lab.report.plots import bits_heatmap, distortion_curves
    from ratequant.plan import Plan

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
