"""Hostile and damaged files: every one is refused with a clear error, through the library and the CLI.

Plans are read by :meth:`ratequant.plan.Plan.load` and by ``ratequant inspect`` / ``eval --plan``; each bad
file must give a :class:`~ratequant.errors.PlanError` naming the file (library) and exit status 2 with one
line ``ratequant: error: ...`` and no traceback (CLI). Nothing is ever unpickled: a pickle renamed
``.json`` whose unpickling would create a marker file is refused and the marker never appears. Results
(JSON) and plans are written atomically: a write that fails or is interrupted half-way leaves no partial
file and no temporary file, and an existing file it was replacing keeps its old content.

Tests that already cover neighbouring cases: ``tests/test_plan.py`` (field-by-field validation, NaN and
Infinity in one field, a 100000-deep top-level list, top-level duplicate keys, files over the size limit,
newer format versions, and a hypothesis fuzz of the parsed dict).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratequant import jsonio
from ratequant.cache import RateQuantCache
from ratequant.cache.simulate import simulated_quantization
from ratequant.cli import main
from ratequant.compat import model_geometry
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.plan import Plan
from ratequant.quantizers import get_quantizer
from tests.conftest import tiny_model

# the geometry of conftest's tiny Llama (and of the tiny_model_dir fixture)
TINY = Geometry(num_layers=3, num_kv_heads=2, head_dim=16, num_heads=4)
BITS = np.array([[[2, 3], [4, 2], [3, 3]], [[2, 2], [3, 1], [4, 2]]])


def make_plan(geometry: Geometry = TINY, bits: np.ndarray = BITS, quantizer=None, residual: int = 8) -> Plan:
    quantizer = quantizer or get_quantizer("uniform")
    avg = float(bits.mean())
    return Plan(
        model={"name": "tiny-llama", **geometry.to_dict()},
        quantizer=quantizer.to_config() if hasattr(quantizer, "to_config") else quantizer,
        budget={"kind": "avg_bits", "value": avg},
        allocator="test",
        avg_bits=avg,
        bits={"key": bits[0].tolist(), "value": bits[1].tolist()},
        residual_length=residual,
    )


VALID_TEXT = make_plan().to_json_text()
VALID = json.loads(VALID_TEXT)


def write(tmp_path, content: str | bytes, name: str = "plan.json"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def edited(edit) -> str:
    """The valid plan's JSON text after ``edit(d)`` changes its parsed dict in place."""
    d = json.loads(VALID_TEXT)
    edit(d)
    return json.dumps(d)


def assert_refused(path, match: str, capsys) -> None:
    """Plan.load raises PlanError naming ``path`` and matching ``match``; ``ratequant inspect`` exits 2 with it."""
    with pytest.raises(PlanError, match=match) as exc:
        Plan.load(path)
    assert str(path) in str(exc.value)
    capsys.readouterr()
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("ratequant: error: "), err
    assert str(path) in lines[0] and "Traceback" not in err and out == ""


def set_path(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


# --------------------------------------------------------------------------------------------------------
# damaged bytes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.33, 0.5, 0.9, 0.999])
def test_truncated_files_are_refused(tmp_path, capsys, fraction):
    cut = int(len(VALID_TEXT.rstrip()) * fraction)
    assert_refused(write(tmp_path, VALID_TEXT[:cut]), "not valid JSON", capsys)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not valid JSON"),
        (b"   \n\t ", "not valid JSON"),
        (b"null", "must be a JSON object"),
        (b'"a plan"', "must be a JSON object"),
        (VALID_TEXT.encode("utf-16"), "not UTF-8"),  # a text editor's "Unicode"
        (VALID_TEXT.replace('"tiny-llama"', '"tiny-llam\u00e9"').encode("latin-1"), "not UTF-8"),
        (VALID_TEXT.encode().replace(b"{", b"{\x00", 1), "not valid JSON"),
        (bytes(range(256)) * 4, "not UTF-8"),
    ],
    ids=["empty", "whitespace", "null", "string", "utf16", "latin1", "nul", "binary"],
)
def test_corrupted_and_non_utf8_files_are_refused(tmp_path, capsys, content, match):
    assert_refused(write(tmp_path, content), match, capsys)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_random_byte_damage_gives_plan_error_or_an_exact_plan(tmp_path, data):
    """Truncations, flipped bytes and inserted bytes: PlanError, or a valid plan that round-trips exactly."""
    raw = bytearray(VALID_TEXT.encode())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        action = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if action == "truncate":
            del raw[at:]
        elif action == "flip" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif raw:
            del raw[at]
    path = write(tmp_path, bytes(raw), name="fuzz.json")
    try:
        plan = Plan.load(path)
    except PlanError as exc:
        assert str(path) in str(exc)
        return
    assert Plan.from_dict(json.loads(plan.to_json_text())) == plan
    assert plan.bits_array().shape == (2, plan.model["num_layers"], plan.model["num_kv_heads"])


