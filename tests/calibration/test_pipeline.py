import json

import numpy as np
import pytest
import torch

from ratequant.allocation import Budget
from ratequant.calibration import CalibrationSettings, calibrate, pipeline
from ratequant.cli import main
from ratequant.errors import RateQuantError
from ratequant.inputs.corpora import load_corpus
from ratequant.inputs.models import load_model
from ratequant.plan import Plan


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    line = "the quick brown fox {i} jumps over the lazy dog. def f(x): return x + {i}"
    path.write_text("\n\n".join(line.format(i=i) * 4 for i in range(60)))
    return path


def test_calibrate_library_call_meets_the_budget_and_records_evidence(tiny_model_dir, corpus_file):
    loaded = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(corpus_file))
    settings = CalibrationSettings(
        quantizer="uniform", budget=Budget.avg_bits(3.5), seq_len=32, sequences=2, residual_length=0
    )
    run = calibrate(loaded, corpus, settings)
    bits = run.plan.bits_array()
    assert bits.shape == (2, 3, 2) and bits.mean() == 3.5 and run.plan.avg_bits == 3.5
    assert run.table.values.shape == (2, 3, 2, 7) and (np.diff(run.table.values, axis=-1) < 0).mean() > 0.9  # 2..8
    assert 2.0 < run.fit.beta_key < 8.0 and 2.0 < run.fit.beta_value < 8.0
    assert run.plan.calibration["tokens"] == 64 and run.plan.calibration["corpus_sha256"] == corpus.sha256
    assert set(run.phases) == {"capture", "sink_tokens", "distortion", "fit", "allocation", "choice"}
    # the plan is the candidate with the least held-out KL: RateQuant's widths or a fixed split of the budget
    assert {"ratequant", "K4V3", "K3V4"} <= set(run.candidates) and run.plan.calibration["choice"] == run.chosen
    assert run.candidates[run.chosen] == min(run.candidates.values())
    assert run.plan.calibration[f"choice_kl_{run.chosen}"] == run.candidates[run.chosen]
    assert run.plan.sink_tokens in (0, 1, 2, 4, 8) and run.plan.calibration["sink_tokens_chosen"] == "auto"
    assert run.plan.calibration["bos_token_id"] is None  # the tiny tokenizer adds no BOS
    # the plan carries the measured table behind the fit
    columns = [run.table.bitset.index(b) for b in run.fit.bitset]
    assert np.allclose(
        np.array([run.plan.fit["measured"]["key"], run.plan.fit["measured"]["value"]]), run.table.values[..., columns]
    )


def test_uninformative_widths_are_left_out_of_the_allocation(tiny_model_dir, corpus_file):
    """1-bit min-max keeps only each group's extremes: worse than the mean, so not allocatable by default."""
    from ratequant.calibration import collect_statistics, fit_design
    from ratequant.measure.distortion import measure_distortion
    from ratequant.quantizers import get_quantizer

    loaded = load_model(str(tiny_model_dir))
    stats = collect_statistics(loaded, load_corpus(str(corpus_file)), seq_len=32, sequences=2, metric="mse")
    uniform, turbo = get_quantizer("uniform"), get_quantizer("turbo")
    pooled = measure_distortion(stats, uniform, range(1, 9), "mse").informative_widths("pooled")
    assert pooled == ((2, 3, 4, 5, 6, 7, 8),) * 2
    pooled = measure_distortion(stats, turbo, range(1, 9), "mse").informative_widths("pooled")
    assert pooled == ((1, 2, 3, 4, 5, 6, 7, 8),) * 2
    # fit_design drops them from the fit and floors the curves at them; the table keeps every width
    design = fit_design(stats, uniform, metric="mse")
    assert design.design == "uniform" and design.table.bitset == (1, 2, 3, 4, 5, 6, 7, 8)
    assert design.fit.bitset == (2, 3, 4, 5, 6, 7, 8) and design.curves.lowest_widths() == (2, 2)
    assert design.curves.design == "uniform" and design.curves.label == "mse"
    assert set(design.seconds) == {"distortion", "fit"}
    every = fit_design(stats, uniform, metric="mse", informative_only=False)
    assert every.fit.bitset == (1, 2, 3, 4, 5, 6, 7, 8) and every.curves.lowest_widths() == (1, 1)
    corpus = load_corpus(str(corpus_file))
    base = dict(quantizer="uniform", budget=Budget.avg_bits(2.5), seq_len=32, sequences=2, residual_length=0)
    base["bitset"] = tuple(range(1, 9))  # the default widths start at 2 anyway
    run = calibrate(loaded, corpus, CalibrationSettings(**base))
    assert run.plan.bits_array().min() >= 2 and run.curves.lowest_widths() == (2, 2)
    kept = calibrate(loaded, corpus, CalibrationSettings(**base, informative_only=False))
    assert kept.fit.bitset == (1, 2, 3, 4, 5, 6, 7, 8)


