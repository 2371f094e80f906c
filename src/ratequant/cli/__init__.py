"""The ``ratequant`` command: a thin layer over the library; every command is also a library call.

Errors a user can fix print one line (``ratequant: error: ...``) and exit with status 2; an interrupt exits
with 130. Commands are registered in :data:`COMMANDS` by the modules of this package (one per group).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ratequant import __version__
from ratequant.errors import RateQuantError
from ratequant.registry import Registry

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratequant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ratequant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        quiet_transformers()
        return COMMANDS.get(args.command).run(args)
    except RateQuantError as exc:
        print(f"ratequant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ratequant: interrupted", file=sys.stderr)
        return 130


# The command modules register their commands when imported (they need `command` above).
from ratequant.cli import calibrate, compare, evaluate, export, lm_eval  # noqa: E402, F401

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]