# --------------------------------------------------------------------------------------------------------
# hostile values
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new, match",
    [
        ('"avg_bits": 2.5833333333333335', '"avg_bits": NaN', "not valid JSON"),
        ('"avg_bits": 2.5833333333333335', '"avg_bits": Infinity', "not valid JSON"),
        ('"avg_bits": 2.5833333333333335', '"avg_bits": -Infinity', "not valid JSON"),
        ('"avg_bits": 2.5833333333333335', '"avg_bits": 1e999', "finite number"),
        ('"residual_length": 8', '"residual_length": 1e999', "integer"),
        ('"residual_length": 8', '"residual_length": ' + "9" * 5000, "not valid JSON"),  # Python's digit limit
        ('"residual_length": 8', '"residual_length": ' + "9" * 400, "from 0 to"),
        ('"residual_length": 8', '"residual_length": -8', "from 0 to"),
        ('"num_layers": 3', '"num_layers": 18446744073709551617', "from 1 to 4096"),
        ('"head_dim": 16', '"head_dim": -16', "from 1 to"),
        ('"head_dim": 16', '"head_dim": 1e3', "integer"),
    ],
)
def test_hostile_numbers_are_refused(tmp_path, capsys, old, new, match):
    assert old in VALID_TEXT
    assert_refused(write(tmp_path, VALID_TEXT.replace(old, new, 1)), match, capsys)


def test_refusal_messages_stay_short_for_huge_values(tmp_path):
    path = write(tmp_path, VALID_TEXT.replace('"residual_length": 8', '"residual_length": ' + "9" * 4000))
    with pytest.raises(PlanError) as exc:
        Plan.load(path)
    assert len(str(exc.value)) < 300 + len(str(path))


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("bits", "key", 0, 0), -3, "from 1 to 8"),
        (("bits", "value", 2, 1), -(2**63), "from 1 to 8"),
        (("bits", "key", 1, 0), 2**64, "from 1 to 8"),
        (("bits", "key", 0, 0), 2.5, "integer"),
        (("bits", "key", 0, 0), "3", "integer"),
        (("bits", "key", 0, 0), None, "integer"),
        (("bits", "key", 0), [[3, 3]], "2 widths"),  # extra nesting
        (("bits", "key", 0), [[3], [3]], "integer"),  # extra nesting, right length
        (("bits", "key"), [3, 3, 3, 3, 3, 3], "list of 3 layers"),  # flat L*H instead of [L][H]
        (("bits", "key"), [3, 3, 3], r"bits.key\[0\] must list 2 widths"),  # flat L instead of [L][H]
        (("bits", "value"), [[2, 2]] * 4, "list of 3 layers"),
        (("bits", "value"), {"0": [2, 2]}, "list of 3 layers"),
        (("bits",), [[[2, 2]] * 3] * 2, "must be an object"),  # [2, L, H] array instead of key/value
        (("model", "num_kv_heads"), 4, "4 widths"),
        (("model",), [], "must be an object"),
        (("quantizer",), "uniform", "must be an object"),
        (("budget",), {"kind": "avg_bits", "value": {"nested": 1}}, "budget"),
    ],
)
def test_wrong_types_shapes_and_negative_bits_are_refused(tmp_path, capsys, path, value, match):
    assert_refused(write(tmp_path, edited(lambda d: set_path(d, path, value))), match, capsys)


def test_deep_nesting_inside_a_field_is_refused(tmp_path, capsys):
    deep_lists = "[" * 100000 + "]" * 100000
    deep_dicts = '{"a": ' * 100000 + "1" + "}" * 100000
    for i, deep in enumerate((deep_lists, deep_dicts)):
        text = VALID_TEXT.replace('"params": {', '"params": {"x": ' + deep + ", ", 1)
        assert_refused(write(tmp_path, text, name=f"deep{i}.json"), "nested too deeply", capsys)
    # within the parser's limit but deeper than a quantizer parameter may be
    text = VALID_TEXT.replace('"params": {', '"params": {"x": ' + "[" * 50 + "]" * 50 + ", ", 1)
    assert_refused(write(tmp_path, text, name="deep50.json"), "nested more than", capsys)


def test_duplicate_keys_are_refused_at_every_level(tmp_path, capsys):
    nested = VALID_TEXT.replace('"head_dim": 16', '"head_dim": 16, "head_dim": 64', 1)
    assert_refused(write(tmp_path, nested, name="nested.json"), "duplicate field 'head_dim'", capsys)
    deeper = VALID_TEXT.replace('"value": [', '"value": [[1, 1], [1, 1], [1, 1]], "value": [', 1)
    assert_refused(write(tmp_path, deeper, name="deeper.json"), "duplicate field 'value'", capsys)


