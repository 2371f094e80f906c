"""The ``ratequant`` command: a thin layer over the library; every command is also a library call.

Errors a user can fix print one line (``ratequant: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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


def emit_json(args: argparse.Namespace, payload: dict) -> None:
    if args.json:
        from ratequant.jsonio import write_json

        path = write_json(args.json, payload, overwrite=args.force)
        print(f"results written to {path}")


# -- eval ------------------------------------------------------------------------------------------------
def configure_eval(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_corpus_options(parser)
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--windows", type=positive_int, default=20, help="number of windows to evaluate (default 20)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    add_output_options(parser)


@command("eval", "perplexity of a model on the evaluation split", configure_eval)
def run_eval(args: argparse.Namespace) -> int:
    from ratequant.data import load_corpus, token_windows
    from ratequant.evaluation import perplexity

    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    windows = token_windows(loaded.tokenizer, corpus.evaluation, args.seq_len, args.windows)
    result = perplexity(loaded.model, windows, batch_size=args.batch_size)
    print(
        f"perplexity {result.ppl:.3f} on {result.tokens} tokens ({result.windows} windows of {result.seq_len}) "
        f"in {result.seconds:.1f} s; model {loaded.name}, corpus {corpus.name} (evaluation split)"
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
            "mode": "full-precision",
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "ratequant_version": __version__,
        },
    )
    return 0


# -- info ------------------------------------------------------------------------------------------------
def configure_info(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_corpus_options(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the information as JSON to PATH")
    parser.add_argument("--force", action="store_true", help="overwrite output files that exist")


@command("info", "attention geometry of a model and sizes of the corpus splits", configure_info)
def run_info(args: argparse.Namespace) -> int:
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
        },
    )
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
