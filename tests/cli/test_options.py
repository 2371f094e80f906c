"""Options every command shares (:mod:`ratequant.cli.options`): ``--trust-remote-code`` is off unless given and
reaches load_model, output paths are checked before the work, and hostile ``--device-map`` values are one line."""

from __future__ import annotations

import re

import pytest

from ratequant.cli import COMMANDS, build_parser, main
from ratequant.errors import RateQuantError
from ratequant.inputs import models
from tests.cli.helpers import assert_one_line_error
from tests.test_plan import write


# --------------------------------------------------------------------------------------------------------
# trust_remote_code is False unless the user asks, through every CLI command that loads a model
# (load_model itself: tests/inputs/test_models.py)
# --------------------------------------------------------------------------------------------------------
def command_parsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices  # argparse has no public lookup


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_flag_is_off_unless_given(name):
    flags = [a for a in command_parsers()[name]._actions if "--trust-remote-code" in a.option_strings]
    loads_a_model = any("--model" in a.option_strings for a in command_parsers()[name]._actions)
    assert len(flags) == int(loads_a_model), name  # every command that takes --model offers the flag
    for flag in flags:
        assert flag.default is False and flag.nargs == 0 and flag.const is True


MINIMAL = {
    "eval": [],
    "info": [],
    "generate": ["--prompt", "x"],
    "calibrate": ["--avg-bits", "3", "--out", "{tmp}/plan.json"],
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_cli_commands_pass_the_flag_to_load_model(name, tmp_path, capsys, monkeypatch):
    if name not in COMMANDS:
        pytest.skip(f"{name} is not registered")
    seen = []

    def fake_load_model(spec=None, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        raise RateQuantError("stopped by the test")

    monkeypatch.setattr(models, "load_model", fake_load_model)
    argv = [name, "--model", "some-model", *[a.format(tmp=tmp_path) for a in MINIMAL[name]]]
    assert main(argv) == 2 and main([*argv, "--trust-remote-code"]) == 2
    assert seen == [False, True]
    assert capsys.readouterr().err.count("ratequant: error: stopped by the test") == 2


# --------------------------------------------------------------------------------------------------------
# Careless users, round two: each case failed once (a traceback, silent garbage, a lost or deleted file) and must
# now end in one clear line with exit status 2, or in the right result. The number in a test's name is the item of
# the reliability issue's list.
# --------------------------------------------------------------------------------------------------------
def test_3_json_outputs_are_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    assert_one_line_error(
        capsys, ["info", "--json", str(tmp_path / "blocker" / "x.json")], "cannot write the results file"
    )
    assert_one_line_error(capsys, ["calibrate", "--avg-bits", "3", "--out", str(tmp_path)], "is a directory")


# --------------------------------------------------------------------------------------------------------
# hostile device maps, in a file or inline
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, match",
    [
        ('{"model.layers.0": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
        ('{"model.layers.0": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit"),
        ('{"model.layers.0": ' + "9" * 4000 + "}", "too large to store"),
        ('{"model.layers.0": [[0]]}', "nested more than 1 levels deep"),
        ('{"a": 0, "a": 1}', "duplicate field"),
    ],
    ids=["deep", "5000-digits", "4000-digits", "nested", "duplicate"],
)
@pytest.mark.parametrize("where", ["file", "inline"])
def test_hostile_device_maps_are_one_line(tmp_path, capsys, content, match, where):
    value = content
    if where == "file":
        value = str(write(tmp_path, content, name="map.json"))
    capsys.readouterr()
    code = main(["info", "--device-map", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ratequant: error: "), err
    assert re.search(match, err[0]) and len(err[0]) < 400
