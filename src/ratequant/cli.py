"""The ``ratequant`` command: a thin layer over the library; every command is also a library call.

Errors a user can fix print one line (``ratequant: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np

from ratequant import __version__
from ratequant.errors import RateQuantError

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Configure, Run]] = {}


def command(name: str, help: str, configure: Configure):
    """Register ``run(args) -> exit code`` as subcommand ``name`` whose options ``configure(parser)`` adds."""

    def bind(run: Run) -> Run:
        COMMANDS[name] = (help, configure, run)
        return run

    return bind


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def bitset_arg(text: str) -> tuple[int, ...]:
    """'1-8' or '2,3,4' -> sorted widths in 1..8."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            widths = tuple(range(lo, hi + 1))
        else:
            widths = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 1-8 or 2,3,4, got {text!r}") from None
    if not widths or widths[0] < 1 or widths[-1] > 8:
        raise argparse.ArgumentTypeError(f"widths must lie in 1..8, got {text!r}")
    return widths


def param_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE parsed as JSON when it can be (numbers, null, true), else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a model directory, a .gguf file or a hub id")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="convert weights (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run (off by default)")


def add_corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="default", help="'default' (pydoc topics), a UTF-8 text file, or hf:NAME[:CONFIG]")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--force", action="store_true", help="overwrite output files that exist")


def load_model_from(args: argparse.Namespace):
    from ratequant.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def check_output(args: argparse.Namespace) -> None:
    """Refuse an existing ``--json PATH`` before any work (the write itself is atomic)."""
    from pathlib import Path

    if getattr(args, "json", None) and Path(args.json).exists() and not args.force:
        raise RateQuantError(f"{args.json} already exists; pass --force to overwrite it")


def emit_json(args: argparse.Namespace, payload: dict) -> None:
    if args.json:
        from ratequant.jsonio import write_json

        path = write_json(args.json, payload, overwrite=args.force)
        print(f"results written to {path}")


# -- eval ------------------------------------------------------------------------------------------------
def add_plan_options(parser: argparse.ArgumentParser) -> None:
    from ratequant.quantizers import available

    parser.add_argument("--plan", metavar="PLAN", help="plan file (JSON) from ratequant calibrate")
    parser.add_argument("--quantizer", choices=available(), help="store with this design instead of the plan's (needs --allow-mismatch)")
    parser.add_argument("--param", type=param_arg, action="append", default=[], metavar="KEY=VALUE", help="parameter of --quantizer (repeatable)")
    parser.add_argument("--allow-mismatch", action="store_true", help="accept a quantizer other than the one the plan was calibrated for")
    parser.add_argument("--residual", type=int, metavar="N", help="full-precision residual window (default: the plan's)")


def plan_quantizer_from(args: argparse.Namespace):
    """The plan and the quantizer the user asked for (None: the plan's own)."""
    from ratequant.plan import Plan
    from ratequant.quantizers import get_quantizer

    if args.plan is None:
        if args.quantizer or args.param or args.allow_mismatch or args.residual is not None:
            raise RateQuantError("--quantizer, --param, --allow-mismatch and --residual need --plan")
        return None, None
    if args.param and not args.quantizer:
        raise RateQuantError("--param sets parameters of --quantizer; pass --quantizer too")
    plan = Plan.load(args.plan)
    quantizer = get_quantizer(args.quantizer, **dict(args.param)) if args.quantizer else None
    return plan, quantizer


