"""Argument types and the options several commands share (model, corpus, plan, outputs)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from ratequant.compat.placement import STRATEGIES
from ratequant.errors import RateQuantError
from ratequant.inputs import models
from ratequant.jsonio import parse_json, read_json, write_json
from ratequant.lab.report.plots import check_figure_path
from ratequant.plan import Plan
from ratequant.quantizers import available, get_quantizer
from ratequant.spec import MAX_SINK_TOKENS
from ratequant.validation import check_json_value, inert


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


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value <= 2**62:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**62, got {value}")
    return value


def sink_arg(text: str) -> int | str:
    """'auto' or a non-negative number of sink tokens (at most :data:`~ratequant.spec.MAX_SINK_TOKENS`)."""
    if text == "auto":
        return text
    value = nonnegative_int(text)
    if value > MAX_SINK_TOKENS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SINK_TOKENS} sink tokens, got {value}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    """'0.1,0.5,0.9' -> (0.1, 0.5, 0.9)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.1,0.5,0.9, got {text!r}") from None
    return values


def bounded_float(lo: float, hi: float):
    """An argument type: a number from ``lo`` to ``hi``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be a number from {lo:g} to {hi:g}, got {text}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M), a model directory, a .gguf file or a hub id",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="convert weights (default: the checkpoint's)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread the model over devices and disk instead: auto, balanced, balanced_low_0, sequential, "
        'a JSON object {"model.layers.0": 0, ..., "model.layers.29": "disk"} or a JSON file',
    )
    parser.add_argument(
        "--offload-folder", metavar="DIR", help="where --device-map puts disk-offloaded weights (default: a temp dir)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run (off by default)"
    )


def add_corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus", default="default", help="'default' (pydoc topics), a UTF-8 text file, or hf:NAME[:CONFIG]"
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--force", action="store_true", help="overwrite output files that exist")


def device_map_from(text: str | None) -> str | dict | None:
    """``--device-map``: a strategy name as given, else the JSON object it holds or names, read by the strict
    parser of plans (bounded size and nesting, finite numbers, no repeated keys; one-line errors)."""
    if text is None or text.strip() in STRATEGIES:
        return text
    path = Path(text.strip()).expanduser()
    if text.strip().startswith("{"):
        data = parse_json(text, what="the --device-map value")
    elif path.exists():
        data = read_json(path, what="device map file")
    else:
        return text  # placement says what it takes
    return check_json_value(data, "the device map", max_depth=1, max_items=1 << 16)  # flat, bounded numbers


def load_model_from(args: argparse.Namespace):

    return models.load_model(  # looked up now: a stand-in put on the module reaches the command
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=device_map_from(args.device_map),
        offload_folder=args.offload_folder,
        trust_remote_code=args.trust_remote_code,
    )


def check_output_path(path: str | None, force: bool, *, what: str = "output", figure: bool = False) -> None:
    """Before any work: refuse an output that exists (unless ``force``), is a directory, has no figure extension
    (``figure``), or cannot be written (a probe file is written and removed in its folder, or in the nearest
    folder above it that exists: missing folders are created only when the output is written)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise RateQuantError(f"{target} is a directory; pass a file path for the {what}")
    if figure:
        check_figure_path(target)
    if (target.exists() or target.is_symlink()) and not force:  # a dangling link too: writing would replace it
        raise RateQuantError(f"{target} already exists; pass --force to overwrite it")
    folder = target.parent if str(target.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise RateQuantError(f"cannot write the {what} {target}: {folder} is not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RateQuantError(f"cannot write the {what} {target}: {exc.strerror or exc}; choose another path") from None


def check_output(args: argparse.Namespace) -> None:
    """Check ``--json PATH`` before any work (the write itself is atomic)."""
    check_output_path(getattr(args, "json", None), args.force, what="results file")


def emit_json(args: argparse.Namespace, payload: dict) -> None:
    if args.json:
        path = write_json(args.json, payload, overwrite=args.force)
        print(inert(f"results written to {path}"))


def add_quantizer_options(
    parser: argparse.ArgumentParser,
    default: str | None = "kivi",
    help: str = "quantizer design (default kivi)",
    param_help: str = "quantizer parameter, e.g. group_size=64 (repeatable)",
    extra_choices: tuple[str, ...] = (),
) -> None:
    """``--quantizer`` (a registered design, or one of ``extra_choices``) and the repeatable ``--param KEY=VALUE``."""
    parser.add_argument("--quantizer", default=default, choices=[*available(), *extra_choices], help=help)
    parser.add_argument("--param", type=param_arg, action="append", default=[], metavar="KEY=VALUE", help=param_help)


def add_plan_options(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--plan`` and the overrides of the plan's storage; with ``positional`` the plan may also be given as the
    command's one positional argument (``ratequant eval plan.json``), as ``inspect`` takes it."""
    if positional:
        parser.add_argument("plan_file", nargs="?", metavar="PLAN", help="plan file (JSON), the same as --plan PLAN")
    parser.add_argument("--plan", metavar="PLAN", help="plan file (JSON) from ratequant calibrate")
    add_quantizer_options(
        parser,
        default=None,
        help="store with this design instead of the plan's (needs --allow-mismatch)",
        param_help="parameter of --quantizer (repeatable)",
    )
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="accept a quantizer other than the one the plan was calibrated for",
    )
    add_storage_options(parser, residual=None, sinks=None, notes=("default: the plan's",) * 2, auto=False)


def add_storage_options(
    parser: argparse.ArgumentParser,
    *,
    residual: int | None,
    sinks: int | str | None,
    notes: tuple[str, str],
    auto: bool,
) -> None:
    """``--residual N`` and ``--sink-tokens N`` (``N|auto`` where ``auto``: chosen from the calibration data), what a
    cache keeps at full precision, declared in one place. ``residual``/``sinks`` are the parsed defaults (None: decided
    after parsing); ``notes`` say the defaults in the two helps."""
    parser.add_argument(
        "--residual",
        type=nonnegative_int,
        default=residual,
        metavar="N",
        help=f"full-precision residual window of the cache ({notes[0]})",
    )
    parser.add_argument(
        "--sink-tokens",
        type=sink_arg if auto else nonnegative_int,
        default=sinks,
        metavar="N|auto" if auto else "N",
        help=f"first tokens of every sequence kept at full precision ({notes[1]})",
    )


def read_plan(args: argparse.Namespace):
    """Check the plan options and read ``--plan`` (None without one), before the model is loaded, so that a
    bad combination or a bad file fails at once."""
    positional = getattr(args, "plan_file", None)
    if positional is not None:
        if args.plan is not None and args.plan != positional:
            raise RateQuantError(f"two plans given ({positional} and --plan {args.plan}); pass one")
        args.plan = positional
    if args.plan is None:
        if (
            args.quantizer
            or args.param
            or args.allow_mismatch
            or args.residual is not None
            or args.sink_tokens is not None
        ):
            raise RateQuantError("--quantizer, --param, --allow-mismatch, --residual and --sink-tokens need --plan")
        return None
    if args.param and not args.quantizer:
        raise RateQuantError("--param sets parameters of --quantizer; pass --quantizer too")
    return Plan.load(args.plan)


def spec_for(args: argparse.Namespace, plan, model):
    """The :class:`KVQuantSpec` ``plan`` resolves to on ``model`` with the user's overrides (None without a plan)."""
    if plan is None:
        return None
    quantizer = get_quantizer(args.quantizer, **dict(args.param)) if args.quantizer else None
    return plan.resolve(
        model,
        quantizer,
        residual_length=args.residual,
        sink_tokens=args.sink_tokens,
        allow_mismatch=args.allow_mismatch,
    )


def budget_list(text: str) -> tuple[float, ...]:
    """'2,2.5,3' -> (2.0, 2.5, 3.0)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected average bits like 2,2.5,3,4, got {text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive numbers, got {text!r}")
    return values
