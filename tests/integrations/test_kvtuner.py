"""Plans other tools read: KVTuner per-head tables (both ways, validated strictly) and per-layer tables."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from ratequant.allocation import Budget, Curves, allocate, get_strategy
from ratequant.allocation.fitting import fit_distortion
from ratequant.cli import main
from ratequant.errors import PlanError
from ratequant.geometry import Geometry
from ratequant.integrations.kvtuner import (
    KVTUNER_ALLOCATOR,
    LAYERS_FORMAT,
    export_kvtuner,
    export_layers,
    import_kvtuner,
    kvtuner_text,
    read_kvtuner,
)
from ratequant.plan import Plan

G = Geometry(num_layers=4, num_kv_heads=2, head_dim=16, num_heads=8)
BITS = (1, 2, 3, 4, 5, 6, 7, 8)
QUANT = {"name": "kivi", "params": {"group_size": 16}}


def make_fit(geometry=G, seed=0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0, 2, geometry.shape))
    beta = np.empty(geometry.shape)
    beta[0], beta[1] = 4.4, 3.8
    table = alpha[..., None] * beta[..., None] ** -np.asarray(BITS, float)
    return fit_distortion(table * np.exp(rng.normal(0, 0.1, table.shape)), BITS)


def make_plan(avg_bits=2.75, strategy="ratequant", geometry=G, seed=0) -> Plan:
    """A fitted plan without a model: a random fit and the exact allocation under it."""
    fit = make_fit(geometry, seed)
    budget = Budget.avg_bits(avg_bits)
    alloc = allocate(Curves.from_fit(fit), budget, strategy)
    return Plan.from_allocation(
        alloc,
        model_name="tiny-llama",
        geometry=geometry,
        quantizer=QUANT,
        budget=budget,
        fit=fit,
        metric="fisher",
        residual_length=32,
    )


def baseline_plan(key_bits=4, value_bits=2) -> Plan:
    """A plan without a fit (a fixed K/V split): widths constant per layer and kind."""
    budget = Budget.avg_bits((key_bits + value_bits) / 2)
    alloc = allocate(Curves.flat(G, BITS), budget, get_strategy("kv-split", key_bits=key_bits, value_bits=value_bits))
    return Plan.from_allocation(alloc, model_name="tiny-llama", geometry=G, quantizer=QUANT, budget=budget)


def do_import(table, geometry=G, **kw):
    args = dict(model_name="tiny-llama", geometry=geometry, quantizer_config=QUANT, residual_length=32)
    args.update(kw)
    return import_kvtuner(table, **args)


# ---------------------------------------------------------------------------------------------------------
# KVTuner: round trips
# ---------------------------------------------------------------------------------------------------------
def test_kvtuner_table_has_string_keys_in_order_and_every_width():
    plan = make_plan()
    table = export_kvtuner(plan)
    assert list(table) == ["0", "1", "2", "3"]
    assert all(list(heads) == ["0", "1"] for heads in table.values())
    bits = plan.bits_array()
    for layer in range(G.num_layers):
        for head in range(G.num_kv_heads):
            assert table[str(layer)][str(head)] == {
                "nbits_key": int(bits[0, layer, head]),
                "nbits_value": int(bits[1, layer, head]),
            }
    assert json.loads(json.dumps(table)) == table


def test_plan_to_kvtuner_to_plan_keeps_widths_and_geometry():
    plan = make_plan()
    again = do_import(json.loads(json.dumps(export_kvtuner(plan))))
    np.testing.assert_array_equal(again.bits_array(), plan.bits_array())
    assert again.geometry == plan.geometry
    assert again.allocator == KVTUNER_ALLOCATOR
    assert again.avg_bits == pytest.approx(plan.avg_bits)
    assert again.budget == {"kind": "avg_bits", "value": again.avg_bits}
    assert again.fit is None and again.residual_length == 32
    assert Plan.from_dict(json.loads(again.to_json_text())) == again  # a valid plan file


def test_yaml_text_has_integer_keys_as_kvtuner_reads_it(tmp_path):
    yaml = pytest.importorskip("yaml")
    plan = make_plan()
    text = kvtuner_text(plan, yaml=True)
    loaded = yaml.safe_load(text)
    assert list(loaded) == [0, 1, 2, 3] and list(loaded[0]) == [0, 1]
    assert loaded == {int(k): {int(h): v for h, v in heads.items()} for k, heads in export_kvtuner(plan).items()}
    path = tmp_path / "table.yaml"
    path.write_text(text)
    np.testing.assert_array_equal(do_import(read_kvtuner(path)).bits_array(), plan.bits_array())


def test_import_averages_what_it_holds_and_keeps_the_quantizer():
    table = {str(i): {str(h): {"nbits_key": 4, "nbits_value": 1 + h} for h in range(2)} for i in range(4)}
    plan = do_import(table, quantizer_config={"name": "kivi", "params": {"group_size": 16}}, sink_tokens=2)
    assert plan.avg_bits == pytest.approx((4 + 1 + 4 + 2) / 4)
    assert plan.bits["value"] == [[1, 2]] * 4
    assert plan.quantizer == QUANT and plan.sink_tokens == 2
    assert plan.design().to_config()["params"]["group_size"] == 16


# ---------------------------------------------------------------------------------------------------------
# KVTuner: hostile tables
# ---------------------------------------------------------------------------------------------------------
def good_table():
    return export_kvtuner(make_plan())


def _missing_head(t):
    del t["2"]["1"]


def _extra_head(t):
    t["1"]["2"] = {"nbits_key": 4, "nbits_value": 4}


def _missing_layer(t):
    del t["3"]


def _extra_layer(t):
    t["4"] = copy.deepcopy(t["0"])


def _set(layer, head, field, value):
    def mutate(t):
        t[layer][head][field] = value

    return mutate


def _replace(mutate_key):
    def mutate(t):
        t[mutate_key] = t.pop("0")

    return mutate


def _extra_field(t):
    t["0"]["0"]["group_size"] = 32


def _missing_field(t):
    del t["2"]["0"]["nbits_value"]


def _head_is_list(t):
    t["1"]["0"] = [4, 2]


def _layer_is_string(t):
    t["2"] = "4,2"


def _deep_garbage(t):
    t["0"]["1"]["nbits_key"] = {"bits": [[4]]}


def _mixed_duplicate(t):
    t[0] = t["0"]  # integer 0 and string "0": the same layer twice


HOSTILE = {
    "missing head": (_missing_head, "head 1 missing"),
    "extra head": (_extra_head, "has 3 heads but the model has 2"),
    "missing layer": (_missing_layer, "layer 3 missing"),
    "extra layer": (_extra_layer, "layer"),
    "width 9": (_set("0", "0", "nbits_key", 9), "from 1 to 8, got 9"),
    "width 0": (_set("3", "1", "nbits_value", 0), "from 1 to 8, got 0"),
    "width string": (_set("1", "1", "nbits_value", "3"), "integer width from 1 to 8, got '3'"),
    "width float": (_set("1", "0", "nbits_key", 3.0), "got 3.0"),
    "width bool": (_set("1", "0", "nbits_key", True), "got True"),
    "width null": (_set("1", "0", "nbits_key", None), "got None"),
    "extra field": (_extra_field, "unknown field 'group_size'"),
    "missing field": (_missing_field, "lacks nbits_value"),
    "head is a list": (_head_is_list, "must be an object"),
    "layer is a string": (_layer_is_string, "must be an object keyed by head index"),
    "nested garbage": (_deep_garbage, "got dict"),
    "leading zero key": (_replace("00"), "'00'"),
    "negative key": (_replace("-0"), "'-0'"),
    "spaced key": (_replace(" 0"), "' 0'"),
    "same layer twice": (_mixed_duplicate, "layer"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tables_are_refused_in_one_line(name):
    mutate, fragment = HOSTILE[name]
    table = good_table()
    mutate(table)
    with pytest.raises(PlanError) as info:
        do_import(table)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert fragment in message


@pytest.mark.parametrize("data", [[], "table", None, 4, {}, {"layers": []}])
def test_tables_that_are_not_tables_are_refused(data):
    with pytest.raises(PlanError, match="KVTuner table"):
        do_import(data)


@pytest.mark.parametrize(
    ("geometry", "fragment"),
    [
        (Geometry(5, 2, 16), "has 4 layers but the model has 5"),
        (Geometry(3, 2, 16), "has 4 layers but the model has 3"),
        (Geometry(4, 3, 16), "has 2 heads but the model has 3"),
        (Geometry(4, 1, 16), "has 2 heads but the model has 1"),
    ],
)
def test_a_table_for_another_geometry_is_refused(geometry, fragment):
    with pytest.raises(PlanError, match=fragment):
        do_import(good_table(), geometry=geometry)


def test_a_quantizer_that_cannot_store_the_plan_is_refused():
    with pytest.raises(PlanError, match="residual length 20 is not a multiple"):
        do_import(good_table(), residual_length=20)  # kivi groups keys by 16 tokens
    with pytest.raises(PlanError, match="head_dim 16 is not divisible by group_size 32"):
        do_import(good_table(), quantizer_config={"name": "uniform", "params": {"group_size": 32}})
    with pytest.raises(PlanError, match="no parameter"):
        do_import(good_table(), quantizer_config={"name": "kivi", "params": {"bogus": 1}})
    with pytest.raises(PlanError, match="quantizer"):
        do_import(good_table(), quantizer_config={"name": "kvtuner-magic", "params": {}})


def test_hostile_files_are_refused_with_their_path(tmp_path):
    pytest.importorskip("yaml")
    cases = {
        "dup.json": '{"0": {"0": {"nbits_key": 4, "nbits_value": 4}}, "0": {}}',
        "nan.json": '{"0": {"0": {"nbits_key": NaN, "nbits_value": 4}}}',
        "dup.yaml": "0:\n  0: {nbits_key: 4, nbits_value: 4}\n0: {}\n",
        "python.yaml": "!!python/object/apply:os.system ['true']\n",
        "broken.yaml": "0: [\n",
        "deep.yaml": "[" * 100_000,
        "list-key.yaml": "? [1, 2]\n: 3\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(PlanError) as info:
            read_kvtuner(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
    (tmp_path / "bytes.yaml").write_bytes(b"\xff\xfe0: 1\n")
    with pytest.raises(PlanError, match="not UTF-8"):
        read_kvtuner(tmp_path / "bytes.yaml")
    with pytest.raises(PlanError, match="not found"):
        read_kvtuner(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------------------------------------
# Per-layer tables
# ---------------------------------------------------------------------------------------------------------
def test_export_layers_on_a_fitted_plan():
    plan = make_plan()
    table = export_layers(plan)
    assert table["format"] == LAYERS_FORMAT and table["format_version"] == 1
    assert table["model"] == plan.model and table["quantizer"] == plan.quantizer and table["strategy"] == "layer-kind"
    assert [row["layer"] for row in table["layers"]] == list(range(G.num_layers))
    keys = np.array([row["key_bits"] for row in table["layers"]])
    values = np.array([row["value_bits"] for row in table["layers"]])
    assert table["avg_bits"] == pytest.approx(plan.avg_bits) == pytest.approx((keys.mean() + values.mean()) / 2)
    assert table["plan_avg_bits"] == plan.avg_bits
    # each layer's key width lies within the keys' range in the per-head plan (and likewise for values)
    bits = plan.bits_array()
    assert bits[0].min() <= keys.min() and keys.max() <= bits.max()
    assert bits[1].min() <= values.min() and values.max() <= bits.max()
    predicted = table["predicted_distortion"]
    fit = plan.fit_object()
    assert predicted["per_head"] == pytest.approx(float(fit.predict(bits).sum()))
    layer_bits = np.stack([np.repeat(keys[:, None], 2, 1), np.repeat(values[:, None], 2, 1)])
    assert predicted["per_layer"] == pytest.approx(float(fit.predict(layer_bits).sum()))
    assert predicted["per_layer"] >= predicted["per_head"] * (1 - 1e-12)
    assert predicted["ratio"] == pytest.approx(predicted["per_layer"] / predicted["per_head"])
    json.dumps(table, allow_nan=False)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("avg", [2.0, 2.75, 3.5])
def test_per_layer_never_predicts_less_than_the_per_head_optimum(seed, avg):
    plan = make_plan(avg, seed=seed)
    for strategy in ("layer-kind", "layerwise"):
        table = export_layers(plan, strategy=strategy)
        assert table["avg_bits"] == pytest.approx(plan.avg_bits)
        assert table["predicted_distortion"]["ratio"] >= 1 - 1e-12


def test_layerwise_gives_one_width_per_layer():
    table = export_layers(make_plan(), strategy="layerwise")
    assert all(row["key_bits"] == row["value_bits"] for row in table["layers"])
    assert table["strategy"] == "layerwise"


def test_an_average_the_grouping_cannot_meet_gives_the_nearest_below():
    plan = make_plan(2.8125)  # 45 code bits over 16 components: per-layer widths sum in steps of 2 heads
    assert int(plan.bits_array().sum()) == 45
    table = export_layers(plan)
    assert table["plan_avg_bits"] == 2.8125
    assert table["avg_bits"] == pytest.approx(2.75)
    assert table["predicted_distortion"]["ratio"] > 1


def test_a_plan_already_per_layer_is_exported_as_it_is():
    plan = make_plan(strategy="layer-kind")
    table = export_layers(plan)
    bits = plan.bits_array()
    assert [row["key_bits"] for row in table["layers"]] == bits[0, :, 0].tolist()
    assert [row["value_bits"] for row in table["layers"]] == bits[1, :, 0].tolist()
    assert table["predicted_distortion"]["ratio"] == 1.0


def test_a_baseline_without_a_fit():
    table = export_layers(baseline_plan(4, 2))
    assert [(row["key_bits"], row["value_bits"]) for row in table["layers"]] == [(4, 2)] * G.num_layers
    assert table["predicted_distortion"] == {"per_head": None, "per_layer": None, "ratio": None}
    with pytest.raises(PlanError, match="differ within a layer"):
        export_layers(baseline_plan(4, 2), strategy="layerwise")
    mixed = do_import(
        {str(i): {"0": {"nbits_key": 4, "nbits_value": 2}, "1": {"nbits_key": 3, "nbits_value": 2}} for i in range(4)}
    )
    with pytest.raises(PlanError, match="no fitted curves") as info:
        export_layers(mixed)
    assert "\n" not in str(info.value)


def test_export_layers_refuses_other_strategies():
    with pytest.raises(PlanError, match="layer-kind or layerwise"):
        export_layers(make_plan(), strategy="ratequant")
    with pytest.raises(PlanError, match="needs a Plan"):
        export_layers({"bits": {}})


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def plan_file(tmp_path):
    return make_plan().to_json(tmp_path / "plan.json")


def run_ok(*argv):
    assert main([str(a) for a in argv]) == 0


def run_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratequant: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_cli_export_then_import_round_trips(tmp_path, plan_file, capsys, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    table = tmp_path / f"kvtuner{suffix}"
    run_ok("export", plan_file, "--format", "kvtuner", "--out", table)
    assert "written to" in capsys.readouterr().out
    back = tmp_path / "back.json"
    run_ok(
        "import",
        table,
        "--format",
        "kvtuner",
        "--geometry",
        "4,2,16,8",
        "--param",
        "group_size=16",
        "--residual",
        "32",
        "--name",
        "tiny-llama",
        "--out",
        back,
    )
    assert "plan written to" in capsys.readouterr().out
    original, again = Plan.load(plan_file), Plan.load(back)
    np.testing.assert_array_equal(again.bits_array(), original.bits_array())
    assert again.model == original.model and again.allocator == KVTUNER_ALLOCATOR
    assert again.quantizer["params"]["group_size"] == 16 and again.residual_length == 32
    again.check_quantizer(original.design())
    if suffix == ".json":
        assert json.loads(table.read_text()) == export_kvtuner(original)


def test_cli_import_defaults(tmp_path, plan_file):
    table = tmp_path / "exported.json"
    run_ok("export", plan_file, "--format", "kvtuner", "--out", table)
    back = tmp_path / "back.json"
    run_ok("import", table, "--format", "kvtuner", "--geometry", "4,2,64", "--out", back)
    plan = Plan.load(back)
    assert plan.model["name"] == "exported" and plan.model["num_heads"] is None and plan.model["head_dim"] == 64
    assert plan.quantizer["name"] == "kivi" and plan.residual_length == 128 and plan.sink_tokens == 0


def test_cli_import_reads_the_geometry_of_a_model(tmp_path, tiny_model_dir):
    table = {str(i): {str(h): {"nbits_key": 4, "nbits_value": 2} for h in range(2)} for i in range(3)}
    path = tmp_path / "kvtuner.json"
    path.write_text(json.dumps(table))
    back = tmp_path / "plan.json"
    run_ok("import", path, "--format", "kvtuner", "--model", tiny_model_dir, "--param", "group_size=16", "--out", back)
    plan = Plan.load(back)
    assert (plan.model["num_layers"], plan.model["num_kv_heads"], plan.model["head_dim"]) == (3, 2, 16)
    assert plan.model["name"] == tiny_model_dir.name and plan.avg_bits == 3.0


def test_cli_export_layers(tmp_path, plan_file, capsys):
    out = tmp_path / "layers.json"
    run_ok("export", plan_file, "--format", "layers", "--out", out)
    text = capsys.readouterr().out
    assert "key bits" in text and "predicted distortion" in text
    assert json.loads(out.read_text()) == export_layers(Plan.load(plan_file))
    run_ok("export", plan_file, "--format", "layers", "--strategy", "layerwise", "--out", out, "--force")
    assert json.loads(out.read_text())["strategy"] == "layerwise"


def test_cli_errors_are_one_line_with_exit_2(tmp_path, plan_file, capsys):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    # the output is checked before anything is read
    err = run_error(capsys, "export", tmp_path / "missing.json", "--format", "kvtuner", "--out", out)
    assert "already exists" in err and out.read_text() == "keep me"
    err = run_error(
        capsys, "import", tmp_path / "missing.json", "--format", "kvtuner", "--geometry", "4,2,16", "--out", out
    )
    assert "already exists" in err
    assert "not found" in run_error(
        capsys, "export", tmp_path / "missing.json", "--format", "kvtuner", "--out", tmp_path / "a.json"
    )
    assert "--strategy applies" in run_error(
        capsys, "export", plan_file, "--format", "kvtuner", "--strategy", "layerwise", "--out", tmp_path / "b.json"
    )
    assert "directory" in run_error(capsys, "export", plan_file, "--format", "layers", "--out", tmp_path)
    table = tmp_path / "kvtuner.json"
    run_ok("export", plan_file, "--format", "kvtuner", "--out", table)
    hostile = json.loads(table.read_text())
    hostile["1"]["0"]["nbits_key"] = 9
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(hostile))
    err = run_error(
        capsys,
        "import",
        bad,
        "--format",
        "kvtuner",
        "--geometry",
        "4,2,16",
        "--param",
        "group_size=16",
        "--out",
        tmp_path / "c.json",
    )
    assert str(bad) in err and "layer 1 head 0 nbits_key" in err
    err = run_error(
        capsys,
        "import",
        table,
        "--format",
        "kvtuner",
        "--geometry",
        "6,2,16",
        "--param",
        "group_size=16",
        "--out",
        tmp_path / "c.json",
    )
    assert "has 4 layers but the model has 6" in err
    err = run_error(
        capsys,
        "import",
        table,
        "--format",
        "kvtuner",
        "--geometry",
        "4,2,16",
        "--residual",
        "40",
        "--out",
        tmp_path / "c.json",
    )
    assert "residual length 40 is not a multiple" in err  # kivi's default group of 32 tokens
    err = run_error(
        capsys,
        "import",
        table,
        "--format",
        "kvtuner",
        "--geometry",
        "4,2,16",
        "--param",
        "bogus=1",
        "--out",
        tmp_path / "c.json",
    )
    assert "bogus" in err
    err = run_error(
        capsys,
        "import",
        table,
        "--format",
        "kvtuner",
        "--geometry",
        "4,2,16",
        "--trust-remote-code",
        "--out",
        tmp_path / "c.json",
    )
    assert "--trust-remote-code applies to --model" in err
    assert not (tmp_path / "c.json").exists()
    mixed = tmp_path / "mixed.json"
    run_ok("import", table, "--format", "kvtuner", "--geometry", "4,2,16", "--param", "group_size=16", "--out", mixed)
    assert len(set(Plan.load(mixed).bits["key"][1])) > 1  # widths differ within a layer, and there is no fit
    assert "no fitted curves" in run_error(capsys, "export", mixed, "--format", "layers", "--out", tmp_path / "d.json")


@pytest.mark.parametrize("geometry", ["4,2", "4,2,16,8,1", "4,x,16", "4,2,16,3", "0,2,16", "4,,16"])
def test_cli_bad_geometry_is_a_usage_error(tmp_path, capsys, geometry):
    with pytest.raises(SystemExit) as info:
        main(["import", "t.json", "--format", "kvtuner", "--geometry", geometry, "--out", str(tmp_path / "p.json")])
    assert info.value.code == 2
    assert "--geometry" in capsys.readouterr().err


def test_cli_import_needs_a_model_or_a_geometry(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["import", "t.json", "--format", "kvtuner", "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit):
        main(["import", "t.json", "--format", "kvtuner", "--model", "m", "--geometry", "4,2,16", "--out", "p.json"])


# ---------------------------------------------------------------------------------------------------------
# Hostile sizes, names, encodings and paths
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "geometry, fragment",
    [
        ("1000000000,1,64", "num_layers must be from 1 to 4096"),
        ("1,1000000000,64", "num_kv_heads must be from 1 to 4096"),
        ("4,2,1000000000", "head_dim must be from 1 to 65536"),
        ("4096,4096,64", "more than 1048576 (layer, kv-head) pairs"),
        ("4,2,16," + "9" * 5000, "expected LAYERS,KV_HEADS,HEAD_DIM"),
    ],
)
def test_import_bounds_the_geometry_as_plans_are_bounded(tmp_path, capsys, geometry, fragment):
    """A stated geometry is held to a plan's limits before anything is allocated for it (a billion layers used to
    allocate until memory ran out), on the command line and in the library."""
    with pytest.raises(SystemExit) as info:
        main(["import", "t.json", "--format", "kvtuner", "--geometry", geometry, "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "--geometry" in err and fragment in err
    if "9999" not in geometry:
        with pytest.raises(PlanError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            do_import({}, geometry=Geometry(*(int(x) for x in geometry.split(","))))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_byte_order_mark_is_read_the_same_in_json_and_yaml(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    plan = make_plan()
    text = kvtuner_text(plan, yaml=suffix == ".yaml")
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_kvtuner(marked) == read_kvtuner(plain)
    np.testing.assert_array_equal(do_import(read_kvtuner(marked)).bits_array(), plan.bits_array())


def test_export_does_not_replace_a_dangling_link_without_force(tmp_path, plan_file, capsys):
    link = tmp_path / "table.json"
    link.symlink_to(tmp_path / "nowhere" / "target.json")
    err = run_error(capsys, "export", plan_file, "--format", "kvtuner", "--out", link)
    assert "already exists" in err and link.is_symlink() and not link.exists()
    with pytest.raises(PlanError, match="already exists"):  # the library refuses it too
        Plan.load(plan_file).to_json(link)
    run_ok("export", plan_file, "--format", "kvtuner", "--out", link, "--force")
    assert not link.is_symlink() and json.loads(link.read_text()) == export_kvtuner(Plan.load(plan_file))


def test_names_from_files_and_arguments_print_inert(tmp_path, capsys):
    """A model name with terminal escapes and line breaks (``import --name``, then ``export``) prints on one line
    with the escapes shown, never sent to the terminal."""
    hostile = "evil\x1b]0;owned\x07\x1b[2J\nratequant: fake line"
    table = tmp_path / "kvtuner.json"
    table.write_text(json.dumps(export_kvtuner(make_plan())))
    plan = tmp_path / "plan.json"
    capsys.readouterr()
    run_ok("import", table, "--format", "kvtuner", "--geometry", "4,2,16", "--param", "group_size=16",
           "--residual", "32", "--name", hostile, "--out", plan)  # fmt: skip
    run_ok("export", plan, "--format", "kvtuner", "--out", tmp_path / "again.json")
    out = capsys.readouterr().out
    assert Plan.load(plan).model["name"] == hostile  # stored as given
    assert "\x1b" not in out and "\x07" not in out
    assert r"evil\x1b]0;owned\x07\x1b[2J ratequant: fake line" in out
    assert not any(line.startswith("ratequant: fake line") for line in out.splitlines())