def configure_eval(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_corpus_options(parser)
    add_plan_options(parser)
    parser.add_argument("--mode", choices=("simulated", "streaming"), default="simulated",
                        help="with --plan: simulated quantization on whole windows (fast, default) or token by token through the real cache")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--windows", type=positive_int, default=20, help="number of windows to evaluate (default 20)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (full precision and simulated)")
    add_output_options(parser)


@command("eval", "perplexity on the evaluation split, at full precision or under a plan", configure_eval)
def run_eval(args: argparse.Namespace) -> int:
    check_output(args)
    from ratequant.data import load_corpus, token_windows
    from ratequant.evaluation import perplexity
    from ratequant.evaluation.plans import evaluate_plan

    plan, quantizer = plan_quantizer_from(args)
    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    windows = token_windows(loaded.tokenizer, corpus.evaluation, args.seq_len, args.windows)
    if plan is None:
        result = perplexity(loaded.model, windows, batch_size=args.batch_size)
        extra, mode = {"mode": "full-precision"}, "full precision"
    else:
        evaluation = evaluate_plan(
            loaded.model, windows, plan, mode=args.mode, quantizer=quantizer,
            allow_mismatch=args.allow_mismatch, residual_length=args.residual,
        )
        result, extra = evaluation.result, {**evaluation.to_dict(), "plan": str(args.plan)}
        mode = (f"{args.mode}, {evaluation.quantizer['name']} at {evaluation.avg_bits:.3f} average bits, "
                f"{evaluation.kv_bytes_per_token:,.0f} KV bytes/token at {evaluation.kv_bytes_context} tokens")
    print(
        f"perplexity {result.ppl:.3f} on {result.tokens} tokens ({result.windows} windows of {result.seq_len}) "
        f"in {result.seconds:.1f} s; model {loaded.name}, corpus {corpus.name} (evaluation split); {mode}"
    )
    emit_json(
        args,
        {
            "format_version": 1,
            "kind": "eval",
            **result.to_dict(),
            "model": loaded.name,
            "corpus": corpus.name,
            "corpus_sha256": corpus.sha256,
            "split": "evaluation",
            **extra,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "ratequant_version": __version__,
        },
    )
    return 0


# -- generate --------------------------------------------------------------------------------------------
def configure_generate(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_plan_options(parser)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=0.8)
    parser.add_argument("--top-p", type=positive_float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    add_output_options(parser)


@command("generate", "continue a prompt with the plan's mixed-precision KV cache", configure_generate)
def run_generate(args: argparse.Namespace) -> int:
    check_output(args)
    from ratequant.generation import generate

    plan, quantizer = plan_quantizer_from(args)
    loaded = load_model_from(args)
    out = generate(
        loaded, args.prompt, plan, quantizer=quantizer, allow_mismatch=args.allow_mismatch,
        residual_length=args.residual, chat=args.chat, max_new_tokens=args.max_new_tokens,
        sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )
    print(out.text)
    print("---", file=sys.stderr)
    print(out.describe(), file=sys.stderr)
    emit_json(args, {"format_version": 1, "kind": "generate", **out.to_dict(), "model": loaded.name,
                     "plan": args.plan, "ratequant_version": __version__})
    return 0


# -- info ------------------------------------------------------------------------------------------------
def configure_info(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_corpus_options(parser)
    add_output_options(parser)


@command("info", "attention geometry of a model and sizes of the corpus splits", configure_info)
def run_info(args: argparse.Namespace) -> int:
    check_output(args)
    from ratequant import native
    from ratequant.data import load_corpus

    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    model_info = loaded.describe()
    g = loaded.geometry
    fp16_bytes = 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2
    print(f"model      {loaded.name}  ({loaded.source})")
    print(f"  layers {g.num_layers}, query heads {g.num_heads}, kv heads {g.num_kv_heads}, head dim {g.head_dim}")
    print(f"  {g.num_components} components (key and value of each kv head of each layer)")
    print(f"  dtype {model_info['dtype']}, device {model_info['device']}, {model_info['parameters']:,} parameters")
    print(f"  float16 KV cache: {fp16_bytes:,} bytes per token")
    print(f"decode     {native.describe()}")
    splits = {}
    print(f"corpus     {corpus.name}  (sha256 {corpus.sha256[:16]}...)")
    for split in ("calibration", "evaluation"):
        text = corpus.split(split)
        tokens = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        splits[split] = {"chars": len(text), "tokens": tokens}
        print(f"  {split:<12} {len(text):>9,} characters {tokens:>9,} tokens")
    emit_json(
        args,
        {
            "format_version": 1,
            "kind": "info",
            "model": {**model_info, "kv_bytes_per_token_fp16": fp16_bytes},
            "corpus": {"name": corpus.name, "sha256": corpus.sha256, "splits": splits},
            "decode": {"native": native.available(), "path": native.describe()},
        },
    )
    return 0


# -- calibrate -------------------------------------------------------------------------------------------
def configure_calibrate(parser: argparse.ArgumentParser) -> None:
    from ratequant.allocation import ALLOCATORS
    from ratequant.distortion import DEFAULT_METRIC, METRICS
    from ratequant.quantizers import available

    add_model_options(parser)
    add_corpus_options(parser)
    parser.add_argument("--quantizer", default="kivi", choices=available(), help="quantizer design (default kivi)")
    parser.add_argument("--param", type=param_arg, action="append", default=[], metavar="KEY=VALUE", help="quantizer parameter, e.g. group_size=64 (repeatable)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-bits", type=positive_float, help="budget: average code bits per element")
    budget.add_argument("--bytes-per-token", type=positive_float, help="budget: true KV bytes per token (codes, scales, zeros, residual window)")
    parser.add_argument("--context", type=positive_int, default=4096, help="context length at which the residual window is amortised for --bytes-per-token (default 4096)")
    parser.add_argument("--metric", choices=METRICS, default=DEFAULT_METRIC, help=f"distortion metric (default {DEFAULT_METRIC})")
    parser.add_argument("--allocator", choices=tuple(ALLOCATORS), default="ratequant")
    parser.add_argument("--curves-from", metavar="DESIGN", help="mismatched allocator: the design whose curves are used")
    parser.add_argument("--bits", type=bitset_arg, default=tuple(range(1, 9)), help="allowed widths, e.g. 1-8 (default) or 2,3,4,8")
    parser.add_argument("--b-min", type=positive_int, help="lowest width any component may get")
    parser.add_argument("--b-max", type=positive_int, help="highest width any component may get")
    parser.add_argument("--keep-all-widths", action="store_true",
                        help="also allow widths whose reconstruction is worse than storing the mean (e.g. 1-bit min-max)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--sequences", type=positive_int, default=4, help="calibration sequences (default 4)")
    parser.add_argument("--residual", type=int, default=128, help="full-precision residual window the cache will keep (default 128)")
    parser.add_argument("--out", required=True, metavar="PLAN", help="where to write the plan (JSON)")
    parser.add_argument("--force", action="store_true", help="overwrite PLAN if it exists")


@command("calibrate", "fit distortion curves and allocate bits per head: writes a plan file", configure_calibrate)
def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ratequant.allocation import Budget
    from ratequant.data import load_corpus
    from ratequant.pipeline import CalibrationSettings, bits_histogram, calibrate

    if Path(args.out).exists() and not args.force:
        raise RateQuantError(f"{args.out} already exists; pass --force to overwrite it")
    if args.avg_bits is not None:
        budget = Budget.avg_bits(args.avg_bits)
    else:
        budget = Budget.bytes_per_token(args.bytes_per_token, args.context)
    settings = CalibrationSettings(
        quantizer=args.quantizer, quantizer_params=dict(args.param), budget=budget, metric=args.metric,
        allocator=args.allocator, curves_from=args.curves_from, bitset=args.bits, b_min=args.b_min,
        b_max=args.b_max, seq_len=args.seq_len, sequences=args.sequences, residual_length=args.residual,
        informative_only=not args.keep_all_widths,
    )
    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    run = calibrate(loaded, corpus, settings)
    plan, fit = run.plan, run.fit
    print(f"plan for {loaded.name} with {plan.quantizer['name']}, allocator {plan.allocator}, budget {budget.describe()}")
    print(f"  fitted on {plan.calibration['tokens']} calibration tokens, metric {settings.metric}"
          + (f", curves of {settings.curves_from}" if settings.curves_from else ""))
    dropped = [b for b in settings.bitset if b not in fit.bitset]
    if dropped:
        print(f"  widths {', '.join(map(str, dropped))} left out: on the calibration data they reconstruct keys or "
              "values worse than their mean (--keep-all-widths to allow them)")
    print(f"  beta  key {fit.beta_key:.3f}   value {fit.beta_value:.3f}")
    print(f"  R^2   overall {fit.r2_overall:.4f}   worst component {float(np.min(fit.r2)):.4f}")
    bits = plan.bits_array()
    for k, kind in enumerate(("key", "value")):
        hist = "  ".join(f"{w}b:{n}" for w, n in bits_histogram(bits[k]).items())
        print(f"  {kind:<5} bits mean {bits[k].mean():.3f}   {hist}")
    bytes_text = f", {plan.bytes_per_token:,.0f} bytes/token at {settings.budget.context_tokens or 4096} tokens" if plan.bytes_per_token else ""
    print(f"  average code bits {plan.avg_bits:.4f}{bytes_text}")
    print("  time " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in run.phases.items())
          + f"; total {sum(run.phases.values()):.2f} s")
    plan.to_json(args.out, overwrite=args.force)
    print(f"plan written to {args.out}")
    return 0


# -- inspect ---------------------------------------------------------------------------------------------
def configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan file (JSON)")
    parser.add_argument("--heatmap", metavar="PNG", help="draw bits per layer and kv head for keys and values")
    parser.add_argument("--curves", metavar="PNG", help="draw measured distortion points with the fitted curves")
    parser.add_argument("--force", action="store_true", help="overwrite PNG files that exist")


@command("inspect", "summarise a plan file and draw its bits and curves", configure_inspect)
def run_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ratequant.evaluation.plots import bits_heatmap, distortion_curves
    from ratequant.plan import Plan

    plan = Plan.load(args.plan)
    plan.design()  # refuses a quantizer design that cannot be built or does not fit the plan
    print(plan.summary())
    for target in (args.heatmap, args.curves):
        if target and Path(target).exists() and not args.force:
            raise RateQuantError(f"{target} already exists; pass --force to overwrite it")
    title = f"{plan.model['name']} / {plan.quantizer['name']} / {plan.allocator} / {plan.avg_bits:.2f} bits"
    if args.heatmap:
        print(f"heatmap written to {bits_heatmap(plan.bits_array(), args.heatmap, title)}")
    if args.curves:
        if plan.fit is None or "measured" not in plan.fit:
            raise RateQuantError(f"{args.plan} holds no measured distortions (a baseline plan); nothing to draw for --curves")
        fit = plan.fit_object()
        measured = np.array([plan.fit["measured"]["key"], plan.fit["measured"]["value"]])
        path = distortion_curves(measured, fit.alpha, (fit.beta_key, fit.beta_value), fit.bitset, args.curves, title)
        print(f"curves written to {path}")
    return 0


# -- compare ---------------------------------------------------------------------------------------------
def budget_list(text: str) -> tuple[float, ...]:
    """'2,2.5,3' -> (2.0, 2.5, 3.0)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected average bits like 2,2.5,3,4, got {text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive numbers, got {text!r}")
    return values


def configure_compare(parser: argparse.ArgumentParser) -> None:
    from ratequant.compare import DEFAULT_BUDGETS, DEFAULT_DESIGNS, QUICK_SIZES
    from ratequant.distortion import DEFAULT_METRIC, METRICS

    def bits(values) -> str:
        return ",".join(f"{v:g}" for v in values)

    add_model_options(parser)
    add_corpus_options(parser)
    parser.add_argument("--quick", action="store_true",
                        help=f"small run (budgets {bits(QUICK_SIZES['budgets'])}, {QUICK_SIZES['windows']} windows of "
                             f"{QUICK_SIZES['seq_len']} tokens, {QUICK_SIZES['calibration_sequences']} calibration "
                             "sequences): what make demo runs")
    parser.add_argument("--budgets", type=budget_list, metavar="B,B,...", help=f"average code bits (default {bits(DEFAULT_BUDGETS)})")
    parser.add_argument("--designs", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), metavar="D,D,...",
                        help=f"quantizer designs (default {','.join(DEFAULT_DESIGNS)})")
    parser.add_argument("--metric", choices=METRICS, help=f"distortion metric (default {DEFAULT_METRIC})")
    parser.add_argument("--seq-len", type=positive_int, help="tokens per evaluation window (default 512)")
    parser.add_argument("--windows", type=positive_int, help="evaluation windows (default 8)")
    parser.add_argument("--calibration-sequences", type=positive_int, help="calibration sequences (default 4)")
    parser.add_argument("--calibration-seq-len", type=positive_int, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--residual", type=int, metavar="N",
                        help="full-precision residual window of the simulated cache (default 0: quantize the whole "
                             "context, as the papers' figures do)")
    parser.add_argument("--out", default="results/compare", metavar="DIR", help="report folder (default results/compare)")
    parser.add_argument("--force", action="store_true", help="overwrite a report that exists in DIR")
    parser.add_argument("--config", metavar="PATH", help="re-run a saved config.json exactly (other experiment options are refused)")


@command("compare", "every allocation method at every budget for every quantizer design: writes a report", configure_compare)
def run_compare(args: argparse.Namespace) -> int:
    import time

    from ratequant.compare import CompareConfig, Progress
    from ratequant.compare import run_compare as compare
    from ratequant.data import load_corpus
    from ratequant.models import load_model
    from ratequant.report import check_output, findings, write_report

    experiment = {name: getattr(args, name) for name in (
        "budgets", "designs", "metric", "seq_len", "windows", "calibration_sequences", "calibration_seq_len", "residual")}
    if args.config:
        given = [f"--{name.replace('_', '-')}" for name, value in experiment.items() if value is not None]
        given += [flag for flag, on in (("--quick", args.quick), ("--model", args.model != "default"),
                                        ("--corpus", args.corpus != "default"), ("--dtype", args.dtype is not None)) if on]
        if given:
            raise RateQuantError(f"--config re-runs a saved configuration exactly; drop {', '.join(given)}")
        config = CompareConfig.load(args.config)
    else:
        make = CompareConfig.quick if args.quick else CompareConfig
        config = make(model=args.model, corpus=args.corpus, dtype=args.dtype,
                      **{name: value for name, value in experiment.items() if value is not None})
    check_output(args.out, args.force)
    say = Progress(True, time.perf_counter())
    corpus = load_corpus(config.corpus)
    loaded = load_model(config.model, dtype=config.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    say(f"loaded model {loaded.name} and corpus {corpus.name}")
    results = compare(loaded, corpus, config, progress=say)
    files = write_report(results, args.out, overwrite=args.force, command=config.command(args.out))
    fp = results.full_precision
    print(f"full precision: perplexity {fp.ppl:.3f} on {len(fp.window_nll)} windows of the evaluation split")
    for line in findings(results):
        print(f"- {line}")
    print(f"report written to {files.report} (numbers in {files.results}, {len(files.files)} files)")
    return 0


def quiet_transformers() -> None:
    """Our own progress bars and messages are enough: silence transformers' loading chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# -- entry point -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratequant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ratequant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    try:
        return COMMANDS[args.command][2](args)
    except RateQuantError as exc:
        print(f"ratequant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ratequant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