def test_the_measured_distortions_give_a_candidate_where_the_fit_misleads(tiny_model_dir, corpus_file, monkeypatch):
    """One component whose distortion does not fall until 5 bits, then collapses: the shared-beta fit cannot
    follow it, the same allocator on the measured table can, and that allocation becomes a candidate."""
    from dataclasses import replace

    from ratequant.calibration import allocate_design, candidates_of, collect_statistics, fit_design
    from ratequant.measure.distortion import measure_distortion
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import StoragePolicy

    def cliff(*args, **kwargs):
        table = measure_distortion(*args, **kwargs)
        values = np.array(table.values)
        top = values[..., table.bitset.index(2)].max() * 50
        values[0, 0, 0] = [top if b < 5 else top * 1e-3 * 2.0 ** (5 - b) for b in table.bitset]
        return replace(table, values=values)

    monkeypatch.setattr(pipeline, "measure_distortion", cliff)
    loaded = load_model(str(tiny_model_dir))
    stats = collect_statistics(loaded, load_corpus(str(corpus_file)), seq_len=32, sequences=2, metric="mse")
    fitted = fit_design(stats, get_quantizer("kivi"), metric="mse", bitset=range(2, 9))
    measured = fitted.measured_curves()
    assert measured.source == "measured" and measured.bitset == fitted.curves.bitset and measured.min_bits is None
    assert (np.diff(measured.values, axis=-1) <= 0).all()  # never worse at a wider width
    settings = CalibrationSettings(budget=Budget.avg_bits(3.0), metric="mse", residual_length=0, sink_tokens=0)
    calibrated = allocate_design(loaded, settings, StoragePolicy(get_quantizer("kivi"), 0, 0), fitted)
    found = calibrated.measured_allocation
    assert found is not None and found.method == "ratequant-measured" and found.avg_bits == 3.0
    assert found.bits[0, 0, 0] >= 5 and not np.array_equal(found.bits, calibrated.allocation.bits)
    assert measured.total(found.bits) < measured.total(calibrated.allocation.bits)  # optimal on what was measured
    names = [c.name for c in candidates_of(settings, calibrated, settings.budget, qualified=False)]
    assert names[:2] == ["ratequant", "ratequant-measured"] and "K3V3" in names
    plain = allocate_design(loaded, replace(settings, choose=False), calibrated.policy, fitted)
    assert plain.measured_allocation is None


def test_curves_from_another_design_and_settings_validation(tiny_model_dir, corpus_file):
    """The paper's mismatch: any strategy allocates with another design's curves; the run records whose."""
    with pytest.raises(RateQuantError, match="unknown allocation strategy 'mismatched'"):
        CalibrationSettings(strategy="mismatched")
    with pytest.raises(RateQuantError, match="unknown quantizer"):
        CalibrationSettings(quantizer="nope")
    with pytest.raises(RateQuantError, match="unknown quantizer"):
        CalibrationSettings(curves_from="nope")
    loaded = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(corpus_file))
    settings = CalibrationSettings(
        quantizer="uniform",
        curves_from="kivi",
        strategy="layer-kind",
        budget=Budget.avg_bits(3.0),
        seq_len=32,
        sequences=1,
        residual_length=0,
    )
    run = calibrate(loaded, corpus, settings)
    assert run.allocation.method == "layer-kind" and run.plan.allocator == "layer-kind"
    assert run.curves.design == "kivi" and run.allocation.details["curves"]["design"] == "kivi"
    assert run.plan.quantizer["name"] == "uniform" and run.table.quantizer["name"] == "kivi"
    assert run.plan.bits_array().mean() == 3.0
    bits = run.plan.bits_array()
    assert all(len(np.unique(bits[k, layer])) == 1 for k in range(2) for layer in range(3))


