"""The ``ratequant`` command: a thin layer over the library; every command is also a library call.

Errors a user can fix print one line (``ratequant: error: ...``; a bad argument ``ratequant CMD: error: ...``, a
mistyped option with the one meant) and exit with status 2; an interrupt exits with 130. What they quote of
names and paths is :func:`~ratequant.validation.inert`. Commands are registered in :data:`COMMANDS` by the
modules of this package (one per group).
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
    """A subcommand: its ``name``, one-line ``help``, the options ``configure(parser)`` adds, and ``run``."""

    name: str
    help: str
    configure: Configure
    run: Run


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str, configure: Configure):
    """Register ``run(args) -> exit code`` as subcommand ``name`` whose options ``configure(parser)`` adds."""

    def bind(run: Run) -> Run:
        COMMANDS.register(Command(name, help, configure, run))
        return run

    return bind


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


def build_parser() -> Parser:
    parser = Parser(prog="ratequant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ratequant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
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
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if first is not None and argv[first] in parser.commands:
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
        return COMMANDS.get(args.command).run(args)
    except RateQuantError as exc:
        print(f"ratequant: error: {inert(exc)}", file=sys.stderr)  # messages quote names and paths from files
        return 2
    except KeyboardInterrupt:
        print("ratequant: interrupted", file=sys.stderr)
        return 130


# The command modules register their commands when imported (they need `command` above).
from ratequant.cli import calibrate, compare, evaluate, export, lm_eval  # noqa: E402, F401

__all__ = ["COMMANDS", "Command", "Parser", "build_parser", "command", "main", "parse"]
