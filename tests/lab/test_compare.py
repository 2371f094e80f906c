"""ratequant compare and its report, end to end on a tiny model (and once, marked slow, on the default model)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from ratequant.allocation import Budget
from ratequant.calibration import CalibrationSettings
from ratequant.cli import main
from ratequant.errors import RateQuantError
from ratequant.lab import QUICK_SIZES, CompareConfig, CompareResults, run_compare
from ratequant.lab.methods import hybrid_rank, pick_mismatch_sources
from ratequant.lab.report import check_output, repeat_command, write_report
from ratequant.lab.report.markdown import report_markdown
from ratequant.quantizers import get_quantizer

BUDGETS = (2.5, 3.0)
DESIGNS = ("kivi", "quarot", "turbo", "uniform")
SPLITS = {2.5: {"K3V2", "K2V3"}, 3.0: {"K4V2", "K2V4"}}
TEXT = "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog. def f(x): return x + {i}" * 4 for i in range(60))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class one_thread:
    """Tiny models run far faster on one thread (module fixtures start before the per-test autouse one)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@pytest.fixture(scope="module")
def setup():
    from ratequant.compat import model_geometry
    from ratequant.inputs.corpora import Corpus
    from ratequant.inputs.models import LoadedModel
    from tests.conftest import tiny_model, tiny_tokenizer

    model = tiny_model("llama", num_hidden_layers=2)  # 2 layers x 2 kv heads: N = 8 components, head_dim 16
    corpus = Corpus("tiny", TEXT[: len(TEXT) // 3], TEXT[len(TEXT) // 3 :])
    return LoadedModel(model, tiny_tokenizer(), "tiny-llama", "memory", model_geometry(model)), corpus


@pytest.fixture(scope="module")
def config():
    return CompareConfig.from_options(
        model="tiny",
        corpus="tiny",
        budgets=BUDGETS,
        designs=DESIGNS,
        seq_len=48,
        windows=3,
        calibration_seq_len=48,
        calibration_sequences=2,
    )


@pytest.fixture(scope="module")
def results(setup, config):
    with one_thread():
        return run_compare(*setup, config, progress=False)


@pytest.fixture(scope="module")
def report_dir(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(results, out, command="ratequant compare (test)", summary_image_prefix="docs/results/")
    return out


# -- configuration ----------------------------------------------------------------------------------------
def test_config_round_trips_through_json_and_is_validated(tmp_path, config):
    assert CompareConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = config.to_json(tmp_path / "config.json")
    assert CompareConfig.load(path) == config
    data = json.loads(path.read_text())
    assert data["format_version"] == 3 and data["budgets"] == [2.5, 3.0] and data["designs"] == list(DESIGNS)
    quick = CompareConfig.quick()
    assert (quick.budgets, quick.seq_len, quick.windows, quick.calibration.sequences) == (
        QUICK_SIZES["budgets"],
        QUICK_SIZES["seq_len"],
        QUICK_SIZES["windows"],
        QUICK_SIZES["calibration"]["sequences"],
    )
    assert quick.calibration.residual_length == 0 and quick.calibration.sink_tokens == 0  # the papers' storage
    assert quick.command("results/demo") == "ratequant compare --quick --out results/demo"
    for no_flags in (
        CompareConfig.full(long_context_tokens=None),
        CompareConfig.full(peers=()),
        CompareConfig(hybrid_bits=3),
    ):
        assert no_flags.command("r") == "ratequant compare --config r/config.json --out r"  # no flag makes it
    assert CompareConfig(budgets=(3, 2, 3)).budgets == (2.0, 3.0)  # sorted, unique, floats
    bad = [
        {**data, "format_version": 4},
        {k: v for k, v in data.items() if k != "format_version"},
        {**data, "surprise": 1},
        {**data, "budgets": [9]},
        {**data, "budgets": []},
        {**data, "designs": ["kivi", "nope"]},
        {**data, "designs": ["kivi", "kivi"]},
        {**data, "windows": 0},
        {**data, "residual": -1},  # a version-2 name
        {**data, "calibration": {**data["calibration"], "residual_length": -1}},
        {**data, "calibration": {**data["calibration"], "metric": "psnr"}},
        {**data, "calibration": {**data["calibration"], "strategy": "greedy"}},  # compare sets it per method
        {**data, "calibration": [2, 3]},
        {**data, "hybrid_bits": 9},
        {**data, "budgets": "3"},
        {**data, "long_context_tokens": 512, "long_context_budgets": [4.0]},  # passkey at a budget that is not run
    ]
    assert CompareConfig.from_dict({**data, "long_context_budgets": [4.0]}).long_context_budgets == (
        4.0,
    )  # passkey off
    full = CompareConfig.full()
    assert set(full.long_context_budgets) <= set(full.budgets) and full.long_context_tokens is not None
    for d in bad:
        with pytest.raises(RateQuantError):
            CompareConfig.from_dict(d)


def test_a_version_2_config_reads_as_version_3():
    v2 = {
        "format_version": 2,
        "budgets": [2.5, 3.0],
        "designs": ["kivi"],
        "metric": "fisher",
        "calibration_seq_len": 256,
        "calibration_sequences": 2,
        "residual": 128,
        "sink_tokens": "auto",
        "search_tokens": 512,
        "choice_tokens": None,
        "bitset": [2, 3, 4, 5, 6, 7, 8],
        "passkey_context": 1024,
        "passkey_depths": [0.5],
        "passkey_trials": 3,
        "passkey_budgets": [2.5],
    }
    config = CompareConfig.from_dict(v2)
    assert config == CompareConfig.from_options(
        budgets=(2.5, 3.0),
        designs=("kivi",),
        calibration_seq_len=256,
        calibration_sequences=2,
        residual=128,
        sink_tokens="auto",
        search_tokens=512,
        long_context_tokens=1024,
        long_context_depths=(0.5,),
        long_context_trials=3,
        long_context_budgets=(2.5,),
    )
    saved = config.to_dict()
    assert saved["format_version"] == 3 and "residual" not in saved and "passkey_context" not in saved
    assert saved["calibration"]["residual_length"] == 128 and saved["long_context_tokens"] == 1024
    assert CompareConfig.from_dict(saved) == config


def test_compare_calibrates_each_method_with_calibrate_s_settings():
    config = CompareConfig.from_options(designs=("kivi", "quarot"), residual=128, sink_tokens="auto", budgets=(2.5,))
    settings = config.calibration_settings("quarot", Budget.avg_bits(3.0), sink_tokens=4)
    assert settings == CalibrationSettings(
        quantizer="quarot", budget=Budget.avg_bits(3.0), residual_length=128, sink_tokens=4
    )  # every other field at calibrate's default
    with pytest.raises(RateQuantError, match="b_min"):
        CompareConfig(calibration=CalibrationSettings(b_min=3))
    with pytest.raises(RateQuantError, match="key token group"):  # checked for every design, not only the first
        CompareConfig.from_options(designs=("uniform", "kivi"), residual=48)


def test_kv_splits_meet_the_budget_with_a_bounded_gap():
    c = CompareConfig()
    assert c.kv_splits(3) == [(4, 2), (2, 4)]
    assert c.kv_splits(2.5) == [(3, 2), (2, 3)]
    assert c.kv_splits(2) == []  # the default widths start at 2 bits
    assert CompareConfig.from_options(bitset=range(1, 9)).kv_splits(2) == [(3, 1), (1, 3)]
    assert c.kv_splits(2.25) == []
    assert CompareConfig.from_options(split_max_gap=4, bitset=range(1, 9)).kv_splits(3) == [
        (4, 2),
        (5, 1),
        (2, 4),
        (1, 5),
    ]


def test_hybrid_rank_counts_coefficients_and_metadata():
    uniform = get_quantizer("uniform")  # per-token scale + zero in float16: 32 bits of metadata per token
    assert hybrid_rank(2.5 * 64, uniform, 4, 64) == (160 - 32) // 4
    assert hybrid_rank(3 * 16, uniform, 4, 16) == 4
    assert hybrid_rank(8 * 16, uniform, 4, 16) == 16  # capped at head_dim
    assert hybrid_rank(16, uniform, 4, 16) == 0  # not even the metadata fits


# -- the experiment ---------------------------------------------------------------------------------------
def _least_of_the_longest_scored(method) -> str:
    """The candidate with the least mean held-out KL among those scored on the most windows."""
    kl, windows = method.details["held_out_kl"], method.details["held_out_windows"]
    most = max(windows.values())
    return min((name for name in kl if windows[name] == most), key=kl.get)


def test_every_method_is_run_for_every_design_and_budget(results, setup):
    loaded, _ = setup
    g = loaded.geometry
    fp = results.full_precision
    assert fp.kl == 0.0 and fp.kv_bytes_per_token == g.num_components * g.head_dim * 4 and fp.avg_bits == 32
    for design in DESIGNS:
        source = results.designs[design].mismatch_source
        assert source in DESIGNS and source != design
        for budget in BUDGETS:
            records = [m for m in results.select(design=design, budget=budget) if m.method != "auto"]
            expected = {"layerwise", "RateQuant", f"mismatched ({source} curves)"} | SPLITS[budget]
            if budget == 3.0:
                expected.add("uniform 3")
            (default,) = [m for m in records if m.method == "default"]
            assert {m.label for m in records if m.method != "default"} == expected
            # the default plan is the candidate (RateQuant or a split of the budget) with the least held-out KL
            candidates = default.details["held_out_kl"]
            chosen = default.details["chosen"]
            built = {"ratequant", *SPLITS[budget], *(["K3V3"] if budget == 3.0 else [])}
            assert set(candidates) - {"ratequant-measured"} == built
            assert default.label == f"default plan ({chosen})" and chosen == _least_of_the_longest_scored(default)
            same = {"ratequant": "RateQuant", "K3V3": "uniform 3"}.get(chosen, chosen)
            for twin in [m for m in records if m.label == same]:  # none for RateQuant on the measured distortions
                np.testing.assert_array_equal(default.bits, twin.bits if twin.bits is not None else default.bits)
                assert default.kl == pytest.approx(twin.kl, rel=1e-9)  # the same widths score the same
            assert chosen == "ratequant-measured" or len([m for m in records if m.label == same]) == 1
            for m in records:
                assert math.isfinite(m.ppl) and m.ppl > 1 and math.isfinite(m.kl) and m.kl > 0
                assert m.avg_bits == budget and len(m.window_nll) == 3
                assert math.exp(np.mean(m.window_nll)) == pytest.approx(m.ppl, rel=1e-12)
                assert (m.key_bits + m.value_bits) / 2 == pytest.approx(budget)
                if m.method == "kv-split":
                    assert m.label == f"K{m.key_bits:g}V{m.value_bits:g}"
    for budget in BUDGETS:
        rank = results.select(method="rank", design=None, budget=budget)
        hybrid = results.select(method="rank+quant", design=None, budget=budget)
        assert len(rank) == len(hybrid) == 1
        r, r_h = math.floor(budget * 16 / 16), hybrid_rank(budget * 16, get_quantizer("uniform"), 4, 16)
        assert rank[0].details["rank"] == r and rank[0].kv_bytes_per_token == g.num_components * r * 2
        assert (
            hybrid[0].details["rank"] == r_h and hybrid[0].kv_bytes_per_token == g.num_components * (r_h * 4 + 32) / 8
        )
        assert all(math.isfinite(m.ppl) and m.kl > 0 for m in rank + hybrid)
    # auto: one plan per budget, of whichever design held out best at the reference design's true bytes
    for budget in BUDGETS:
        (auto,) = results.select(method="auto", budget=budget)
        pool = auto.details["held_out_kl"]
        assert {name.split("/")[0] for name in pool} == set(DESIGNS)
        assert auto.details["chosen"] == _least_of_the_longest_scored(auto)
        assert auto.design == auto.details["chosen"].split("/")[0]
        reference = results.extra["choice"][f"{budget:g}"]["auto"]["bytes_per_token"]
        assert auto.kv_bytes_per_token <= reference * (1 + 1e-9)
        (kivi_rq,) = results.select(method="ratequant", design="kivi", budget=budget)
        assert reference == pytest.approx(kivi_rq.kv_bytes_per_token, rel=1e-12)
    # uniform at 2.5 bits is not a width: reported as skipped, with the reason, for every design
    skipped = {(s["design"], s["method"], s["budget"]) for s in results.skipped}
    assert skipped == {(d, "uniform", 2.5) for d in DESIGNS}


def test_true_bytes_count_codes_and_metadata(results):
    # uniform design, residual 0: every component (8 of them, head_dim 16) stores 16 * b code bits + 32 bits of
    # scale and zero per token; every token is quantized as it arrives, so the residual buffers are empty
    for budget in BUDGETS:
        for m in results.select(design="uniform", budget=budget):
            expected = 8 * (16 * budget + 32) / 8
            assert m.kv_bytes_per_token == pytest.approx(expected, rel=1e-12)


def test_full_precision_matches_plain_perplexity_on_both_scorings(results, setup, config):
    from ratequant.evaluation import WindowProtocol, make_windows, perplexity

    loaded, corpus = setup
    assert set(results.evaluations) == {"tiny/all", "tiny/second-half"} and results.primary == "tiny/second-half"
    for scoring in ("all", "second-half"):
        windows = make_windows(
            loaded.tokenizer, corpus.evaluation, WindowProtocol(config.seq_len, config.windows, scoring=scoring)
        )
        with one_thread():
            plain = perplexity(loaded.model, windows, progress=False)
        score = results.full_precision.score(f"tiny/{scoring}")
        assert score.ppl == pytest.approx(plain.ppl, rel=1e-9) and score.tokens == plain.tokens
        assert results.evaluations[f"tiny/{scoring}"]["scored_tokens"] == plain.tokens
    assert results.evaluations["tiny/second-half"]["scored_tokens"] == config.windows * (config.seq_len // 2)


def test_ratequant_is_optimal_under_its_own_curves_and_mismatch_reuses_the_other_curves(results):
    for design in DESIGNS:
        fits = {name: d.fit for name, d in results.designs.items()}
        distance = {
            o: math.hypot(fits[design].beta_key - fits[o].beta_key, fits[design].beta_value - fits[o].beta_value)
            for o in DESIGNS
            if o != design
        }
        assert results.designs[design].mismatch_source == max(distance, key=distance.get)
        assert pick_mismatch_sources(fits)[design] == results.designs[design].mismatch_source
        for budget in BUDGETS:
            (rq,) = results.select(method="ratequant", design=design, budget=budget)
            others = [
                m
                for m in results.select(design=design, budget=budget)
                if m.method in ("uniform", "kv-split", "layerwise")
            ]
            assert all(
                rq.details["predicted_distortion"] <= m.details["predicted_distortion"] * (1 + 1e-12) for m in others
            )
            (mm,) = results.select(method="mismatched", design=design, budget=budget)
            source = mm.details["curves"]["design"]
            (own,) = results.select(method="ratequant", design=source, budget=budget)
            np.testing.assert_array_equal(mm.bits, own.bits)  # the source design's allocation, stored with this one
            assert mm.bits.mean() == budget


@pytest.mark.parametrize("metric", ["kl", "ppl"])
def test_recovered_damage_follows_its_definition(results, metric):
    fp = results.full_precision.ppl
    rows = results.recovered(metric=metric)
    autos = {(results.select(method="auto", budget=b)[0].design, b, "auto") for b in BUDGETS}
    assert {(r["design"], r["budget"], r["method"]) for r in rows} == autos | {
        (d, b, m) for d in DESIGNS for b in BUDGETS for m in ("layerwise", "ratequant", "default", "mismatched")
    }
    for r in rows:
        fixed = [
            m for m in results.select(design=r["design"], budget=r["budget"]) if m.method in ("uniform", "kv-split")
        ]
        best = min(fixed, key=lambda m: getattr(m, metric))
        assert r["best_fixed"] == best.label
        (method,) = [m for m in results.select(design=r["design"], budget=r["budget"]) if m.method == r["method"]]
        if metric == "kl":
            expected = (best.kl - method.kl) / best.kl
            delta = np.mean(np.subtract(best.score().window_kl, method.score().window_kl))
        else:
            expected = (best.ppl - method.ppl) / (best.ppl - fp) if best.ppl > fp else None
            delta = math.log(best.ppl) - math.log(method.ppl)
        assert r["share"] == (pytest.approx(expected, rel=1e-12) if expected is not None else None)
        assert r["delta"] == pytest.approx(delta, abs=1e-12)


def test_saved_config_reruns_to_the_same_numbers(results, setup, report_dir):
    config = CompareConfig.load(report_dir / "config.json")
    assert config == results.config
    with one_thread():
        again = run_compare(*setup, config, progress=False)
    assert [(m.label, m.design, m.budget, m.ppl, m.kl, m.kv_bytes_per_token) for m in again.methods] == [
        (m.label, m.design, m.budget, m.ppl, m.kl, m.kv_bytes_per_token) for m in results.methods
    ]


# -- the report -------------------------------------------------------------------------------------------
def test_results_json_holds_every_number(results, report_dir):
    data = json.loads((report_dir / "results.json").read_text())
    assert data["kind"] == "compare" and data["format_version"] == 3
    seen = set()
    for record in data["results"]:
        for key in ("ppl", "kl", "kv_bytes_per_token", "avg_bits"):
            assert isinstance(record[key], float) and math.isfinite(record[key])
        seen.add((record["method"], record["design"], record["budget"]))
    assert seen == {(m.method, m.design, m.budget) for m in results.methods}
    assert len(seen) == len(data["results"]) - sum(m.method == "kv-split" for m in results.methods) // 2
    for design in DESIGNS:
        d = data["designs"][design]
        assert (d["beta_key"], d["beta_value"], d["r2"]) == (
            results.designs[design].beta_key,
            results.designs[design].beta_value,
            results.designs[design].r2,
        )
        assert d["beta_key"] > 1 and d["beta_value"] > 1 and d["r2"] <= 1
    # the JSON is the results: reading it back gives the same document (the report adds only its file list)
    assert CompareResults.from_dict(data).to_dict() == {k: v for k, v in data.items() if k != "report"}
    assert data["report"]["repeat"] == repeat_command(report_dir)
    assert sorted([*data["report"]["files"], "results.json"]) == sorted(p.name for p in report_dir.iterdir())


def test_markdown_and_plots_are_written_and_rebuilt_from_json(results, report_dir):
    report = (report_dir / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {
        "kl_vs_bits.png",
        "ppl_vs_bits.png",
        "quant_vs_rank.png",
        "bits_2.5.png",
        "bits_3.png",
        *(f"curves_{d}.png" for d in DESIGNS),
    }
    assert set(images) == expected
    for name in expected:
        assert (report_dir / name).read_bytes()[:8] == PNG_MAGIC and (report_dir / name).stat().st_size > 5000
    assert "| design | method | 2.5 bits | 3 bits |" in report
    for design in DESIGNS:
        assert f"| {design} | RateQuant |" in report
    # every (design, budget) where RateQuant loses to the best fixed scheme is said so in the text
    for r in results.recovered(metric="kl"):
        if r["method"] == "ratequant":
            phrase = f"RateQuant does not beat the best fixed scheme for {r['design']} at {r['budget']:g} bits"
            assert (phrase in report) == (r["value"] >= r["best_fixed_value"])
    summary = (report_dir / "summary.md").read_text()
    assert summary.startswith("## Results") and "ratequant compare (test)" in summary
    assert all(link.startswith("docs/results/") for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary))
    data = json.loads((report_dir / "results.json").read_text())
    rebuilt = report_markdown(
        CompareResults.load(report_dir / "results.json"),
        command=data["report"]["command"],
        repeat=data["report"]["repeat"],
        files=data["report"]["files"],
    )
    assert rebuilt == report


def test_an_existing_report_is_kept_without_force(report_dir, results):
    with pytest.raises(RateQuantError, match="--force"):
        check_output(report_dir, overwrite=False)
    with pytest.raises(RateQuantError, match="--force"):
        write_report(results, report_dir)
    check_output(report_dir, overwrite=True)


def test_force_removes_only_files_this_program_wrote(results, tmp_path):
    out = tmp_path / "report"
    write_report(results, out)
    data = json.loads((out / "results.json").read_text())
    # a hostile or edited listing names files the report never wrote, and a figure the user has since changed
    (out / "notes.txt").write_text("mine")
    (out / "curves_kivi.png").write_bytes(b"my own picture")
    (out / "bits_9.png").write_bytes(b"an old figure of ours")
    data["report"]["files"].update(
        {
            "notes.txt": "0" * 64,
            "../outside.txt": "0" * 64,
            "bits_9.png": __import__("hashlib").sha256(b"an old figure of ours").hexdigest(),
        }
    )
    (out / "results.json").write_text(json.dumps(data))
    (tmp_path / "outside.txt").write_text("outside")
    write_report(results, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside.txt").read_text() == "outside"
    assert not (out / "bits_9.png").exists()  # ours, unchanged, and not in the new report: removed
    assert (out / "curves_kivi.png").read_bytes()[:8] == PNG_MAGIC  # replaced by the new report's figure


def test_an_unwritable_report_folder_is_refused_before_the_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RateQuantError, match="cannot write the report into"):
        check_output(blocker / "report", overwrite=False)  # its parent is a file: the folder cannot be made


# -- the command line -------------------------------------------------------------------------------------
def test_cli_compare_then_rerun_from_the_saved_config(tmp_path, tiny_model_dir, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    out, again = tmp_path / "first", tmp_path / "again"
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        str(corpus),
        "--budgets",
        "3",
        "--designs",
        "uniform",
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--calibration-sequences",
        "1",
        "--calibration-seq-len",
        "32",
    ]
    assert main([*args, "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    assert "report written to" in capsys.readouterr().out
    labels = {r["label"] for r in first["results"]}
    assert {"full precision", "uniform 3", "K4V2", "K2V4", "layerwise", "RateQuant"} <= labels
    assert any(s["method"] == "mismatched" and "second design" in s["reason"] for s in first["skipped"])
    # an existing report is refused before any work; --config refuses other experiment options
    assert main([*args, "--out", str(out)]) == 2
    assert main(["compare", "--config", str(out / "config.json"), "--budgets", "2", "--out", str(again)]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["compare", "--config", str(out / "config.json"), "--out", str(again)]) == 0
    second = json.loads((again / "results.json").read_text())
    assert second["config"] == first["config"]
    assert [(r["label"], r["ppl"], r["kl"]) for r in second["results"]] == [
        (r["label"], r["ppl"], r["kl"]) for r in first["results"]
    ]


# -- the default model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_on_the_default_model(default_model, tmp_path):
    from ratequant.inputs.corpora import load_corpus

    config = CompareConfig.from_options(
        budgets=(3.0,),
        designs=("kivi", "turbo"),
        seq_len=128,
        windows=1,
        calibration_seq_len=128,
        calibration_sequences=1,
        choice_tokens=256,
    )
    with one_thread():  # two threads on a loaded 2-core machine spin against each other (170 s against 30 s)
        results = run_compare(default_model, load_corpus(), config, progress=False)
    fp = results.full_precision
    assert 5 < fp.ppl < 60
    for design in config.designs:
        d = results.designs[design]
        assert 3.0 < d.beta_key < 6.5 and 3.0 < d.beta_value < 6.5 and d.r2 > 0.9  # paper: beta 3.6 to 5.3
        records = results.select(design=design, budget=3.0)
        assert len([m for m in records if m.method not in ("default", "auto")]) == 6
        for m in records:
            assert m.kl > 0 and m.ppl > 0.99 * fp.ppl
            assert m.kv_bytes_per_token < fp.details["fp16_kv_bytes_per_token"] * 4.5 / 16  # 3 code bits + metadata
    files = write_report(results, tmp_path / "report")
    assert (tmp_path / "report" / "bits_3.png").read_bytes()[:8] == PNG_MAGIC and "report.md" in files.files


def test_streaming_a_second_corpus_and_passkey(setup, tmp_path):
    """Through the real cache (streaming) the scores equal the simulated ones; a second corpus is scored beside
    the first; passkey retrieval runs full precision and the chosen methods through their caches."""
    from ratequant.inputs.corpora import Corpus

    loaded, corpus = setup
    other_text = "\n\n".join(f"a different text, number {i}: ships sail over the sea at dawn." * 3 for i in range(40))
    other = Corpus("other", other_text[:2000], other_text[2000:])
    base = dict(
        model="tiny",
        corpus="tiny",
        budgets=(2.5,),
        designs=("kivi",),
        seq_len=80,
        windows=2,
        calibration_seq_len=48,
        calibration_sequences=1,
        residual=32,
        sink_tokens=2,
        eval_corpora=("other",),
    )
    with one_thread():
        simulated = run_compare(
            loaded, corpus, CompareConfig.from_options(**base), progress=False, eval_corpora={"other": other}
        )
        streaming = run_compare(
            loaded, corpus,
            CompareConfig.from_options(**base, mode="streaming", long_context_tokens=400, long_context_depths=(0.5,),
                                       long_context_trials=1, long_context_budgets=(2.5,),
                                       long_context_tasks=("passkey", "niah-single")),
            progress=False, eval_corpora={"other": other},
        )  # fmt: skip
    assert set(streaming.evaluations) == {"tiny/all", "tiny/second-half", "other/all", "other/second-half"}
    assert streaming.evaluations["other/all"]["mode"] == "streaming"
    for a, b in zip(simulated.methods, streaming.methods):
        assert a.label == b.label
        for ev in simulated.evaluations:
            if b.method in ("rank", "rank+quant", "full-precision"):
                assert b.score(ev).kl == pytest.approx(a.score(ev).kl, rel=1e-9, abs=1e-12)
            else:  # float32: the keys of a prefill piece round differently from the whole window's
                assert b.score(ev).kl == pytest.approx(a.score(ev).kl, rel=2e-2, abs=1e-7), (b.label, ev)
    study = streaming.extra["long_context"]
    assert set(study["tasks"]) == {"passkey", "niah-single"}
    best_fixed = min(streaming.select(method="kv-split", design="kivi", budget=2.5), key=lambda m: m.kl)
    # 2 bits is not a budget here: the study builds KIVI-2 itself
    expected = {"full precision", f"{best_fixed.label} (2.5 bits)", "RateQuant (2.5 bits)", "uniform 2 (2 bits)"}
    default = streaming.select(method="default", design="kivi", budget=2.5)[0]
    roles = {label: c["roles"] for label, c in study["conditions"].items()}
    assert roles["uniform 2 (2 bits)"] == ["2-bit"]
    assert "best fixed" in roles[f"{best_fixed.label} (2.5 bits)"] and "ratequant" in roles["RateQuant (2.5 bits)"]
    assert any("default" in r for r in roles.values())  # its own row, or a role of the row with its widths
    if any(r == ["default"] for r in roles.values()):
        expected.add(f"{default.label} (2.5 bits)")
    for task in study["tasks"].values():
        assert set(task["results"]) == expected
        for label, r in task["results"].items():
            assert r["trials"] == 1 and 0 <= r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] <= 1
            assert r["mean_logprob"] < 0 and r["logprob_change"]["prompts"] == 1
            if label == "full precision":
                assert r["logprob_change"]["mean"] == 0
    files = write_report(streaming, tmp_path / "report")
    report = files.report.read_text()
    assert "## Long-context retrieval through the real cache" in report and "### niah-single" in report
    assert "| other, second-half |" in report


def test_peers_headroom_and_sink_study(setup, tmp_path):
    loaded, corpus = setup
    config = CompareConfig.from_options(model="tiny", corpus="tiny", budgets=(2.5, 3.0), designs=("kivi", "uniform"),
                           seq_len=48, windows=2, calibration_seq_len=48, calibration_sequences=2, sink_tokens="auto",
                           peers=("norms",), headroom_designs=("kivi",), headroom_tokens=32, headroom_max_bits=3,
                           sink_study=(0, 2))  # fmt: skip
    with one_thread():
        results = run_compare(loaded, corpus, config, progress=False)
    assert set(results.extra["sink_tokens"]) == {"kivi", "uniform"}
    for design in config.designs:
        norms = results.select(method="norms", design=design)
        assert len(norms) == 2 and all(m.bits is not None for m in norms)
        for m in norms:  # layer-wise K/V: one width per (layer, kind)
            assert (m.bits == m.bits[:, :, :1]).all()
    assert {m.method for m in results.select(design="kivi")} >= {"measured", "ratequant-component"}
    assert not results.select(design="uniform", method="measured")
    damage = np.asarray(results.extra["headroom"]["kivi"]["damage"]["values"])
    assert damage.shape == (2, 2, 2, 2) and (damage >= 0).all()  # widths 2 and 3 of 2 layers x 2 kv heads
    rows = results.extra["sink_study"]["rows"]
    assert {(r["bos"], r["sink_tokens"]) for r in rows if r["sink_tokens"] is not None} == {
        (b, s) for b in ("no", "yes") for s in (0, 2)
    }
    report = write_report(results, tmp_path / "r").report.read_text()
    for section in ("## Sink tokens", "## Headroom: allocation on measured damage", "## Weight norms of W_K and W_V"):
        assert section in report
    assert CompareResults.from_dict(json.loads((tmp_path / "r" / "results.json").read_text())).extra == json.loads(
        json.dumps(results.extra)
    )


def test_a_budget_at_the_narrowest_width_is_a_tie_by_construction_not_a_loss(setup):
    """At a 2-bit budget with widths from 2 every allocator returns uniform 2: the report says no allocator had a
    choice there and leaves the cell out of RateQuant's wins and losses; the 2.5-bit cell still counts."""
    from ratequant.lab.report.findings import findings

    loaded, corpus = setup
    config = CompareConfig.from_options(
        model="tiny", corpus="tiny", budgets=(2.0, 2.5), designs=("kivi",), seq_len=48, windows=2,
        calibration_seq_len=48, calibration_sequences=1,
    )  # fmt: skip
    with one_thread():
        results = run_compare(loaded, corpus, config, progress=False)
    assert min(results.designs["kivi"].fit.bitset) == 2
    assert results.no_choice("kivi", 2.0) and not results.no_choice("kivi", 2.5)
    text = "\n".join(findings(results))
    assert "No allocator has a choice in 1 cell(s) (kivi at 2 bits)" in text
    assert "in 1 of 1 (design, budget) cells" in text or "in 0 of 1 (design, budget) cells" in text
    assert "for kivi at 2 bits**" not in text
    # a design whose narrowest informative key width is 3 (as the uniform design's): at 2.5 bits the only
    # allocation that fits is K3V2, so that cell is a tie by construction too, and 2 bits is no longer one
    from dataclasses import replace

    k3v2 = np.stack([np.full(results.designs["kivi"].measured.shape[1:-1], w) for w in (3, 2)])
    floored = replace(
        results,
        designs={"kivi": replace(results.designs["kivi"], min_bits=(3, 2), floors=k3v2)},
        methods=tuple(
            replace(m, bits=k3v2) if (m.method, m.budget) == ("ratequant", 2.5) else m for m in results.methods
        ),
    )
    assert floored.no_choice("kivi", 2.5) and not floored.no_choice("kivi", 2.0)
    # per-component floors: one key component floored at 4 leaves a choice at 2.5 bits (others may go to 2)
    mixed = k3v2.copy()
    mixed[0] = 2
    mixed[0, 0, 0] = 4
    one_high = replace(floored, designs={"kivi": replace(floored.designs["kivi"], min_bits=(2, 2), floors=mixed)})
    assert not one_high.no_choice("kivi", 2.5) and not one_high.no_choice("kivi", 2.0)


def test_kl_search_method_refines_ratequant_at_the_same_size(setup, tmp_path):
    """``search_proposals`` adds ``RateQuant + KL search`` to every design and budget: the same mean width and no
    more bytes than RateQuant, widths among the design's, its plan RateQuant's or a same-size split unless the
    moves were kept, and the report shows it beside RateQuant."""
    from ratequant.lab.report.findings import findings

    loaded, corpus = setup
    config = CompareConfig.from_options(
        model="tiny", corpus="tiny", budgets=(2.5,), designs=("kivi", "uniform"), seq_len=48, windows=2,
        calibration_seq_len=48, calibration_sequences=2, search_proposals=4, search_tokens=40,
    )  # fmt: skip
    assert "--search 4 --search-tokens 40" in config.command("out")
    assert CompareConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with one_thread():
        results = run_compare(loaded, corpus, config, progress=False)
    for design in config.designs:
        (searched,) = results.select(method="ratequant-search", design=design)
        (alone,) = results.select(method="ratequant", design=design)
        record = searched.details["search"]
        assert record["search_proposals"] == 4 and record["search_tokens"] == 40
        assert searched.avg_bits == 2.5 and searched.kv_bytes_per_token <= alone.kv_bytes_per_token * (1 + 1e-9)
        assert set(np.unique(searched.bits)) <= set(results.designs[design].fit.bitset)
        if not record.get("search_kept"):  # the start: RateQuant's widths or a fixed split's
            start = record["search_start"]
            expected = alone.bits if start == "ratequant" else np.array([int(start[1]), int(start[3])])[:, None, None]
            assert (searched.bits == expected).all()
        assert math.isfinite(searched.score().kl)
    text = "\n".join(findings(results))
    assert "RateQuant + KL search (RateQuant's widths" in text and "proposals) beats the best fixed" in text
    report = write_report(results, tmp_path / "r").report.read_text()
    assert "RateQuant + KL search beats best fixed (KL)" in report and "refined by 4 one-bit moves" in report


def test_a_search_text_inside_the_residual_window_is_refused():
    """A search window no longer than the residual window plus the sinks is never quantized: refused."""
    with pytest.raises(RateQuantError, match="residual window"):
        CompareConfig.from_options(search_proposals=2, search_tokens=128, residual=128)
    with pytest.raises(RateQuantError, match="sink tokens"):
        CompareConfig.from_options(search_proposals=2, search_tokens=130, residual=128, sink_tokens="auto")
    unused = CompareConfig.from_options(search_proposals=0, search_tokens=16, residual=128)  # the search is off
    assert unused.calibration.search_tokens == 16


def test_findings_state_the_default_plan_and_auto_against_their_rivals(results):
    from ratequant.lab.report.findings import choice_findings

    text = "\n".join(choice_findings(results))
    cells = len(DESIGNS) * len(BUDGETS)
    assert re.search(rf"standard error in \d+ of {cells} \(design, budget\) cells", text)
    for budget in BUDGETS:
        check = results.auto_against_all(budget)
        (auto,) = results.select(method="auto", budget=budget)
        assert check["auto_kl"] == auto.kl and auto.kv_bytes_per_token <= check["auto_bytes"] * (1 + 1e-12)
        assert check["within_one_se"] == (auto.kl - check["best_kl"] <= check["best_kl_se"])
        assert f"auto at {budget:g} bits chose {auto.details['chosen']}" in text


def test_methods_limits_what_is_scored(setup):
    config = CompareConfig.from_options(
        model="tiny", corpus="tiny", budgets=(2.5,), designs=("kivi", "uniform"), seq_len=48, windows=1,
        calibration_seq_len=48, calibration_sequences=1, methods=("kv-split", "default", "auto"),
    )  # fmt: skip
    assert CompareConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "--config" in config.command("out")  # no option sets it: the saved config repeats the run
    with pytest.raises(RateQuantError, match="methods must be"):
        CompareConfig(methods=("ratequant", "oracle"))
    with one_thread():
        results = run_compare(*setup, config, progress=False)
    scored = {m.method for m in results.methods}
    assert scored == {"full-precision", "kv-split", "default", "auto"}
    assert CompareConfig.from_dict(json.loads(json.dumps(CompareConfig().to_dict()))).methods is None


def test_a_rank_method_that_cannot_exist_at_a_budget_is_left_out_with_its_reason(setup, tmp_path):
    """Heads of 16 dimensions at 2 bits: 32 bits per token, less than one 4-bit coefficient plus its 32 bits of
    metadata, so rank + quant would store nothing. It is skipped before the evaluation, and the report is written."""
    config = CompareConfig.from_options(
        model="tiny", corpus="tiny", budgets=(2.0,), designs=("kivi",), seq_len=48, windows=1,
        calibration_seq_len=48, calibration_sequences=1, methods=("uniform", "rank", "rank+quant"),
    )  # fmt: skip
    with one_thread():
        results = run_compare(*setup, config, progress=False)
    assert not results.select(method="rank+quant") and len(results.select(method="rank")) == 1
    (skip,) = [s for s in results.skipped if s["method"] == "rank+quant"]
    assert skip["budget"] == 2.0 and "not one 4-bit coefficient" in skip["reason"]
    write_report(results, tmp_path / "report", command="ratequant compare (test)")
    assert "not one 4-bit coefficient" in (tmp_path / "report" / "report.md").read_text()


def test_every_series_of_a_figure_has_its_own_colour_and_marker(tmp_path, monkeypatch):
    import matplotlib.axes
    from matplotlib.colors import to_hex

    from ratequant.lab.report.plots import method_panels

    drawn = {}
    plot = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        if "label" in kwargs:
            drawn[kwargs["label"]] = (to_hex(kwargs["color"]), kwargs["marker"])
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    series = {f"method {i}": ([2.0, 3.0], [1.0 + i, 2.0 + i]) for i in range(24)}
    method_panels({"kivi": series}, tmp_path / "f.png", xlabel="bits")
    assert len(drawn) == 24 and len(set(drawn.values())) == 24