def test_allocate_for_checks_shapes_and_uses_the_settings_widths():
    from ratequant.allocation import CostModel, Curves
    from ratequant.allocation.fitting import fit_distortion
    from ratequant.calibration import allocate_for
    from ratequant.geometry import Geometry

    g = Geometry(2, 2, 16)
    rng = np.random.default_rng(0)
    table = np.exp(rng.normal(0, 1, (2, 2, 2, 1))) * 4.0 ** -np.arange(1, 9, dtype=float)
    curves = Curves.from_fit(fit_distortion(table, range(1, 9)))
    settings = CalibrationSettings(
        quantizer="uniform", budget=Budget.avg_bits(3.0), bitset=(2, 3, 4), residual_length=0
    )
    cost = CostModel.from_policy(settings.policy(), g, 4096)
    alloc = allocate_for(settings, curves, g, cost)
    assert alloc.avg_bits == 3.0 and set(np.unique(alloc.bits)) <= {2, 3, 4} and alloc.bytes_per_token is not None
    with pytest.raises(RateQuantError, match="but the model has"):
        allocate_for(settings, curves, Geometry(3, 2, 16), cost)


def test_calibrate_and_inspect_commands(tmp_path, capsys, tiny_model_dir, corpus_file):
    plan_path = tmp_path / "plan.json"
    args = [
        "calibrate",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        str(corpus_file),
        "--quantizer",
        "kivi",
        "--avg-bits",
        "2.5",
        "--seq-len",
        "32",
        "--sequences",
        "2",
        "--out",
        str(plan_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fit: beta key" in out and "keys    mean" in out and "R^2" in out
    assert "average code bits 2.5000" in out and "time capture" in out
    plan = Plan.load(plan_path)
    assert plan.avg_bits == 2.5 and plan.quantizer["name"] == "kivi" and plan.allocator.startswith("ratequant")
    assert json.loads(plan_path.read_text())["format_version"] == 2
    # refusing to overwrite, then overwriting with --force
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    heatmap, curves = tmp_path / "bits.png", tmp_path / "curves.png"
    assert main(["inspect", str(plan_path), "--heatmap", str(heatmap), "--curves", str(curves)]) == 0
    out = capsys.readouterr().out
    assert "keys" in out and "values" in out and "beta key" in out
    for png in (heatmap, curves):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # the KL search, and a bad count for it
    assert main([*args, "--force", "--search", "3", "--search-tokens", "32"]) == 2  # never quantized: refused
    assert "residual window (128)" in capsys.readouterr().err
    assert main([*args, "--force", "--search", "3", "--search-tokens", "32", "--residual", "0"]) == 0
    assert "KL search on 32 calibration tokens" in capsys.readouterr().out
    assert Plan.load(plan_path).calibration["search_proposals"] == 3
    assert main(["inspect", str(plan_path)]) == 0
    assert "KL search: from " in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main([*args, "--force", "--search", "-1"])
    assert refused.value.code == 2 and "--search" in capsys.readouterr().err


def test_calibrate_rejects_unreachable_budgets(tmp_path, capsys, tiny_model_dir, corpus_file):
    code = main(
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--avg-bits",
            "9",
            "--seq-len",
            "32",
            "--sequences",
            "1",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "ratequant: error:" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_default_model_kivi_at_2_5_bits(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    args = ["calibrate", "--quantizer", "kivi", "--avg-bits", "2.5", "--sequences", "2", "--out", str(plan_path)]
    assert main(args) == 0
    plan = Plan.load(plan_path)
    assert plan.avg_bits == 2.5 and plan.bits_array().shape == (2, 30, 3)
    assert 3.0 < plan.fit["beta_key"] < 6.5 and 3.0 < plan.fit["beta_value"] < 6.5
    assert plan.fit["r2_overall"] > 0.9


def test_sink_tokens_are_chosen_from_the_calibration_data():
    """A first token far out of range (an attention sink's key) dominates the error until it is kept aside."""
    from ratequant.calibration import choose_sink_tokens
    from ratequant.geometry import Geometry
    from ratequant.measure.capture import CalibrationStats
    from ratequant.quantizers import get_quantizer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 64, 16, generator=g), torch.randn(2, 1, 2, 64, 16, generator=g)
    plain = CalibrationStats(
        keys=keys.clone(),
        values=values,
        queries=None,
        key_grads=None,
        value_grads=None,
        attention_mask=torch.ones(1, 64, dtype=torch.bool),
        geometry=Geometry(2, 2, 16),
    )
    keys[:, :, :, 0] *= 40.0  # the sink
    sunk = CalibrationStats(
        keys=keys,
        values=values,
        queries=None,
        key_grads=None,
        value_grads=None,
        attention_mask=torch.ones(1, 64, dtype=torch.bool),
        geometry=Geometry(2, 2, 16),
    )
    kivi = get_quantizer("kivi", group_size=8)
    chosen, totals = choose_sink_tokens(sunk, kivi, metric="mse")
    assert chosen == 1 and totals[1] < 0.5 * totals[0]
    assert choose_sink_tokens(plain, kivi, metric="mse")[0] == 0


def test_kl_search_refines_the_allocation_within_the_budget(tiny_model_dir, corpus_file, monkeypatch):
    """``search_proposals`` moves bits between components on the KL they cause on the calibration text: the
    search text's KL never rises, the budget and the allowed widths hold, and the plan records the search."""
    loaded = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(corpus_file))
    common = {
        "quantizer": "uniform",
        "budget": Budget.avg_bits(3.5),
        "seq_len": 32,
        "sequences": 2,
        "residual_length": 0,
    }
    base = calibrate(loaded, corpus, CalibrationSettings(**common, b_max=5))  # the allocation the search starts from
    settings = CalibrationSettings(**common, search_proposals=30, search_tokens=48, b_max=5)
    run = calibrate(loaded, corpus, settings)
    c = run.plan.calibration
    assert c["search_proposals"] == 30 and c["search_tokens"] == 48 and "search" in run.phases
    assert c["search_kl"] < c["search_kl_start"] and 0 < c["search_moves_kept"] <= 30  # this case finds moves
    assert run.plan.allocator == "ratequant+kl-search" and run.plan.avg_bits == 3.5
    # it starts from the allocation or a fixed split of the same size, whichever causes less KL there
    starts = {k.removeprefix("search_kl_"): v for k, v in c.items() if k.startswith("search_kl_") and k[10:] != "start"}
    assert {"ratequant", "K3V4", "K4V3", "K2V5", "K5V2"} <= set(starts) and c["search_start"] in starts
    assert c["search_kl_start"] == min(starts.values()) == starts[c["search_start"]]
    bits, base_bits = run.plan.bits_array(), base.plan.bits_array()
    start = (
        base_bits
        if c["search_start"] == "ratequant"
        else np.array([[[int(c["search_start"][1])]], [[int(c["search_start"][3])]]])
    )
    assert bits.sum() == base_bits.sum() and bits.max() <= 5
    # the moves stay only if they help on the held-out window too
    assert ("search_kept" in c) == (c["search_moves_kept"] > 0)
    assert c.get("search_kept", False) == bool((bits != start).any())
    if c.get("search_kept") is not None:
        assert c["search_kept"] == (c["search_held_out_kl"] < c["search_held_out_kl_start"])
    assert Plan.from_dict(json.loads(json.dumps(run.plan.to_dict()))) == run.plan  # the record survives a round trip

    # moves that do not help on the held-out window are dropped: the plan is the start
    def kl_on(model, windows):  # the search window rewards every move away from RateQuant, the held-out one
        held_out = windows.ids.data_ptr() == held_out_ptr[0]  # punishes them (fixed splits: worst on both)

        def kl(spec):
            bits = np.array(spec.bits)
            split = len(set(bits[0].flat)) == 1 and len(set(bits[1].flat)) == 1 and (bits != base_bits).any()
            distance = float(np.abs(bits - base_bits).sum())
            return 100.0 if split else distance if held_out else -distance

        return kl

    held_out_ptr = [None]
    real_windows = pipeline.search_windows

    def windows_noting_held_out(*args):
        windows = real_windows(*args)
        held_out_ptr[0] = windows.ids[1:].data_ptr()
        return windows

    monkeypatch.setattr(pipeline, "kl_on", kl_on)
    monkeypatch.setattr(pipeline, "search_windows", windows_noting_held_out)
    dropped = calibrate(loaded, corpus, settings).plan
    d = dropped.calibration
    assert d["search_moves_kept"] > 0 and d["search_kept"] is False and d["search_start"] == "ratequant"
    assert (dropped.bits_array() == base_bits).all()
    # a search text the corpus cannot fill is refused before any measurement
    monkeypatch.setattr(pipeline, "collect_statistics", lambda *a, **k: pytest.fail("measured before the check"))
    with pytest.raises(RateQuantError, match="token"):
        calibrate(loaded, corpus, CalibrationSettings(**common, search_proposals=1, search_tokens=10**6))


def test_kl_search_keeps_a_move_only_when_the_kl_falls():
    from ratequant.allocation import CostModel, Curves
    from ratequant.calibration.search import search_allocation
    from ratequant.geometry import Geometry
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    geometry = Geometry(num_layers=2, num_kv_heads=2, head_dim=8)
    widths = (2, 3, 4)
    values = np.broadcast_to(2.0 ** -np.array(widths, dtype=float), (*geometry.shape, 3)).copy()
    values[0, 0, 0] *= 100  # the curves point at the right move: keys of (0, 0) gain most from a bit,
    values[1, 1, 1] /= 100  # values of (1, 1) lose least
    curves = Curves(values, widths, "model")
    spec = KVQuantSpec(np.full(geometry.shape, 3), get_quantizer("uniform"), residual_length=0)
    cost = CostModel.from_policy(spec.policy, geometry, 256)
    target = np.array(spec.bits)
    target[0, 0, 0], target[1, 1, 1] = 4, 2  # the only better allocation: keys of (0, 0) wider, values of (1, 1)

    def kl(s):  # a stand-in for the model's KL: the distance to the target
        return float(np.abs(np.array(s.bits) - target).sum())

    result = search_allocation(kl, spec, curves, cost, proposals=40, seed=1)
    assert (result.bits == target).all() and result.kl == 0 and result.start_kl == 2
    assert result.accepted == 1 and list(result.trace) == sorted(result.trace, reverse=True)
    assert result.bits.sum() == spec.bits.sum()
    with pytest.raises(RateQuantError, match="search proposals"):
        search_allocation(kl, spec, curves, cost, proposals=-1)


def _biased_qwen2(tokenizer, bias: float = 60.0):
    """A tiny Qwen2 model whose layer 0 has a large constant bias on kv-head 1's key projection (as real Qwen2
    models carry in a few layers), wrapped as a LoadedModel."""
    from ratequant.compat import model_geometry
    from ratequant.inputs.models import LoadedModel
    from tests.conftest import tiny_model

    model = tiny_model("qwen2", seed=5)
    with torch.no_grad():
        k_bias = model.model.layers[0].self_attn.k_proj.bias
        # kv-head 1 (head dim 16): the channels RoPE turns slowest (pairs 6, 7 of 8), so the bias stays a near
        # constant offset over the sequence, as Qwen2's large key biases do
        k_bias[[22, 23, 30, 31]] = torch.tensor([bias, -bias, bias, -bias])
    return LoadedModel(model, tokenizer, "biased-qwen2", "test", model_geometry(model))


def test_per_component_floors_single_out_the_biased_head(corpus_file):
    """One head's key bias makes its narrow per-token widths uninformative; only that head starts higher, and the
    allocation gives it more bits instead of forcing every key up (the pooled rule did)."""
    from tests.conftest import tiny_tokenizer

    loaded = _biased_qwen2(tiny_tokenizer())
    corpus = load_corpus(str(corpus_file))
    settings = CalibrationSettings(
        quantizer="uniform",
        budget=Budget.avg_bits(3.0),
        metric="mse",
        seq_len=32,
        sequences=2,
        residual_length=0,
        sink_tokens=0,
        choose=False,
    )
    run = calibrate(loaded, corpus, settings)
    floors = run.curves.component_min_bits()
    assert floors[0, 0, 1] > floors[0, 0, 0] and floors[0, 0, 1] > floors[0, 1:].max()  # only the biased head
    assert floors[0, 0, 1] > run.table.component_floors()[0, 1:].max()
    pooled = run.table.informative_widths("kind")[0][0]
    assert pooled == floors[0].max() > floors[0].min()  # the pooled rule would have floored every key there
    bits = run.plan.bits_array()
    assert bits[0, 0, 1] >= floors[0, 0, 1] and bits[0, 0, 1] > np.median(bits[0])
    assert (bits >= floors).all() and bits.mean() == 3.0
    assert run.allocation.details["curves"]["floors"]["key"][0][1] == int(floors[0, 0, 1])


def test_the_plan_is_the_candidate_with_the_least_held_out_kl(tiny_model_dir, corpus_file, monkeypatch):
    """A stand-in KL that prefers each fixed split in turn: the plan follows it and records every candidate's KL;
    without the choice the plan is RateQuant's allocation."""
    loaded = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(corpus_file))
    settings = CalibrationSettings(
        quantizer="kivi",
        budget=Budget.avg_bits(2.5),
        metric="mse",
        seq_len=32,
        sequences=2,
        residual_length=0,
        sink_tokens=0,
    )
    for key, value in ((3, 2), (2, 3)):

        def stand_in(model, windows, key=key, value=value):
            return lambda spec, window: 0.1 if (spec.bits[0] == key).all() and (spec.bits[1] == value).all() else 0.3

        monkeypatch.setattr(pipeline, "window_kl", stand_in)
        run = calibrate(loaded, corpus, settings)
        bits = run.plan.bits_array()
        assert (bits[0] == key).all() and (bits[1] == value).all() and run.plan.avg_bits == 2.5
        assert {"ratequant", "K3V2", "K2V3"} == set(run.candidates) and run.candidates[run.chosen] == 0.1
        assert run.plan.calibration["choice"] == run.chosen and run.plan.calibration["choice_kl_K3V2"] in (0.1, 0.3)
        assert run.plan.calibration["choice_windows"] == 1 and set(run.candidate_windows.values()) == {1}
    off = calibrate(loaded, corpus, replace_settings(settings, choose=False))
    assert off.candidates == {} and "choice" not in off.plan.calibration and off.plan.allocator == "ratequant"


def replace_settings(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


def test_auto_compares_every_design_at_the_same_true_bytes(tiny_model_dir, corpus_file, monkeypatch):
    """``quantizer="auto"``: every design is calibrated and allocated at the bytes the reference design takes at
    the budget; the plan is the candidate the KL prefers, of whichever design."""
    from ratequant.quantizers import available

    loaded = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(corpus_file))

    def prefer_turbo(model, windows):
        return lambda spec: 0.05 if spec.quantizer.name == "turbo" and spec.bits.std() > 0 else 0.3

    monkeypatch.setattr(pipeline, "kl_on", prefer_turbo)
    settings = CalibrationSettings(
        quantizer="auto",
        budget=Budget.avg_bits(3.0),
        metric="mse",
        seq_len=32,
        sequences=2,
        residual_length=0,
        sink_tokens=0,
    )
    run = calibrate(loaded, corpus, settings)
    plan = run.plan
    designs = {name.split("/")[0] for name in run.candidates}
    assert designs == set(available()) and "kivi/ratequant" in run.candidates
    assert plan.quantizer["name"] == "turbo" and run.chosen.startswith("turbo/")
    assert plan.budget["kind"] == "bytes_per_token" and plan.bytes_per_token <= plan.budget["value"] * (1 + 1e-9)
    assert plan.calibration["quantizer_chosen"] == "auto" and "3" in plan.calibration["requested_budget"]
    with pytest.raises(RateQuantError, match="auto"):
        CalibrationSettings(quantizer="auto", quantizer_params={"group_size": 64})