class _Marker:
    """Unpickling this object creates ``path``: proof that a pickle was (or was not) executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_renamed_json_is_refused_and_never_unpickled(tmp_path, capsys, protocol):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({**VALID, "evil": _Marker(marker)}, protocol=protocol)
    path = write(tmp_path, payload)
    # protocol 0 is ASCII (valid UTF-8, invalid JSON); later protocols are binary (not UTF-8)
    assert_refused(path, "not valid JSON" if protocol == 0 else "not UTF-8", capsys)
    assert not marker.exists()


def test_torch_save_file_renamed_json_is_refused(tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "plan.json"
    torch.save({"plan": VALID, "evil": _Marker(marker)}, path)
    assert_refused(path, "not UTF-8|not valid JSON", capsys)
    assert not marker.exists()


def test_directory_and_missing_paths(tmp_path, capsys):
    assert_refused(tmp_path, "not found", capsys)
    assert_refused(tmp_path / "missing.json", "not found", capsys)


# --------------------------------------------------------------------------------------------------------
# plans for another model or another quantizer
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "geometry",
    [Geometry(2, 2, 16, 4), Geometry(3, 1, 16, 4), Geometry(3, 2, 32, 4), Geometry(3, 2, 16, 8)],
    ids=["layers", "kv_heads", "head_dim", "query_heads"],
)
def test_plan_for_another_geometry_is_refused_by_cache_and_simulation(geometry):
    bits = np.full(geometry.shape, 3)
    plan = make_plan(geometry, bits)
    model = tiny_model("llama")
    assert model_geometry(model) == TINY
    with pytest.raises(PlanError, match="made for tiny-llama") as exc:
        RateQuantCache.from_plan(plan, model)
    assert "calibrate a plan for this model" in str(exc.value)
    with pytest.raises(PlanError, match="made for tiny-llama"), simulated_quantization(model, plan.resolve(model)):
        pass


def test_plan_for_another_geometry_is_refused_by_the_cli(tmp_path, capsys, tiny_model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog." * 3 for i in range(30)))
    path = make_plan(Geometry(3, 2, 32, 4), np.full((2, 3, 2), 3)).to_json(tmp_path / "other.json")
    for argv in (
        ["eval", "--plan", str(path), "--corpus", str(corpus), "--seq-len", "16", "--windows", "1"],
        ["generate", "--plan", str(path), "--prompt", "the quick", "--max-new-tokens", "2"],
    ):
        capsys.readouterr()
        code = main([argv[0], "--model", str(tiny_model_dir), *argv[1:]])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("ratequant: error: this plan was made for tiny-llama"), err
        assert "head_dim 32" in err and "head_dim 16" in err and "Traceback" not in err


def test_plan_for_an_unknown_quantizer_design_is_refused_on_load(tmp_path, capsys):
    text = edited(lambda d: set_path(d, ("quantizer", "name"), "evil_design"))
    assert_refused(write(tmp_path, text), "'evil_design', which is not a quantizer design", capsys)
    with pytest.raises(PlanError, match="kivi, quarot, turbo, uniform"):
        Plan.from_dict(json.loads(text))


@pytest.mark.parametrize(
    "quantizer, residual, match",
    [
        ({"name": "uniform", "params": {"group_size": -4}}, 8, "group_size"),
        ({"name": "uniform", "params": {"bogus": 1}}, 8, "no parameter"),
        ({"name": "uniform", "params": {"scale_dtype": "float16", "group_size": 5}}, 8, "not divisible"),  # 5 vs 16
        ({"name": "kivi", "params": {"scale_dtype": "float16", "group_size": 32}}, 8, "not a multiple"),  # 8 vs 32
        ({"name": "turbo", "params": {"seed": "x"}}, 8, "seed"),
        ({"name": "uniform", "params": {"scale_dtype": "float64"}}, 8, "scale_dtype"),
    ],
)
def test_plan_whose_quantizer_design_does_not_fit_is_refused_before_use(quantizer, residual, match):
    """Such a plan loads (``inspect`` shows it), ``plan.design()`` refuses it, and neither the cache nor the
    simulation ever runs with it: the error comes at construction or at the first forward pass."""
    plan = make_plan(quantizer=quantizer, residual=residual)
    with pytest.raises(PlanError, match=match):
        plan.design()
    model = tiny_model("llama")
    ids = torch.randint(2, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RateQuantError, match=match), torch.no_grad():
        model(ids, past_key_values=RateQuantCache.from_plan(plan, model), use_cache=True)
    with pytest.raises(RateQuantError, match=match), torch.no_grad():
        with simulated_quantization(model, plan.resolve(model)):
            model(ids)


def test_a_plan_that_omits_default_parameters_is_the_same_design():
    """A hand-written (or older) plan without a parameter at its default is not a 'mismatch' with itself."""
    plan = make_plan(quantizer={"name": "kivi", "params": {"group_size": 4}})
    plan.check_quantizer(get_quantizer("kivi", group_size=4))
    cache = RateQuantCache.from_plan(plan, tiny_model("llama"))
    assert cache.quantizer == get_quantizer("kivi", group_size=4, scale_dtype="float16")
    with pytest.raises(PlanError, match="calibrated for quantizer kivi"):
        plan.check_quantizer(get_quantizer("kivi", group_size=4, scale_dtype="float32"))


def test_design_of_a_good_plan_is_the_quantizer_it_names():
    assert make_plan().design() == get_quantizer("uniform")
    plan = make_plan(quantizer=get_quantizer("kivi", group_size=4), residual=8)
    assert plan.design() == get_quantizer("kivi", group_size=4)


def test_plan_for_another_quantizer_is_refused_unless_allowed():
    """The mismatch refusal itself is tested in tests/cache/test_cache.py and tests/cli/test_evaluate.py; here the
    plan file is a real file and the other design has the same parameters."""
    model = tiny_model("llama")
    plan = make_plan(quantizer=get_quantizer("uniform"))
    with pytest.raises(PlanError, match="calibrated for quantizer uniform"):
        RateQuantCache.from_plan(plan, model, get_quantizer("quarot"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = RateQuantCache.from_plan(plan, model, get_quantizer("quarot"), allow_mismatch=True)
    assert cache.quantizer.name == "quarot" and any("worse than uniform" in str(w.message) for w in caught)


def test_inspect_refuses_a_plan_whose_design_cannot_be_built(tmp_path, capsys):
    path = write(tmp_path, edited(lambda d: set_path(d, ("quantizer", "params", "group_size"), -4)))
    code = main(["inspect", str(path)])
    assert code == 2 and "group_size" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# atomic writes: results JSON and plans
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
        make_plan().to_json(tmp_path / "plan.json")
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RateQuantError, match="cannot write"):
        jsonio.write_json(blocker / "sub" / "results.json", RESULT)  # a folder under a regular file


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()], ids=["io", "interrupt"])
def test_plan_failing_mid_write_leaves_nothing_and_keeps_the_old_plan(tmp_path, monkeypatch, error):
    old = make_plan(residual=0)
    path = old.to_json(tmp_path / "plan.json")
    explode_writes(monkeypatch, error)
    with pytest.raises((PlanError, KeyboardInterrupt)):
        make_plan().to_json(tmp_path / "new.json")
    with pytest.raises((PlanError, KeyboardInterrupt)):
        make_plan().to_json(path, overwrite=True)
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


def test_cli_results_json_write_failure_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog." * 3 for i in range(30)))
    out = tmp_path / "results" / "info.json"
    explode_writes(monkeypatch, OSError(28, "No space left on device"))
    code = main(["info", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"ratequant: error: cannot write {out}: No space left on device; nothing was written"
    ]
    assert os.listdir(out.parent) == []


# --------------------------------------------------------------------------------------------------------
# unreadable files, byte-order marks, numbers JSON cannot hold
# --------------------------------------------------------------------------------------------------------
def test_unreadable_plans_are_one_line(tmp_path, capsys, monkeypatch):
    if Path("/proc/self/mem").is_file():  # a "regular file" of 0 bytes whose read fails
        assert_refused(Path("/proc/self/mem"), "cannot read plan file /proc/self/mem: Input/output error", capsys)
    path = write(tmp_path, VALID_TEXT)
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    assert_refused(path, "cannot read plan file .*: Permission denied", capsys)


def test_a_plan_with_a_byte_order_mark_is_the_same_plan(tmp_path):
    """UTF-8 with a BOM (what some Windows editors write) reads as the same plan, as YAML files do."""
    path = write(tmp_path, b"\xef\xbb\xbf" + VALID_TEXT.encode())
    assert Plan.load(path) == make_plan()
    assert Plan.load(path).to_json_text() == VALID_TEXT  # and re-saves without it


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


# --------------------------------------------------------------------------------------------------------
# compare results read back: missing fields, hostile names
# --------------------------------------------------------------------------------------------------------
SAVED_RESULTS = Path(__file__).parents[1] / "docs" / "results" / "results.json"


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


def test_figure_titles_draw_names_as_they_are(tmp_path):
    """Dollar signs in a name are not matplotlib mathtext (which refuses what it cannot parse)."""
    from ratequant.lab.report.plots import bits_heatmap

    path = bits_heatmap(BITS, tmp_path / "bits.png", title="model $\\frac$ a$b$ \x1b[2J\nnext")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
