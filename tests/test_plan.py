"""Plan files: exact round trips, validation of every field, hostile files, geometry and quantizer checks."""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratequant.allocation import AllocationOptions, Budget, CostModel, Curves, allocate, get_strategy
from ratequant.allocation.fitting import fit_distortion
from ratequant.cache import RateQuantCache
from ratequant.cache.simulate import simulated_quantization
from ratequant.cli import main
from ratequant.compat import model_geometry
from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.plan import FORMAT_VERSION, MAX_PLAN_BYTES, Plan
from ratequant.quantizers import get_quantizer
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, StoragePolicy
from tests.conftest import deny_reading, tiny_model

G = Geometry(num_layers=4, num_kv_heads=2, head_dim=16, num_heads=8)
BITS = (1, 2, 3, 4, 5, 6, 7, 8)
QUANT = {"name": "kivi", "params": {"group_size": 32, "scale_dtype": "float16", "axes": (1, 2)}}
CALIB = {
    "corpus": "pydoc_data.topics[calibration]",
    "corpus_sha256": "0123456789abcdef" * 4,
    "tokens": 4096,
    "seconds": 1.25,
    "phases": {"capture": 0.5, "measure": 0.7, "fit": 0.05},
}


def make_fit(geometry=G, seed=0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, 2, geometry.shape))
    beta = np.empty(geometry.shape)
    beta[0], beta[1] = 4.4, 3.8
    table = alpha[..., None] * beta[..., None] ** -np.asarray(BITS, float)
    return fit_distortion(table * np.exp(rng.normal(0, 0.1, table.shape)), BITS)


def make_plan(**kw) -> Plan:
    fit = make_fit()
    budget = Budget.avg_bits(2.75)
    alloc = allocate(Curves.from_fit(fit), budget)
    args = dict(
        model_name="tiny-llama",
        geometry=G,
        quantizer=QUANT,
        budget=budget,
        fit=fit,
        metric="fisher",
        calibration=CALIB,
        residual_length=32,
    )
    args.update(kw)
    return Plan.from_allocation(alloc, **args)


def test_dict_round_trip_is_exact():
    plan = make_plan()
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.to_dict() == plan.to_dict()
    assert plan.quantizer["params"]["axes"] == [1, 2]  # canonical JSON form
    assert plan.fit["design"] == "kivi" and plan.fit["metric"] == "fisher"
    assert plan.format_version == FORMAT_VERSION


def test_file_round_trip_is_byte_identical(tmp_path):
    plan = make_plan()
    first = plan.to_json(tmp_path / "a" / "plan.json")
    loaded = Plan.load(first)
    assert loaded == plan
    second = loaded.to_json(tmp_path / "again.json")
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert '"key": [\n      [' in text  # one line per layer, not one per width
    assert sorted(os.listdir(tmp_path / "a")) == ["plan.json"]  # no temporary file left behind


def test_plan_contents_match_the_allocation():
    fit = make_fit()
    budget = Budget.avg_bits(2.75)
    alloc = allocate(Curves.from_fit(fit), budget)
    plan = make_plan()
    np.testing.assert_array_equal(plan.bits_array(), alloc.bits)
    assert plan.bits_array().dtype == np.int64 and plan.bits_array().shape == (2, 4, 2)
    assert plan.avg_bits == 2.75 and plan.allocator == "ratequant"
    assert plan.geometry == G
    assert plan.fit_object() == fit
    assert plan.budget_object() == budget
    assert plan.fit["beta_key"] == fit.beta_key and plan.fit["alpha"]["key"][0][0] == fit.alpha[0, 0, 0]


def test_baseline_plans_without_fit_or_calibration(tmp_path):
    budget = Budget.avg_bits(3.0)
    alloc = allocate(Curves.flat(G, (2, 4)), budget, get_strategy("kv-split", key_bits=4, value_bits=2))
    plan = Plan.from_allocation(alloc, model_name="m", geometry=G, quantizer=QUANT, budget=budget)
    assert plan.fit is None and plan.calibration is None and plan.allocator == "kv-split"
    assert Plan.load(plan.to_json(tmp_path / "p.json")) == plan
    assert "keys    mean 4.000  widths 4b:8" in plan.summary()


