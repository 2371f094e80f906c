"""``ratequant lm-eval``: lm-evaluation-harness's command line, with the ``ratequant`` model registered.

lm-eval (0.4) finds only the models it ships or that were registered in the running Python process; it has no
entry points for other packages. This command imports :mod:`ratequant.integrations.lm_eval` (which registers
``--model ratequant``) and hands every argument after ``lm-eval`` to lm-eval's own command line, unchanged::

    ratequant lm-eval --model ratequant --model_args pretrained=default,plan=plan.json --tasks arc_easy --device cpu

Only options of this command given first are its own (``-h``, ``--threads N``); from the first other argument on,
everything is lm-eval's (``ratequant lm-eval run --help`` shows lm-eval's help). The exit status is lm-eval's.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error

from ratequant.cli import command
from ratequant.cli.options import positive_int
from ratequant.errors import RateQuantError

EPILOG = (
    "Everything from the first argument that is not an option of this command on goes to lm-eval verbatim. "
    "lm-eval's own help: ratequant lm-eval run --help. Model arguments of --model ratequant: pretrained (default, "
    "a model directory, a .gguf file), plan (a plan file; none: full precision), mode (simulated or streaming), "
    "dtype, max_length, residual, sink_tokens, allow_mismatch, trust_remote_code, and lm-eval's HFLM arguments that "
    "apply to a loaded model (add_bos_token, truncation, ...); an unknown or empty one is refused."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        metavar="LM_EVAL_ARGS",
        help="lm-eval's arguments, e.g. --model ratequant --model_args pretrained=default,plan=PLAN --tasks TASK",
    )
    # argparse gives a REMAINDER only what follows the options it reads, and refuses options it does not know
    # (lm-eval's "--model" ...): this parser reads only its own options; any other string is part of the remainder.
    own = {option for action in parser._actions for option in action.option_strings}
    parse_optional = parser._parse_optional
    parser._parse_optional = lambda arg: parse_optional(arg) if arg.split("=", 1)[0] in own else None


@command("lm-eval", configure)
def run_lm_eval(args: argparse.Namespace) -> int:
    argv = list(args.lm_eval_args)
    if argv[:1] == ["--"]:  # "ratequant lm-eval -- ARGS": the separator is ours, not lm-eval's
        argv = argv[1:]
    return run_harness(argv, threads=args.threads)


def run_harness(argv: list[str], *, threads: int | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (without the program name) in this process; its exit status."""
    from ratequant.integrations import require_lm_eval

    require_lm_eval()
    import torch
    from lm_eval.__main__ import cli_evaluate

    import ratequant.integrations.lm_eval  # noqa: F401  (registers the "ratequant" model)

    saved_argv, saved_threads = sys.argv, torch.get_num_threads()
    sys.argv = ["lm-eval", *argv]
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cli_evaluate()
    except SystemExit as exc:
        return _exit_status(exc.code)
    except _network_errors() as exc:
        raise RateQuantError(
            f"lm-eval could not download what its tasks need ({type(exc).__name__}: {exc}); tasks that fetch their "
            "data on every run (RULER's niah_* fetch essays for the haystack) need network access. Offline, "
            "ratequant eval --task niah-single (or niah-multikey, niah-multivalue, niah-multiquery, "
            "variable-tracking) builds the same kinds of prompts from a local corpus"
        ) from None
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
    return 0


def _network_errors() -> tuple[type[BaseException], ...]:
    """The errors of a download that could not reach its server: the standard library's and httpx's (which
    lm-eval's RULER tasks use)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, urllib.error.URLError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _exit_status(code: object) -> int:
    """The status Python would exit with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


__all__ = ["run_harness", "run_lm_eval"]
