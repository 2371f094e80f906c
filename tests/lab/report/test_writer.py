"""Writing and rebuilding a report (:mod:`ratequant.lab.report.writer`): a results file with a field missing is
refused in one line and nothing is written; of two runs racing for one new report folder, one is refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ratequant.errors import RateQuantError
from tests.test_jsonio import race

# --------------------------------------------------------------------------------------------------------
# compare results read back: missing fields
# --------------------------------------------------------------------------------------------------------
SAVED_RESULTS = Path(__file__).parents[3] / "docs" / "results" / "results.json"


def saved_results(edit) -> dict:
    data = json.loads(SAVED_RESULTS.read_text(encoding="utf-8"))
    edit(data)
    return data


@pytest.mark.parametrize(
    "path, fragment",
    [
        (("model", "name"), "lack the field 'name'"),
        (("model", "dtype"), "lack the field 'dtype'"),
        (("environment",), "environment"),
        (("timings",), "timings"),
        (("primary",), "primary"),
    ],
)
def test_rebuilding_a_report_with_a_field_missing_is_one_line(tmp_path, capsys, monkeypatch, path, fragment):
    from ratequant.lab.report import __main__ as report_main
    from ratequant.lab.report import writer

    monkeypatch.setattr(writer, "draw_figures", lambda results, folder: [])  # the figures are not what is tested

    def drop(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]

    if not SAVED_RESULTS.exists():
        pytest.skip("docs/results/results.json is not in this checkout")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(saved_results(drop)))
    capsys.readouterr()
    assert report_main.main([str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ratequant: error: ") and re.search(fragment, err[0]), err
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # nothing written


# --------------------------------------------------------------------------------------------------------
# outputs: two writers racing for one new path (plans: tests/test_jsonio.py)
# --------------------------------------------------------------------------------------------------------
def test_two_compare_runs_racing_for_one_new_report_folder_one_is_refused(tmp_path, monkeypatch):
    from pathlib import Path

    from ratequant.lab.report import writer
    from ratequant.lab.results import CompareResults

    saved = Path(__file__).parents[3] / "docs" / "results" / "results.json"
    if not saved.exists():
        pytest.skip("docs/results/results.json is not in this checkout")
    results = CompareResults.load(saved)
    monkeypatch.setattr(writer, "draw_figures", lambda results, folder: [])  # the race is about the files
    out = tmp_path / "report"
    outcomes = race(monkeypatch, writer, "_remove_stale", lambda i: writer.write_report(results, out, command=str(i)))
    done = [o for o in outcomes if isinstance(o, writer.ReportFiles)]
    refused = [o for o in outcomes if isinstance(o, RateQuantError)]
    assert len(done) == 1 and len(refused) == 1, outcomes
    assert "already holds a report" in str(refused[0])
    assert sorted(p.name for p in out.iterdir()) == sorted(done[0].files)  # one whole report, no staging left
