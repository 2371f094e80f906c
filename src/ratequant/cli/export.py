"""``ratequant export`` and ``import``: plans to and from the formats other tools read.

``export PLAN --format kvtuner --out FILE`` writes KVTuner's per-head table (JSON with string keys, or YAML with
integer keys for a ``.yaml``/``.yml`` FILE: the form KVTuner's ``per_head_config_path`` reads);
``export PLAN --format layers --out FILE`` a per-layer key/value width table (``ratequant-layers``).
``import FILE --format kvtuner (--model MODEL | --geometry L,H,D[,HEADS]) --out PLAN`` makes a plan of a KVTuner
table; ``--geometry`` states the model's layers, kv heads, head dim (and query heads) without loading it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ratequant.cli import command
from ratequant.cli.options import add_quantizer_options, add_storage_options, check_output_path
from ratequant.errors import PlanError, RateQuantError
from ratequant.inputs import models
from ratequant.integrations.kvtuner import (
    LAYER_STRATEGIES,
    YAML_SUFFIXES,
    export_layers,
    import_kvtuner,
    kvtuner_text,
    read_kvtuner,
)
from ratequant.jsonio import write_json, write_text_atomic
from ratequant.plan import Plan
from ratequant.plan_fields import bounded_geometry
from ratequant.quantizers import get_quantizer
from ratequant.spec import DEFAULT_RESIDUAL_LENGTH
from ratequant.validation import inert

EXPORT_FORMATS = ("kvtuner", "layers")
IMPORT_FORMATS = ("kvtuner",)


def geometry_arg(text: str):
    """'LAYERS,KV_HEADS,HEAD_DIM[,HEADS]' -> a Geometry within a plan's limits (before anything is allocated)."""
    parts = text.split(",")
    try:
        numbers = [int(p) for p in parts if len(p.strip()) <= 20]  # no 5,000-digit conversions
    except ValueError:
        numbers = []
    if len(numbers) not in (3, 4) or len(numbers) != len(parts):
        raise argparse.ArgumentTypeError(
            f"expected LAYERS,KV_HEADS,HEAD_DIM[,HEADS] (positive integers, e.g. 30,3,64,9), got {text[:60]!r}"
        )
    try:
        return bounded_geometry(*numbers, name="geometry", error=RateQuantError)
    except RateQuantError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- export ----------------------------------------------------------------------------------------------
def configure_export(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("plan", metavar="PLAN", help="plan file (JSON) from ratequant calibrate")
    parser.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="kvtuner: KVTuner's per-head table (YAML for a .yaml/.yml FILE, else JSON); layers: one key and one "
        "value width per layer, chosen under the plan's fitted curves",
    )
    parser.add_argument(
        "--strategy",
        choices=LAYER_STRATEGIES,
        help="with --format layers: layer-kind (a key and a value width per layer, the default) or layerwise (one "
        "width per layer for both)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the table")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


@command("export", configure_export)
def run_export(args: argparse.Namespace) -> int:

    if args.strategy is not None and args.format != "layers":
        raise RateQuantError("--strategy applies to --format layers only; drop it")
    check_output_path(args.out, args.force, what=f"{args.format} file")
    plan = Plan.load(args.plan)
    name = plan.model["name"]
    shape = f"{plan.model['num_layers']} layers x {plan.model['num_kv_heads']} kv heads"
    if args.format == "kvtuner":
        yaml = Path(args.out).suffix.lower() in YAML_SUFFIXES
        text = kvtuner_text(plan, yaml=yaml)
        path = write_text_atomic(args.out, text, overwrite=args.force, what="KVTuner file")
        say(f"KVTuner per-head table of {name} ({shape}, average {plan.avg_bits:.4f} bits)")
        say(
            "  it holds widths only: set KVTuner's quantizer, residual window and group size to match "
            f"(this plan: {plan.quantizer['name']}, residual {plan.residual_length})"
        )
        if not yaml:
            say("  KVTuner's per_head_config_path reads YAML with integer keys: write a .yaml FILE to pass it there")
        say(f"written to {path}")
        return 0
    table = export_layers(plan, strategy=args.strategy or "layer-kind")
    path = write_json(args.out, table, overwrite=args.force)
    layers = table["layers"]
    say(f"per-layer widths of {name} ({table['strategy']}, {len(layers)} layers)")
    print("  key bits   " + " ".join(str(row["key_bits"]) for row in layers))
    print("  value bits " + " ".join(str(row["value_bits"]) for row in layers))
    below = "" if table["avg_bits"] == table["plan_avg_bits"] else " (the nearest this grouping reaches below it)"
    print(f"  average {table['avg_bits']:.4f} bits; the per-head plan averages {table['plan_avg_bits']:.4f}{below}")
    predicted = table["predicted_distortion"]
    if predicted["ratio"] is not None:
        print(
            f"  predicted distortion per-head {predicted['per_head']:.4g}, per-layer {predicted['per_layer']:.4g} "
            f"({predicted['ratio']:.3f}x)"
        )
    else:
        print("  no predicted distortion: the plan has no fitted curves")
    say(f"written to {path}")
    return 0


