"""calibrate and inspect (:mod:`ratequant.cli.calibrate`) end to end: what they refuse in one line before any work,
what they say, and what they print of the names a plan holds."""

from __future__ import annotations

import json

import pytest

from ratequant.cli import main
from tests.cli.helpers import assert_one_line_error, run
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_plan import edited, set_path, write
from tests.test_validation import HOSTILE_NAME


# --------------------------------------------------------------------------------------------------------
# Careless users, round two: each case failed once (a traceback, silent garbage, a lost or deleted file) and must
# now end in one clear line with exit status 2, or in the right result. The number in a test's name is the item of
# the reliability issue's list.
# --------------------------------------------------------------------------------------------------------
def plan_dict(layers: int, heads: int, quantizer=None) -> dict:
    bits = [[3] * heads for _ in range(layers)]
    return {
        "format_version": 2,
        "model": {"name": "huge", "num_layers": layers, "num_kv_heads": heads, "head_dim": 64},
        "quantizer": quantizer or {"name": "kivi", "params": {}},
        "budget": {"kind": "avg_bits", "value": 3.0},
        "allocator": "uniform",
        "avg_bits": 3.0,
        "bits": {"key": bits, "value": bits},
    }


def test_2_a_heatmap_too_large_to_draw_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(plan_dict(64, 4096)))
    assert_one_line_error(capsys, ["inspect", str(path), "--heatmap", str(tmp_path / "h.png")], "too large to draw")
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize(
    "target, extra, fragment",
    [
        ("picture.txt", [], "a figure must end in .png, .pdf, .svg"),
        ("a-folder", ["--force"], "is a directory"),
        ("blocker/inside.png", [], "cannot write the figure"),
    ],
)
def test_3_figure_outputs_that_cannot_be_written_are_refused_before_drawing(tmp_path, capsys, target, extra, fragment):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(2, 2)))
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert_one_line_error(capsys, ["inspect", str(path), "--heatmap", str(tmp_path / target), *extra], fragment)


def test_4_a_seed_too_large_is_refused_on_the_command_line_and_in_a_plan(tmp_path, capsys):
    assert_one_line_error(
        capsys,
        [
            "calibrate",
            "--quantizer",
            "turbo",
            "--param",
            f"seed={2**64}",
            "--avg-bits",
            "3",
            "--out",
            str(tmp_path / "p.json"),
        ],
        "seed must be",
    )
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(2, 2, {"name": "turbo", "params": {"seed": 2**64}})))
    assert_one_line_error(capsys, ["inspect", str(path)], "too large")


def test_9_calibration_says_when_the_split_holds_fewer_sequences_than_asked(capsys, tmp_path, tiny_model_dir, corpus):
    code, out, err = run(
        capsys,
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus),
            "--avg-bits",
            "3",
            "--seq-len",
            "64",
            "--sequences",
            "1000",
            "--out",
            str(tmp_path / "p.json"),
        ],
    )
    assert code == 0 and "ratequant: note: the calibration split holds only" in err


# --------------------------------------------------------------------------------------------------------
# a plan whose quantizer design cannot be built (the library's refusal: tests/test_plan.py)
# --------------------------------------------------------------------------------------------------------
def test_inspect_refuses_a_plan_whose_design_cannot_be_built(tmp_path, capsys):
    path = write(tmp_path, edited(lambda d: set_path(d, ("quantizer", "params", "group_size"), -4)))
    code = main(["inspect", str(path)])
    assert code == 2 and "group_size" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# what ratequant prints of names it reads is inert (the escaping itself: tests/test_validation.py)
# --------------------------------------------------------------------------------------------------------
def test_cli_prints_names_from_plans_and_errors_inert(tmp_path, capsys):
    """``inspect`` of a plan whose model and corpus names hold escapes, and the error of applying it to another
    model: one line each, the escapes shown, never sent to the terminal."""
    from ratequant.plan import Plan
    from ratequant.progress import Stages, note

    widths = [[3, 3]] * 3
    plan = Plan(
        model={"name": HOSTILE_NAME, "num_layers": 3, "num_kv_heads": 2, "head_dim": 16, "num_heads": 4},
        quantizer={"name": "uniform", "params": {}},
        budget={"kind": "avg_bits", "value": 3.0},
        allocator="test\x1b[31m",
        avg_bits=3.0,
        bits={"key": widths, "value": widths},
        calibration={"corpus": HOSTILE_NAME, "corpus_sha256": None, "tokens": 1, "seconds": 0.0},
    ).to_json(tmp_path / "plan.json")
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert not any(line.startswith("ratequant: error: fake") for line in out.splitlines())
    assert r"m\x1b]0;pwned\x07" in out
    other = tmp_path / "other"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert main(["eval", "--model", str(other), "--plan", str(plan), "--seq-len", "40", "--windows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "\x1b" not in err[0] and r"made for m\x1b]0;pwned" in err[0]
    Stages(True)(f"loaded {HOSTILE_NAME}")
    note(HOSTILE_NAME)
    err = capsys.readouterr().err
    assert "\x1b" not in err and len(err.strip().splitlines()) == 2
