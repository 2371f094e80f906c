"""Every subcommand fed bad arguments: exit status 2 and a message that names the problem, never a traceback.

Two kinds of refusal, both with status 2:

* argument errors (argparse): ``usage: ...`` then ``ratequant <command>: error: <what>``;
* errors found while running (:class:`~ratequant.errors.RateQuantError`): exactly one line
  ``ratequant: error: <what and what to do>``.

The generic cases run over every command registered in :data:`ratequant.cli.COMMANDS` (so commands added
later are covered); the tables below add bad values for the commands known when this was written.
Interrupted runs (Ctrl-C) exit with status 130 and leave no partial output. Unreachable budgets name
the reachable range. Cases already covered in ``tests/cli/test_cli.py`` (missing model path, bad corpus files,
``eval --seq-len 0``) and ``tests/cli/test_evaluate.py`` (quantizer mismatch) are not repeated.
"""

from __future__ import annotations

import os

import pytest

from ratequant.cli import COMMANDS, build_parser, main
from tests.cli.helpers import assert_one_line_error, assert_usage_error, run

KNOWN = ("eval", "generate", "info", "calibrate", "inspect")


# --------------------------------------------------------------------------------------------------------
# every registered command
# --------------------------------------------------------------------------------------------------------
def test_the_known_commands_are_registered():
    assert set(KNOWN) <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_and_refuses_an_unknown_option(capsys, name):
    code, out, _ = run(capsys, [name, "--help"])
    assert code == 0 and f"usage: ratequant {name}" in out
    code, _, err = run(capsys, [name, "--no-such-option"])
    assert code == 2 and "error:" in err
    assert "--no-such-option" in err or "required" in err, err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_refuses_bad_values_of_its_typed_options(capsys, name):
    """Each option that parses a number or a choice refuses garbage with status 2 and names the option."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]  # argparse has no public lookup
    checked = 0
    for action in sub._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        option = max(action.option_strings, key=len)
        if action.choices is not None:
            bad = "no-such-choice"
        elif action.type in (int, float) or getattr(action.type, "__name__", "") in ("positive_int", "positive_float"):
            bad = "not-a-number"
        else:
            continue
        code, _, err = run(capsys, [name, option, bad])
        assert code == 2 and option in err.strip().splitlines()[-1], (option, err)
        checked += 1
    assert checked or name == "inspect"


def test_unknown_and_missing_commands(capsys):
    assert_usage_error(capsys, ["no-such-command"], "invalid choice")
    code, _, err = run(capsys, [])
    assert code == 2 and "required: COMMAND" in err
    code, out, _ = run(capsys, ["--version"])
    assert code == 0 and out.startswith("ratequant ")


# --------------------------------------------------------------------------------------------------------
# bad values, command by command (argparse level)
# --------------------------------------------------------------------------------------------------------
CAL = ["calibrate", "--out", "plan.json"]

USAGE_ERRORS = [
    (["eval", "--windows", "-1"], "--windows: must be a positive integer, got -1"),
    (["eval", "--prefill-chunk", "0"], "--prefill-chunk: must be a positive integer, got 0"),
    ([*CAL, "--avg-bits", "3", "--sink-tokens", "100000"], "--sink-tokens: at most 65536 sink tokens"),
    ([*CAL, "--avg-bits", "3", "--sink-tokens", "some"], "--sink-tokens: expected a non-negative integer"),
    (["eval", "--mode", "fast"], "--mode: invalid choice"),
    (["eval", "--dtype", "float64"], "--dtype: invalid choice"),
    (["eval", "--quantizer", "bogus"], "--quantizer: invalid choice"),
    (["eval", "--param", "no-equals-sign"], "expected KEY=VALUE"),
    (["info", "--dtype", "int8"], "--dtype: invalid choice"),
    ([*CAL], "one of the arguments --avg-bits --bytes-per-token is required"),
    (["calibrate", "--avg-bits", "3"], "the following arguments are required: --out"),
    ([*CAL, "--avg-bits", "3", "--bytes-per-token", "100"], "not allowed with argument"),
    ([*CAL, "--avg-bits", "0"], "--avg-bits: must be a positive number, got 0"),
    ([*CAL, "--avg-bits", "-2"], "must be a positive number"),
    ([*CAL, "--avg-bits", "nan"], "must be a positive number, got nan"),
    ([*CAL, "--avg-bits", "inf"], "must be a positive number, got inf"),
    ([*CAL, "--avg-bits", "three"], "expected a number, got 'three'"),
    ([*CAL, "--bytes-per-token", "1e999"], "must be a positive number"),
    ([*CAL, "--avg-bits", "3", "--bits", "0-9"], "widths must lie in 1..8"),
    ([*CAL, "--avg-bits", "3", "--bits", "5-2"], "widths must lie in 1..8"),
    ([*CAL, "--avg-bits", "3", "--bits", "two,four"], "expected widths like 1-8"),
    ([*CAL, "--avg-bits", "3", "--b-min", "0"], "--b-min: must be a positive integer"),
    ([*CAL, "--avg-bits", "3", "--context", "-1"], "--context: must be a positive integer"),
    ([*CAL, "--avg-bits", "3", "--sequences", "1.5"], "expected a positive integer, got '1.5'"),
    ([*CAL, "--avg-bits", "3", "--param", "=3"], "expected KEY=VALUE"),
    ([*CAL, "--avg-bits", "3", "--metric", "l1"], "--metric: invalid choice"),
    ([*CAL, "--avg-bits", "3", "--allocator", "best"], "--allocator: invalid choice"),
    ([*CAL, "--avg-bits", "3", "--quantizer", "int4"], "--quantizer: invalid choice"),
    (["inspect"], "the following arguments are required: plan"),
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
    (["generate", "--prompt", "x", "--temperature", "0"], "--temperature: must be a number from 0.01 to 100"),
    (["generate", "--prompt", "x", "--top-p", "-0.5"], "--top-p: must be a number from 1e-06 to 1"),
    (["generate", "--prompt", "x", "--seed", "abc"], "--seed: expected a non-negative integer"),
]


@pytest.mark.parametrize("argv, fragment", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_bad_arguments_are_usage_errors(capsys, argv, fragment):
    if argv[0] not in COMMANDS:
        pytest.skip(f"{argv[0]} is not registered")
    assert_usage_error(capsys, argv, fragment)


MISTYPED = [
    (["calibrate", "--avg_bits", "3"], "unrecognized argument: --avg_bits; did you mean --avg-bits?"),
    ([*CAL, "--avg-bits", "3", "--seqlen", "64"], "unrecognized argument: --seqlen; did you mean --seq-len?"),
    (["eval", "--Plan", "p.json"], "unrecognized argument: --Plan; did you mean --plan?"),
    (["eval", "--windws=3"], "unrecognized argument: --windws=3; did you mean --windows?"),
    (["eval", "--zzzz"], "unrecognized argument: --zzzz (see"),
    (["eval", "plan.json", "extra.json"], "unrecognized argument: extra.json (see"),
]


@pytest.mark.parametrize("argv, fragment", MISTYPED, ids=[" ".join(a) for a, _ in MISTYPED])
def test_a_mistyped_option_is_one_line_naming_the_closest_one(capsys, argv, fragment):
    """Not twenty lines of usage: one line with the option meant, and where the rest are listed."""
    code, out, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"ratequant {argv[0]}: error: ") and fragment in lines[0], err
    assert lines[0].endswith(f"(see ratequant {argv[0]} --help)")


def test_every_argument_error_is_one_line(capsys):
    for argv, _ in USAGE_ERRORS[:6]:
        code, _, err = run(capsys, argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "usage:" not in err, err


# --------------------------------------------------------------------------------------------------------
# errors found while running: one line
# --------------------------------------------------------------------------------------------------------
def test_run_time_errors_are_one_line(tmp_path, capsys, corpus_file, tiny_model_dir):
    model = ["--model", str(tiny_model_dir)]
    cal = ["calibrate", *model, "--corpus", str(corpus_file), "--seq-len", "16", "--sequences", "1", "--avg-bits", "3"]
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    cases = [
        (["eval", "--quantizer", "kivi"], "need --plan"),
        (["eval", "--plan", str(tmp_path / "missing.json")], "plan file not found"),
        (["eval", "--corpus", str(tmp_path / "missing.txt")], "corpus file not found"),
        (["eval", "--corpus", str(tmp_path)], "not a regular file"),
        (["info", "--model", str(tmp_path)], "holds no config.json"),
        (["info", "--model", str(existing)], "neither a model directory nor a .gguf file"),
        (["info", "--model", str(tmp_path / "missing.gguf")], "model file not found"),
        (["info", *model, "--corpus", "hf:"], "dataset"),
        ([*cal, "--out", str(existing)], "already exists; pass --force"),
        ([*cal, "--out", str(tmp_path / "p.json"), "--param", "group_size=-1"], "group_size"),
        ([*cal, "--out", str(tmp_path / "p.json"), "--param", "nosuch=1"], "has no parameter(s) nosuch"),
        (["inspect", str(tmp_path / "missing.json")], "plan file not found"),
        (["inspect", str(existing)], "no format_version"),
        (["generate", *model, "--prompt", "x", "--param", "group_size=4"], "need --plan"),
        (["generate", *model, "--prompt", "x", "--plan", "p.json", "--param", "group_size=4"], "pass --quantizer too"),
        (["generate", *model, "--prompt", ""], "prompt is empty"),
    ]
    for argv, fragment in cases:
        if argv[0] in COMMANDS:
            assert_one_line_error(capsys, argv, fragment)
    assert_usage_error(capsys, [*cal, "--out", str(tmp_path / "p.json"), "--residual", "-5"], "from 0 to")
    assert not (tmp_path / "p.json").exists() and existing.read_text() == "{}"


def test_inspect_refuses_to_overwrite_pictures_and_to_draw_missing_curves(
    tmp_path, capsys, corpus_file, tiny_model_dir
):
    plan = tmp_path / "plan.json"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus_file),
                "--seq-len",
                "16",
                "--sequences",
                "1",
                "--avg-bits",
                "3",
                "--allocator",
                "uniform",
                "--residual",
                "0",
                "--out",
                str(plan),
            ]
        )
        == 0
    )
    png = tmp_path / "bits.png"
    png.write_bytes(b"keep me")
    assert_one_line_error(capsys, ["inspect", str(plan), "--heatmap", str(png)], "already exists; pass --force")
    assert png.read_bytes() == b"keep me"
    from ratequant.plan import Plan

    baseline = Plan.load(plan).to_dict()
    baseline["fit"] = None
    Plan.from_dict(baseline).to_json(tmp_path / "baseline.json")
    assert_one_line_error(
        capsys,
        ["inspect", str(tmp_path / "baseline.json"), "--curves", str(tmp_path / "c.png")],
        "holds no measured distortions",
    )
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------------------------------------
# budgets that cannot be met name the reachable range
# --------------------------------------------------------------------------------------------------------
BUDGETS = [
    (["--avg-bits", "9"], "reachable averages lie in [2, 8]"),
    (["--avg-bits", "0.5"], "reachable averages lie in [2, 8]"),
    (["--avg-bits", "1.5", "--b-min", "2"], "reachable averages lie in [2, 8]"),
    (["--avg-bits", "5", "--b-max", "4"], "reachable averages lie in [2, 4]"),
    (
        ["--avg-bits", "2.9", "--bits", "2,4"],
        "with widths (2, 4) over 12 components; reachable averages lie in [2, 4]; nearest reachable: 2.83333 and 3",
    ),
    (["--avg-bits", "2.5", "--allocator", "uniform"], "nearest reachable: 2 and 3"),
    (["--avg-bits", "2.25", "--allocator", "kv-split"], "nearest reachable: 2 and 2.5"),
    (["--bytes-per-token", "10", "--context", "64"], "10 bytes per token is outside the reachable range ["),
    (["--avg-bits", "3", "--b-min", "6", "--b-max", "5"], "b_min"),
]


@pytest.mark.parametrize("budget, fragment", BUDGETS, ids=[" ".join(b) for b, _ in BUDGETS])
def test_unreachable_budgets_name_the_reachable_range(tmp_path, capsys, corpus_file, tiny_model_dir, budget, fragment):
    out = tmp_path / "plan.json"
    # turbo: every width 1..8 is informative (its 1-bit codebook beats the mean), so the range is the bitset's
    assert_one_line_error(
        capsys,
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--quantizer",
            "turbo",
            "--seq-len",
            "16",
            "--sequences",
            "1",
            "--residual",
            "0",
            *budget,
            "--out",
            str(out),
        ],
        fragment,
    )
    assert not out.exists()


def test_unreachable_average_is_refused_before_any_work(tmp_path, capsys):
    line = assert_one_line_error(
        capsys,
        ["calibrate", "--model", "/nonexistent/model", "--avg-bits", "9", "--out", str(tmp_path / "p.json")],
        "reachable averages lie in [2, 8]",
    )
    assert "/nonexistent/model" not in line


def test_residual_window_that_the_design_cannot_use_is_refused(tmp_path, capsys, corpus_file, tiny_model_dir):
    out = tmp_path / "plan.json"
    code, _, err = run(
        capsys,
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--quantizer",
            "kivi",
            "--seq-len",
            "16",
            "--sequences",
            "1",
            "--avg-bits",
            "3",
            "--residual",
            "7",
            "--out",
            str(out),
        ],
    )
    assert code == 2 and "multiple" in err and not out.exists()


# --------------------------------------------------------------------------------------------------------
# interrupted and failing runs leave nothing behind
# --------------------------------------------------------------------------------------------------------
def leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_interrupted_calibration_exits_130_and_writes_no_plan(
    tmp_path, capsys, monkeypatch, corpus_file, tiny_model_dir
):
    import ratequant.calibration

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ratequant.calibration, "calibrate", interrupted)
    out = tmp_path / "plans" / "plan.json"
    code, _, err = run(
        capsys,
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--seq-len",
            "16",
            "--sequences",
            "1",
            "--avg-bits",
            "3",
            "--out",
            str(out),
        ],
    )
    assert code == 130 and err.strip() == "ratequant: interrupted"
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize(
    "error, status",
    [(KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), 2)],
    ids=["interrupt", "disk-full"],
)
def test_calibration_failing_while_writing_the_plan_leaves_no_file(
    tmp_path, capsys, monkeypatch, corpus_file, tiny_model_dir, error, status
):
    def fail(*args, **kwargs):
        raise error

    out = tmp_path / "plan.json"
    previous = tmp_path / "previous.json"
    argv = [
        "calibrate",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        str(corpus_file),
        "--quantizer",
        "uniform",
        "--seq-len",
        "16",
        "--sequences",
        "1",
        "--avg-bits",
        "3",
        "--residual",
        "0",
    ]
    assert main([*argv, "--out", str(previous)]) == 0
    kept = previous.read_bytes()
    monkeypatch.setattr(os, "replace", fail)  # publishing over a file
    monkeypatch.setattr(os, "link", fail)  # publishing a new file exclusively
    for target, force in ((out, []), (previous, ["--force"])):
        code, _, err = run(capsys, [*argv, "--out", str(target), *force])
        assert code == status, err
    assert leftovers(tmp_path) == ["previous.json"] and previous.read_bytes() == kept


def test_interrupted_eval_writes_no_results(tmp_path, capsys, monkeypatch, corpus_file, tiny_model_dir):
    import ratequant.jsonio

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "eval.json"
    monkeypatch.setattr(os, "replace", interrupted)
    monkeypatch.setattr(os, "link", interrupted)  # a new file is published by a hard link
    code, _, err = run(
        capsys,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--seq-len",
            "16",
            "--windows",
            "1",
            "--json",
            str(out),
        ],
    )
    assert code == 130 and "interrupted" in err and leftovers(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr(ratequant.jsonio.json, "dumps", interrupted)  # before any file is opened
    code, _, _ = run(capsys, ["info", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--json", str(out)])
    assert code == 130 and leftovers(tmp_path) == []


def test_interrupted_picture_leaves_no_partial_png(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    from ratequant.lab.report.plots import bits_heatmap

    def half_then_interrupt(self, fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half_then_interrupt)
    import numpy as np

    with pytest.raises(KeyboardInterrupt):
        bits_heatmap(np.full((2, 3, 2), 3), tmp_path / "bits.png")
    assert leftovers(tmp_path) == []


def test_existing_results_path_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import ratequant.inputs.models

    out = tmp_path / "eval.json"
    out.write_text("{}")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the output path exists")

    monkeypatch.setattr(ratequant.inputs.models, "load_model", must_not_load)
    assert_one_line_error(capsys, ["eval", "--json", str(out)], "already exists; pass --force")


def test_a_corpus_name_a_plan_cannot_hold_is_refused_before_the_calibration(tmp_path, tiny_model_dir, capsys):
    """A corpus file whose name is not UTF-8 would calibrate, then fail to write the plan: refused before."""
    import os

    name = os.fsdecode(b"text-\xff.txt")  # a byte no UTF-8 name holds (kept as a lone surrogate)
    (tmp_path / name).write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    plan = tmp_path / "plan.json"
    argv = ["calibrate", "--model", str(tiny_model_dir), "--corpus", str(tmp_path / name), "--avg-bits", "3"]
    assert_one_line_error(capsys, [*argv, "--out", str(plan)], "is not valid UTF-8")
    assert not plan.exists()