def test_mismatched_plan_records_the_source_design():
    fit = make_fit()
    budget = Budget.avg_bits(3.0)
    alloc = allocate(Curves.from_fit(fit, design="quarot"), budget)  # quarot's curves, stored with kivi
    plan = Plan.from_allocation(alloc, model_name="m", geometry=G, quantizer=QUANT, budget=budget, fit=fit)
    assert plan.allocator == "ratequant" and plan.fit["design"] == "quarot"


def per_token_policy(residual: int) -> StoragePolicy:
    return StoragePolicy(get_quantizer("uniform"), residual)  # head_dim 16: 16 b code bits + 32 metadata bits


def test_bytes_per_token_is_kept():
    cm = CostModel.from_policy(per_token_policy(32), G, 1024)
    budget = Budget.avg_bits(2.0)
    alloc = allocate(Curves.flat(G, (2, 4)), budget, "uniform", AllocationOptions(cost_model=cm))
    plan = Plan.from_allocation(alloc, model_name="m", geometry=G, quantizer=QUANT, budget=budget, residual_length=32)
    assert plan.bytes_per_token == alloc.bytes_per_token > 0
    assert "bytes per token" in plan.summary()


def test_byte_budget_plan_must_fit_its_budget():
    cm = CostModel.from_policy(per_token_policy(0), G, 64)
    budget = Budget.bytes_per_token(150.0, 64)
    alloc = allocate(Curves.from_fit(make_fit()), budget, options=AllocationOptions(cost_model=cm))
    plan = Plan.from_allocation(alloc, model_name="m", geometry=G, quantizer=QUANT, budget=budget)
    assert plan.budget == {"kind": "bytes_per_token", "value": 150.0, "context_tokens": 64}
    assert 146.0 < plan.bytes_per_token <= 150.0
    d = plan.to_dict()
    d["budget"]["value"] = 140.0
    with pytest.raises(PlanError, match="over its own budget"):
        Plan.from_dict(d)


def test_other_geometry_is_refused_naming_both():
    plan = make_plan()
    plan.check_matches(G)
    plan.check_matches(Geometry(4, 2, 16))  # unknown query heads: not compared
    other = Geometry(num_layers=2, num_kv_heads=2, head_dim=16)
    with pytest.raises(PlanError) as exc:
        plan.check_matches(other)
    msg = str(exc.value)
    assert "tiny-llama (4 layers x 2 kv heads x head_dim 16, 8 query heads)" in msg
    assert "2 layers x 2 kv heads x head_dim 16" in msg
    with pytest.raises(PlanError, match="16 query heads"):
        plan.check_matches(Geometry(4, 2, 16, 16))


def test_quantizer_check():
    plan = make_plan()
    plan.check_quantizer({"name": "kivi", "params": {"group_size": 32, "scale_dtype": "float16", "axes": [1, 2]}})
    other = {"name": "kivi", "params": {"group_size": 64, "scale_dtype": "float16", "axes": [1, 2]}}
    with pytest.raises(PlanError, match="calibrated for quantizer kivi"):
        plan.check_quantizer(other)
    with pytest.raises(PlanError, match="quarot"):
        plan.check_quantizer({"name": "quarot", "params": {}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan.check_quantizer(other, allow_mismatch=True)
    assert len(caught) == 1 and "worse than uniform" in str(caught[0].message)


def test_summary_shows_histograms_betas_and_r2():
    plan = make_plan()
    text = plan.summary()
    bits = plan.bits_array()
    for k in range(2):
        for b in np.unique(bits[k]):
            assert f"{b}b:{int((bits[k] == b).sum())}" in text
    assert f"beta key {plan.fit['beta_key']:.3f}" in text and "R^2 overall" in text
    assert "average code bits 2.7500" in text and "4096 tokens" in text


# --------------------------------------------------------------------------------------------------------
# Files that must be refused
# --------------------------------------------------------------------------------------------------------
def test_overwrite_is_refused_unless_asked(tmp_path):
    plan = make_plan()
    path = plan.to_json(tmp_path / "p.json")
    with pytest.raises(PlanError, match="already exists"):
        plan.to_json(path)
    other = make_plan(residual_length=0)
    other.to_json(path, overwrite=True)
    assert Plan.load(path) == other
    with pytest.raises(PlanError, match="directory"):
        plan.to_json(tmp_path)


def write(tmp_path, text: str | bytes, name="p.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "text, match",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{}", "no format_version"),
        ('{"format_version": 1, "format_version": 1}', "duplicate field"),
        ("[" * 100000 + "]" * 100000, "nested too deeply|must be a JSON object"),
    ],
)
def test_broken_files_give_plan_error_with_path(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PlanError, match=match) as exc:
        Plan.load(path)
    assert str(path) in str(exc.value)


