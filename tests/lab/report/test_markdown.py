"""The report's markdown (:mod:`ratequant.lab.report.markdown`): names read from results are inert."""

from __future__ import annotations

import json
import re

import pytest

from tests.lab.report.test_writer import SAVED_RESULTS, saved_results


def test_names_from_results_are_inert_in_the_report(tmp_path, capsys, monkeypatch):
    """A model or corpus name holding HTML, markdown, backticks and terminal escapes is shown as its characters:
    no tag, link, code-span break or escape reaches report.md or the terminal (in running text the name is a code
    span longer than any run of backticks it holds, where HTML is literal; in tables and titles it is escaped)."""
    from ratequant.lab.report import __main__ as report_main
    from ratequant.lab.report import writer

    monkeypatch.setattr(writer, "draw_figures", lambda results, folder: [])  # figure titles: the test below

    if not SAVED_RESULTS.exists():
        pytest.skip("docs/results/results.json is not in this checkout")
    model = "<script>alert(1)</script> [x](http://evil) `a``b` $\\frac$ **bold**\x1b[2J\nnext"
    corpus = "<img src=x onerror=alert(1)>|col`"

    def rename(d):
        d["model"]["name"] = model
        d["corpus"]["name"] = corpus
        for evaluation in d["evaluations"].values():
            evaluation["corpus"] = corpus

    (tmp_path / "results.json").write_text(json.dumps(saved_results(rename)))
    capsys.readouterr()
    assert report_main.main([str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "\x1b" not in report and "\x1b" not in out
    title = report.splitlines()[0]
    assert title.startswith("# ratequant compare: &lt;script&gt;") and r"\[x\]" in title and r"\$" in title
    setup = next(line for line in report.splitlines() if line.startswith("- Model: "))
    span = "```<script>alert(1)</script> [x](http://evil) `a``b` $\\frac$ **bold**\\x1b[2J next```"
    assert setup.startswith(f"- Model: {span} (") and "corpus `` <img src=x onerror=alert(1)>|col` `` (" in setup
    assert report.count("<script>") == report.count(span) == 1  # HTML only inside code spans, where it is literal
    assert report.count("<img") == report.count("`` <img src=x onerror=alert(1)>|col` ``") == 2
    row = next(line for line in report.splitlines() if "(headline)" in line)
    assert row.startswith("| &lt;img src=x onerror=alert(1)&gt;\\|col\\`, ") and len(re.findall(r"(?<!\\)\|", row)) == 6
