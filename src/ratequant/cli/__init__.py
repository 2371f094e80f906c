"""The ``ratequant`` command: a thin layer over the library; every command is also a library call.

Errors a user can fix print one line (``ratequant: error: ...``; a bad argument ``ratequant CMD: error: ...``, a
mistyped option with the one meant) and exit with status 2; an interrupt exits with 130. What they quote of
names and paths is :func:`~ratequant.validation.inert`. :data:`COMMANDS` lists every command with the module of
this package that defines it; a module is imported only when its command is parsed or run (:func:`definition`, the
one place where the command line imports lazily), so ``ratequant --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ratequant import __version__
from ratequant.errors import RateQuantError
from ratequant.registry import Registry
from ratequant.validation import inert

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """A subcommand: its ``name``, one-line ``help`` and the ``module`` of this package that defines it."""

    name: str
    help: str
    module: str


COMMANDS: Registry[Command] = Registry("command")
for _entry in (
    Command("calibrate", "fit distortion curves and allocate bits per head: writes a plan file", "calibrate"),
    Command("inspect", "summarise a plan file and draw its bits and curves", "calibrate"),
    Command(
        "compare", "every allocation method at every budget for every quantizer design: writes a report", "compare"
    ),
    Command(
        "eval",
        "perplexity and KL (or retrieval: passkey, RULER-style needles) at full precision or under a plan",
        "evaluate",
    ),
    Command("generate", "continue a prompt with the plan's mixed-precision KV cache", "evaluate"),
    Command("info", "attention geometry of a model and sizes of the corpus splits", "evaluate"),
    Command("export", "write a plan in a format other tools read (KVTuner per-head, per-layer table)", "export"),
    Command("import", "make a plan of another tool's per-head table (KVTuner)", "export"),
    Command("lm-eval", "run lm-evaluation-harness with the ratequant model (--model ratequant) available", "lm_eval"),
):
    COMMANDS.register(_entry)
_DEFINED: dict[str, tuple[Configure, Run]] = {}


def command(name: str, configure: Configure):
    """Define ``run(args) -> exit code`` as the command ``name`` of :data:`COMMANDS`, whose options
    ``configure(parser)`` adds."""
    COMMANDS.get(name)

    def bind(run: Run) -> Run:
        _DEFINED[name] = (configure, run)
        return run

    return bind


def definition(name: str) -> tuple[Configure, Run]:
    """``(configure, run)`` of the command ``name``, its module imported now (by a static import: the library never
    imports a module by a computed name)."""
    match COMMANDS.get(name).module:
        case "calibrate":
            from ratequant.cli import calibrate  # noqa: F401
        case "compare":
            from ratequant.cli import compare  # noqa: F401
        case "evaluate":
            from ratequant.cli import evaluate  # noqa: F401
        case "export":
            from ratequant.cli import export  # noqa: F401
        case "lm_eval":
            from ratequant.cli import lm_eval  # noqa: F401
    return _DEFINED[name]


def quiet_transformers() -> None:
    """Our own progress bars and messages are enough: silence transformers' loading chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: ...``, exit status 2) instead of the usage;
    ``commands`` (top level only) maps each command's name to its parser."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {inert(message)} (see {self.prog} --help)\n")


def suggestion(arg: str, parser: argparse.ArgumentParser) -> str:
    """``"; did you mean --avg-bits?"`` for a mistyped option ``arg`` (``--avg_bits``) of ``parser``, else ``""``."""
    import difflib

    if not arg.startswith("-"):
        return ""
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    flag = arg.split("=", 1)[0]
    normal = "--" + flag.lstrip("-").replace("_", "-").lower()
    close = [o for o in options if o == normal] or difflib.get_close_matches(normal, options, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def build_parser(only: str | None = None) -> Parser:
    """The command line's parser: every command listed, the options of ``only`` (default: of every command)."""
    parser = Parser(prog="ratequant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ratequant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        command_parser = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if only in (None, name):
            definition(name)[0](command_parser)
    parser.commands = dict(sub.choices)
    return parser


def check_options(tokens: list[str], parser: argparse.ArgumentParser) -> None:
    """Refuse the first ``--option`` of ``tokens`` that ``parser`` does not know (nor abbreviates), before argparse
    parses them: a mistyped option must not surface as a missing required one (``calibrate --avg_bits 3``)."""
    if any(action.nargs == argparse.REMAINDER for action in parser._actions):
        return  # a command that hands its arguments on (lm-eval) knows only some of them
    known = [option for action in parser._actions for option in action.option_strings]
    for token in tokens:
        if token == "--":
            return
        flag = token.split("=", 1)[0]
        if not token.startswith("--") or flag in known or len([o for o in known if o.startswith(flag)]) == 1:
            continue
        parser.error(f"unrecognized argument: {token[:80]}{suggestion(token, parser)}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; an unknown option is refused in one line naming the closest known one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    chosen = argv[first] if first is not None and argv[first] in COMMANDS else ""
    parser = build_parser(only=chosen)
    if chosen:
        check_options(argv[first + 1 :], parser.commands[argv[first]])
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = parser.commands[args.command]
        hint = suggestion(unknown[0], command_parser)
        command_parser.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        quiet_transformers()
        return definition(args.command)[1](args)
    except RateQuantError as exc:
        print(f"ratequant: error: {inert(exc)}", file=sys.stderr)  # messages quote names and paths from files
        return 2
    except KeyboardInterrupt:
        print("ratequant: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "Command", "Parser", "build_parser", "command", "definition", "main", "parse"]
