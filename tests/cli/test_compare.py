"""``ratequant compare`` (:mod:`ratequant.cli.compare`): what it refuses in one line before the run. (The comparison
and its report end to end: tests/lab/test_compare.py.)"""

from __future__ import annotations

import json

from tests.cli.helpers import assert_one_line_error


# --------------------------------------------------------------------------------------------------------
# Careless users, round two: each case failed once (a traceback, silent garbage, a lost or deleted file) and must
# now end in one clear line with exit status 2, or in the right result. The number in a test's name is the item of
# the reliability issue's list.
# --------------------------------------------------------------------------------------------------------
def test_3_compare_into_an_unwritable_folder_fails_before_the_run(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    assert_one_line_error(
        capsys, ["compare", "--quick", "--out", str(tmp_path / "blocker" / "report")], "cannot write the report"
    )


def test_8_a_compare_config_with_nested_designs_is_one_line(tmp_path, capsys):
    from ratequant.lab import CompareConfig

    data = CompareConfig().to_dict()
    data["designs"] = [["kivi"]]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    assert_one_line_error(capsys, ["compare", "--config", str(path), "--out", str(tmp_path / "out")], "design names")


def test_8_a_compare_search_on_text_that_is_never_quantized_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--residual", "128", "--search", "2", "--search-tokens", "100", "--out", str(out)]
    assert_one_line_error(capsys, argv, "residual window (128)")
    assert not out.exists()  # refused before the report folder is made