def test_nan_and_infinity_are_refused(tmp_path):
    good = make_plan().to_json_text()
    for bad in ("NaN", "Infinity", "-Infinity", "1e999"):
        path = write(tmp_path, good.replace('"seconds": 1.25', f'"seconds": {bad}'), name=f"{bad}.json")
        with pytest.raises(PlanError, match="not valid JSON|finite number"):
            Plan.load(path)


def test_huge_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as handle:
        handle.truncate(MAX_PLAN_BYTES + 1)  # sparse: nothing is actually written
    with pytest.raises(PlanError, match="MiB limit"):
        Plan.load(path)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")


def test_newer_format_asks_to_upgrade():
    d = make_plan().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    d["new_field_from_the_future"] = {}
    with pytest.raises(PlanError, match="newer.*upgrade ratequant"):
        Plan.from_dict(d)


def mutated(path: tuple, value=None, delete=False) -> dict:
    d = make_plan().to_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("format_version",), 0, "format_version"),
        (("format_version",), "1", "integer"),
        (("format_version",), True, "integer"),
        (("surprise",), 1, "unknown field"),
        (("model", "num_layers"), 5, "list of 5 layers"),
        (("model", "num_layers"), 10**9, "from 1 to 4096"),
        (("model", "num_heads"), 7, "multiple"),
        (("model", "head_dim"), 2.0, "integer"),
        (("bits", "key", 0), [4, 4, 4], "2 widths"),
        (("bits", "key", 0, 0), 9, "from 1 to 8"),
        (("bits", "key", 0, 0), 0, "from 1 to 8"),
        (("bits", "key", 0, 0), 3.0, "integer"),
        (("bits", "key", 0, 0), True, "integer"),
        (("bits", "value"), [[2, 2]] * 3, "list of 4 layers"),
        (("avg_bits",), 3.0, "average"),
        (("budget", "value"), 3.0, "does not meet its own budget"),
        (("budget", "kind"), "bits", "budget"),
        (("bytes_per_token",), -1.0, "bytes_per_token"),
        (("residual_length",), -1, "residual_length"),
        (("allocator",), "", "allocator"),
        (("quantizer", "name"), 3, "quantizer.name"),
        (("quantizer", "params"), {"a": [[[[[[1]]]]]]}, "nested"),
        (("fit", "beta_key"), 1.0, "beta_key"),
        (("fit", "alpha", "key"), [[1.0, 1.0]], "shape"),
        (("fit", "r2_overall"), 1.5, "r2_overall"),
        (("fit", "metric"), 7, "fit.metric"),
        (("calibration", "corpus_sha256"), "xyz", "64 lowercase hex"),
        (("calibration", "tokens"), -5, "tokens"),
        (("calibration", "phases", "fit"), -1.0, "phases"),
        (("calibration", "extra"), [1], "string, finite number"),
    ],
)
def test_invalid_fields_are_refused(path, value, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(mutated(path, value))


@pytest.mark.parametrize(
    "path",
    [
        ("model",),
        ("bits",),
        ("budget",),
        ("bits", "value"),
        ("model", "head_dim"),
        ("calibration", "corpus"),
        ("fit", "alpha"),
    ],
)
def test_missing_fields_are_refused(path):
    with pytest.raises(PlanError, match="missing|must be|fields"):
        Plan.from_dict(mutated(path, delete=True))


def test_optional_fields_and_extras():
    d = mutated(("calibration", "device"), "cpu")
    d["model"]["revision"] = "main"
    plan = Plan.from_dict(d)
    assert plan.calibration["device"] == "cpu" and plan.model["revision"] == "main"
    for key in ("fit", "calibration", "bytes_per_token", "residual_length", "created_by"):
        d = make_plan().to_dict()
        del d[key]
        Plan.from_dict(d)  # optional at the top level; defaults are filled in
    d = make_plan().to_dict()
    d["fit"] = None
    d["calibration"] = None
    assert Plan.from_dict(d).fit is None


# --------------------------------------------------------------------------------------------------------
# Fuzz: any mutation of a valid plan is either a valid plan or a PlanError
# --------------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
VALID = make_plan().to_dict()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutations_give_plan_error_or_valid_plan(data):
    d = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        parent, key = None, None
        node = d
        while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
            parent = node
            key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        if parent is None:
            parent, key = d, data.draw(st.sampled_from(sorted(d)))
        if action == "replace":
            parent[key] = data.draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(json_values)
        else:
            parent.insert(key, data.draw(json_values))
    try:
        plan = Plan.from_dict(d)
    except PlanError:
        return
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert plan.bits_array().shape == (2, plan.model["num_layers"], plan.model["num_kv_heads"])


def test_version_1_plans_load_without_sink_tokens_and_version_2_keeps_them(tmp_path):
    d = make_plan().to_dict()
    old = {k: v for k, v in d.items() if k != "sink_tokens"}
    old["format_version"] = 1
    assert Plan.from_dict(old).sink_tokens == 0
    with pytest.raises(PlanError, match="sink_tokens needs format_version 2"):
        Plan.from_dict({**old, "sink_tokens": 2})
    plan = make_plan(sink_tokens=4)
    assert plan.sink_tokens == 4 and Plan.load(plan.to_json(tmp_path / "p.json")).sink_tokens == 4
    assert "4 sink token(s)" in plan.summary()


def test_resolve_gives_the_spec_the_cache_and_simulation_take():
    from tests.conftest import tiny_model

    model = tiny_model("llama", num_hidden_layers=4, num_attention_heads=8, hidden_size=128)  # the plan's geometry
    plan = make_plan(quantizer={"name": "kivi", "params": {"group_size": 16}}, residual_length=32, sink_tokens=2)
    spec = plan.resolve(model)
    np.testing.assert_array_equal(spec.bits, plan.bits_array())
    assert (spec.residual_length, spec.sink_tokens, spec.quantizer.name) == (32, 2, "kivi")
    other = plan.resolve(model, residual_length=0, sink_tokens=0)
    assert (other.residual_length, other.sink_tokens) == (0, 0) and other.chunks == (16, 1)
    with pytest.raises(PlanError, match="does not fit the plan"):
        plan.resolve(model, residual_length=24)  # not a multiple of kivi's 16-token key groups
    with pytest.raises(PlanError, match="calibrate a plan for this model"):
        plan.resolve(tiny_model("llama", num_hidden_layers=3, num_attention_heads=8, hidden_size=128))
    with pytest.raises(PlanError, match="allow the mismatch"):
        plan.resolve(model, get_quantizer("uniform"))


# ---------------------------------------------------------------------------------------------------------
# what a plan states is recomputed on load
# ---------------------------------------------------------------------------------------------------------
KIVI16 = get_quantizer("kivi", group_size=16)


def costed_plan(itemsize: int = 2, budget: Budget | None = None) -> Plan:
    """A plan whose bytes per token come from its own design, residual window and sinks (as calibrate makes)."""
    budget = budget or Budget.avg_bits(2.75)
    policy = StoragePolicy(KIVI16, 32, 2)
    context = budget.context_tokens or DEFAULT_CONTEXT_TOKENS
    cost = CostModel.from_policy(policy, G, context, itemsize=itemsize)
    alloc = allocate(Curves.from_fit(make_fit()), budget, options=AllocationOptions(cost_model=cost))
    return Plan.from_allocation(
        alloc, model_name="m", geometry=G, quantizer=KIVI16, budget=budget, residual_length=32, sink_tokens=2
    )


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_stored_bytes_per_token_must_be_what_the_widths_take(itemsize):
    plan = costed_plan(itemsize)
    assert plan.recomputed_bytes_per_token(itemsize) == pytest.approx(plan.bytes_per_token, rel=1e-12)
    assert Plan.from_dict(plan.to_dict()) == plan
    d = plan.to_dict()
    d["bytes_per_token"] *= 1 + 1e-9  # rounding is not a disagreement
    Plan.from_dict(d)
    for factor in (0.5, 0.99, 1.01, 3.0):
        d["bytes_per_token"] = plan.bytes_per_token * factor
        with pytest.raises(PlanError, match="plan field bytes_per_token is .* but its widths, quantizer, residual"):
            Plan.from_dict(d)
    d = plan.to_dict()
    d["bits"]["key"][0][0] = 8 if d["bits"]["key"][0][0] != 8 else 1  # widths edited, the figures left as they were
    d["avg_bits"] = float(np.mean([d["bits"]["key"], d["bits"]["value"]]))
    d["budget"]["value"] = d["avg_bits"]
    with pytest.raises(PlanError, match="bytes_per_token"):
        Plan.from_dict(d)


def test_a_byte_budget_plan_is_checked_at_its_own_context():
    plan = costed_plan(budget=Budget.bytes_per_token(160.0, 512))
    assert plan.stated_context_tokens == 512 and plan.bytes_per_token <= 160.0
    d = plan.to_dict()
    d["budget"]["context_tokens"] = 1024  # the same bytes claimed at another context
    with pytest.raises(PlanError, match="at 1024 tokens of context"):
        Plan.from_dict(d)


def test_load_needs_a_path_and_says_so():
    for bad in (123, None, ["plan.json"], b"plan.json"):
        with pytest.raises(TypeError, match="Plan.load needs a file path"):
            Plan.load(bad)


def test_names_in_messages_and_summaries_are_inert():
    plan = make_plan(model_name="m\x1b[31m\nred\x9b\u202e")
    with pytest.raises(PlanError) as exc:
        plan.check_matches(Geometry(2, 2, 16, 8))
    message = str(exc.value)
    assert r"made for m\x1b[31m red\x9b\u202e (" in message and not any(c in message for c in "\x1b\n\x9b\u202e")
    summary = plan.summary()
    assert r"model: m\x1b[31m red" in summary and "\x1b" not in summary
    assert len(summary.splitlines()) == len(make_plan(model_name="m").summary().splitlines())


# --------------------------------------------------------------------------------------------------------
# Hostile and damaged files: every one is refused with a clear error, through the library and the CLI.
#
# Plans are read by Plan.load and by ``ratequant inspect`` / ``eval --plan``; each bad file must give a
# PlanError naming the file (library) and exit status 2 with one line ``ratequant: error: ...`` and no
# traceback (CLI). Nothing is ever unpickled: a pickle renamed ``.json`` whose unpickling would create a marker
# file is refused and the marker never appears. Neighbouring cases are above (field-by-field validation, NaN
# and Infinity in one field, a 100000-deep top-level list, top-level duplicate keys, files over the size limit,
# newer format versions, and a hypothesis fuzz of the parsed dict); plans and results written atomically:
# tests/test_jsonio.py.
# --------------------------------------------------------------------------------------------------------
# the geometry of conftest's tiny Llama (and of the tiny_model_dir fixture)
TINY = Geometry(num_layers=3, num_kv_heads=2, head_dim=16, num_heads=4)
TINY_BITS = np.array([[[2, 3], [4, 2], [3, 3]], [[2, 2], [3, 1], [4, 2]]])


def tiny_plan(geometry: Geometry = TINY, bits: np.ndarray = TINY_BITS, quantizer=None, residual: int = 8) -> Plan:
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


VALID_TEXT = tiny_plan().to_json_text()
VALID_PARSED = json.loads(VALID_TEXT)


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
    payload = pickle.dumps({**VALID_PARSED, "evil": _Marker(marker)}, protocol=protocol)
    path = write(tmp_path, payload)
    # protocol 0 is ASCII (valid UTF-8, invalid JSON); later protocols are binary (not UTF-8)
    assert_refused(path, "not valid JSON" if protocol == 0 else "not UTF-8", capsys)
    assert not marker.exists()


def test_torch_save_file_renamed_json_is_refused(tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "plan.json"
    torch.save({"plan": VALID_PARSED, "evil": _Marker(marker)}, path)
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
    plan = tiny_plan(geometry, bits)
    model = tiny_model("llama")
    assert model_geometry(model) == TINY
    with pytest.raises(PlanError, match="made for tiny-llama") as exc:
        RateQuantCache.from_plan(plan, model)
    assert "calibrate a plan for this model" in str(exc.value)
    with pytest.raises(PlanError, match="made for tiny-llama"), simulated_quantization(model, plan.resolve(model)):
        pass


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
    plan = tiny_plan(quantizer=quantizer, residual=residual)
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
    plan = tiny_plan(quantizer={"name": "kivi", "params": {"group_size": 4}})
    plan.check_quantizer(get_quantizer("kivi", group_size=4))
    cache = RateQuantCache.from_plan(plan, tiny_model("llama"))
    assert cache.quantizer == get_quantizer("kivi", group_size=4, scale_dtype="float16")
    with pytest.raises(PlanError, match="calibrated for quantizer kivi"):
        plan.check_quantizer(get_quantizer("kivi", group_size=4, scale_dtype="float32"))


def test_design_of_a_good_plan_is_the_quantizer_it_names():
    assert tiny_plan().design() == get_quantizer("uniform")
    plan = tiny_plan(quantizer=get_quantizer("kivi", group_size=4), residual=8)
    assert plan.design() == get_quantizer("kivi", group_size=4)


def test_plan_for_another_quantizer_is_refused_unless_allowed():
    """The mismatch refusal itself is tested in tests/cache/test_layer.py and tests/cli/test_evaluate.py; here the
    plan file is a real file and the other design has the same parameters."""
    model = tiny_model("llama")
    plan = tiny_plan(quantizer=get_quantizer("uniform"))
    with pytest.raises(PlanError, match="calibrated for quantizer uniform"):
        RateQuantCache.from_plan(plan, model, get_quantizer("quarot"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = RateQuantCache.from_plan(plan, model, get_quantizer("quarot"), allow_mismatch=True)
    assert cache.quantizer.name == "quarot" and any("worse than uniform" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------------------------
# unreadable files, byte-order marks
# --------------------------------------------------------------------------------------------------------
def test_unreadable_plans_are_one_line(tmp_path, capsys, monkeypatch):
    if Path("/proc/self/mem").is_file():  # a "regular file" of 0 bytes whose read fails
        assert_refused(Path("/proc/self/mem"), "cannot read plan file /proc/self/mem: Input/output error", capsys)
    path = write(tmp_path, VALID_TEXT)
    deny_reading(monkeypatch, path)
    assert_refused(path, "cannot read plan file .*: Permission denied", capsys)


def test_a_plan_with_a_byte_order_mark_is_the_same_plan(tmp_path):
    """UTF-8 with a BOM (what some Windows editors write) reads as the same plan, as YAML files do."""
    path = write(tmp_path, b"\xef\xbb\xbf" + VALID_TEXT.encode())
    assert Plan.load(path) == tiny_plan()
    assert Plan.load(path).to_json_text() == VALID_TEXT  # and re-saves without it
