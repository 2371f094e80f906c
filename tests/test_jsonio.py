"""The one serialiser of the files users exchange (:class:`ratequant.jsonio.JsonDocument`): every versioned
document round-trips through its file exactly, and refuses what it cannot read the same way."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from ratequant import jsonio
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.jsonio import JsonDocument
from ratequant.lab.config import CompareConfig
from ratequant.lab.results import CompareResults
from ratequant.plan import Plan
from tests.cache.helpers import UNIFORM
from tests.test_plan import make_plan, tiny_plan, write

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


# --------------------------------------------------------------------------------------------------------
# Atomic writes: results JSON and plans. A write that fails or is interrupted half-way leaves no partial file
# and no temporary file, and an existing file it was replacing keeps its old content.
# --------------------------------------------------------------------------------------------------------
class _Exploding:
    """A file handle that writes the first half of what it is given, then raises ``error``."""

    def __init__(self, handle, error):
        self.handle, self.error = handle, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise self.error

    def __getattr__(self, name):
        return getattr(self.handle, name)


def explode_writes(monkeypatch, error):
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _Exploding(real(fd, *a, **k), error))


RESULT = {"format_version": 1, "kind": "eval", "ppl": 12.5, "tokens": list(range(2000))}


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_results_json_failing_mid_write_leaves_nothing(tmp_path, monkeypatch, error):
    target = tmp_path / "out" / "results.json"
    explode_writes(monkeypatch, error)
    expected = RateQuantError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as exc:
        jsonio.write_json(target, RESULT)
    if expected is RateQuantError:
        assert "No space left on device" in str(exc.value) and "nothing was written" in str(exc.value)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_replacing_results_json_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch, error):
    target = tmp_path / "results.json"
    old = {"format_version": 1, "ppl": 1.0}
    jsonio.write_json(target, old)
    explode_writes(monkeypatch, error)
    with pytest.raises((RateQuantError, KeyboardInterrupt)):
        jsonio.write_json(target, RESULT, overwrite=True)
    assert json.loads(target.read_text()) == old
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("fail", [("link",), ("link", "replace")], ids=["link", "link-then-claim"])
def test_rename_failure_and_unwritable_folder_leave_nothing(tmp_path, monkeypatch, fail):
    """Publishing a new file (a hard link, or an exclusive claim then a rename where links are refused) fails:
    nothing is left, not even the claim."""
    target = tmp_path / "results.json"
    error = OSError(18 if len(fail) == 1 else 1, "Invalid cross-device link")  # EPERM: no hard links here
    for name in fail:
        monkeypatch.setattr(os, name, lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(RateQuantError, match="cross-device"):
        jsonio.write_json(target, RESULT)
    with pytest.raises(PlanError, match="cross-device"):
        tiny_plan().to_json(tmp_path / "plan.json")
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RateQuantError, match="cannot write"):
        jsonio.write_json(blocker / "sub" / "results.json", RESULT)  # a folder under a regular file


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()], ids=["io", "interrupt"])
def test_plan_failing_mid_write_leaves_nothing_and_keeps_the_old_plan(tmp_path, monkeypatch, error):
    old = tiny_plan(residual=0)
    path = old.to_json(tmp_path / "plan.json")
    explode_writes(monkeypatch, error)
    with pytest.raises((PlanError, KeyboardInterrupt)):
        tiny_plan().to_json(tmp_path / "new.json")
    with pytest.raises((PlanError, KeyboardInterrupt)):
        tiny_plan().to_json(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]
    assert Plan.load(path) == old


def test_results_json_refuses_nan_and_directories_and_existing_files(tmp_path):
    with pytest.raises(RateQuantError, match="refusing to write"):
        jsonio.write_json(tmp_path / "nan.json", {"ppl": float("nan")})
    with pytest.raises(RateQuantError, match="is a directory"):
        jsonio.write_json(tmp_path, RESULT, overwrite=True)
    jsonio.write_json(tmp_path / "r.json", RESULT)
    with pytest.raises(RateQuantError, match="already exists; pass --force"):
        jsonio.write_json(tmp_path / "r.json", {"other": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == RESULT
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"a": 1, "a": 2}', "duplicate field 'a'"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply|must be a JSON object"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (pickle.dumps({"a": 1}), "not UTF-8"),
    ],
)
def test_reading_results_json_refuses_hostile_files(tmp_path, content, match):
    path = write(tmp_path, content, name="results.json")
    with pytest.raises(RateQuantError, match=match) as exc:
        jsonio.read_json(path, what="compare results")
    assert str(path) in str(exc.value)


# --------------------------------------------------------------------------------------------------------
# outputs: two writers racing for one new path
# --------------------------------------------------------------------------------------------------------
TINY_GEOMETRY = Geometry(3, 2, 16, 4)


def race(monkeypatch, module, name, work):
    """Run ``work(0)`` and ``work(1)`` in two threads that both stop at ``module.name`` (a step after the
    "does the output exist?" check and before the output is published) until the other arrives there too.
    Returns what each returned or raised."""
    import threading

    barrier = threading.Barrier(2, timeout=30)
    original = getattr(module, name)

    def meet(*args, **kwargs):
        barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, meet)
    outcomes = [None, None]

    def run(i):
        try:
            outcomes[i] = work(i)
        except Exception as exc:  # the outcome is what the test checks
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_two_writers_racing_for_one_new_plan_path_one_is_refused(tmp_path, monkeypatch):
    """Both pass the "exists?" check before either publishes: the publish itself is exclusive (a hard link),
    so exactly one plan is written, whole, and the other writer gets the one-line refusal."""
    import os

    from ratequant.errors import PlanError
    from ratequant.plan import Plan

    def plan(name):
        widths = [[2, 3]] * 3
        return Plan(
            model={"name": name, **TINY_GEOMETRY.to_dict()},
            quantizer=UNIFORM.to_config(),
            budget={"kind": "avg_bits", "value": 2.5},
            allocator="test",
            avg_bits=2.5,
            bits={"key": widths, "value": widths},
        )

    plans = [plan("first"), plan("second")]
    path = tmp_path / "plan.json"
    outcomes = race(monkeypatch, os, "fsync", lambda i: plans[i].to_json(path))
    written = [i for i, o in enumerate(outcomes) if o == path]
    refused = [o for o in outcomes if isinstance(o, PlanError)]
    assert len(written) == 1 and len(refused) == 1, outcomes
    assert "already exists" in str(refused[0]) and "--force" in str(refused[0])
    assert Plan.load(path) == plans[written[0]]
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary file left by the loser
