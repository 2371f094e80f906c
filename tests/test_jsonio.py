"""The one serialiser of the files users exchange (:class:`ratequant.jsonio.JsonDocument`): every versioned
document round-trips through its file exactly, and refuses what it cannot read the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratequant.errors import RateQuantError
from ratequant.jsonio import JsonDocument
from ratequant.lab.config import CompareConfig
from ratequant.lab.results import CompareResults
from ratequant.plan import Plan
from tests.test_plan import make_plan

SAVED_RESULTS = Path(__file__).parents[1] / "docs" / "choice" / "results.json"

DOCUMENTS = {
    "plan": make_plan,
    "compare config": lambda: CompareConfig.quick(budgets=(2.5,), designs=("kivi",)),
    "compare results": lambda: CompareResults.load(SAVED_RESULTS),
}


def test_every_versioned_document_uses_the_one_serialiser():
    assert {cls.DOCUMENT for cls in (Plan, CompareConfig, CompareResults)} == set(DOCUMENTS)
    assert all(issubclass(cls, JsonDocument) for cls in (Plan, CompareConfig, CompareResults))


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_file_round_trip_is_exact(tmp_path, name):
    document = DOCUMENTS[name]()
    path = document.to_json(tmp_path / "doc.json")
    again = type(document).load(path)
    assert again.to_dict() == document.to_dict()
    assert again.to_json_text() == path.read_text(encoding="utf-8")
    with pytest.raises(RateQuantError, match="already exists"):
        document.to_json(path)


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: [d], "must be a JSON object"),
        (lambda d: {k: v for k, v in d.items() if k != "format_version"}, "has no format_version"),
        (lambda d: {**d, "format_version": "2"}, "format_version must be an integer"),
        (lambda d: {**d, "format_version": 999}, "newer than this ratequant reads .* upgrade ratequant"),
        (lambda d: {**d, "format_version": 0}, "no longer read"),
    ],
)
def test_unreadable_versions_are_refused_naming_the_file(tmp_path, name, edit, match):
    document = DOCUMENTS[name]()
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(edit(document.to_dict())), encoding="utf-8")
    with pytest.raises(type(document).ERROR, match=match) as info:
        type(document).load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