# -- import ----------------------------------------------------------------------------------------------
def configure_import(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("file", metavar="FILE", help="the table to import (JSON, or YAML for .yaml/.yml)")
    parser.add_argument("--format", required=True, choices=IMPORT_FORMATS, help="kvtuner: KVTuner's per-head table")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="the model the table is for, to read its geometry: 'default', a model directory, a .gguf file or a hub id",
    )
    source.add_argument(
        "--geometry",
        type=geometry_arg,
        metavar="LAYERS,KV_HEADS,HEAD_DIM[,HEADS]",
        help="the model's geometry without loading it, e.g. 30,3,64,9",
    )
    parser.add_argument("--name", help="model name recorded in the plan (default: the model's, or FILE's stem)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="with --model: allow a hub model's own Python code to run"
    )
    add_quantizer_options(parser, help="the design that stores the widths (default kivi)")
    add_storage_options(
        parser,
        residual=DEFAULT_RESIDUAL_LENGTH,
        sinks=0,
        notes=(f"default {DEFAULT_RESIDUAL_LENGTH}, as KVTuner's", "default 0"),
        auto=False,
    )
    parser.add_argument("--out", required=True, metavar="PLAN", help="where to write the plan (JSON)")
    parser.add_argument("--force", action="store_true", help="overwrite PLAN if it exists")


@command("import", configure_import)
def run_import(args: argparse.Namespace) -> int:

    check_output_path(args.out, args.force, what="plan")
    if args.trust_remote_code and args.model is None:
        raise RateQuantError("--trust-remote-code applies to --model only; drop it")
    quantizer = get_quantizer(args.quantizer, **dict(args.param))
    data = read_kvtuner(args.file)  # a file that does not parse fails before any model is loaded
    if args.model is not None:
        loaded = models.load_model(args.model, trust_remote_code=args.trust_remote_code)
        geometry, default_name = loaded.geometry, loaded.name
    else:
        geometry, default_name = args.geometry, Path(args.file).stem or "kvtuner"
    try:
        plan = import_kvtuner(
            data,
            model_name=args.name or default_name,
            geometry=geometry,
            quantizer_config=quantizer,
            residual_length=args.residual,
            sink_tokens=args.sink_tokens,
        )
    except PlanError as exc:
        raise PlanError(f"KVTuner file {args.file}: {exc}") from None
    bits = plan.bits_array()
    say(
        f"plan for {plan.model['name']} from KVTuner table {args.file}: {geometry.num_layers} layers x "
        f"{geometry.num_kv_heads} kv heads, average {plan.avg_bits:.4f} bits (keys {bits[0].mean():.3f}, values "
        f"{bits[1].mean():.3f})"
    )
    say(f"  quantizer {plan.quantizer['name']} {plan.quantizer['params']}, residual window {plan.residual_length}")
    path = plan.to_json(args.out, overwrite=args.force)
    say(f"plan written to {path}")
    return 0


def say(line: str) -> None:
    """Print a line that quotes names and paths from files or the command line, inert (one terminal line)."""
    print(inert(line))
