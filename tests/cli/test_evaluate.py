"""eval --plan (simulated and streaming) and generate, end to end on a tiny model."""

import json

import pytest

from ratequant.cli import main
from ratequant.plan import Plan


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(
        "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog. def f(x): return x + {i}" * 4 for i in range(60))
    )
    return path


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory, tiny_model_dir, corpus_file):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus_file),
                "--quantizer",
                "uniform",
                "--avg-bits",
                "2.5",
                "--seq-len",
                "32",
                "--sequences",
                "2",
                "--residual",
                "8",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    return path


def run_eval(tmp_path, tiny_model_dir, corpus_file, plan_path, *extra):
    out = tmp_path / f"eval-{len(extra)}-{'-'.join(extra)}.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus_file),
                "--plan",
                str(plan_path),
                "--seq-len",
                "40",
                "--windows",
                "2",
                "--scoring",
                "all",
                "--json",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def test_simulated_and_streaming_evaluation_agree(tmp_path, tiny_model_dir, corpus_file, plan_path, capsys):
    simulated = run_eval(tmp_path, tiny_model_dir, corpus_file, plan_path)
    streaming = run_eval(tmp_path, tiny_model_dir, corpus_file, plan_path, "--mode", "streaming")
    assert simulated["mode"] == "simulated" and streaming["mode"] == "streaming"
    assert simulated["avg_bits"] == streaming["avg_bits"] == 2.5
    assert streaming["ppl"] == pytest.approx(simulated["ppl"], rel=1e-4)
    # bytes: the formula (simulated) and the real cache's tensors (streaming) agree at the same context
    assert simulated["kv_bytes_context"] == streaming["kv_bytes_context"] == 40
    assert streaming["kv_bytes_source"] == "measured from the cache's tensors"
    assert simulated["kl"] > 0 and streaming["kl"] == pytest.approx(simulated["kl"], rel=2e-2)
    assert streaming["kv_bytes_per_token"] == pytest.approx(simulated["kv_bytes_per_token"], rel=0.01)
    full = tmp_path / "full.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus_file),
                "--seq-len",
                "40",
                "--windows",
                "2",
                "--json",
                str(full),
            ]
        )
        == 0
    )
    assert json.loads(full.read_text())["ppl"] != pytest.approx(simulated["ppl"], rel=1e-6)


def test_other_quantizer_is_refused_unless_allowed(tmp_path, tiny_model_dir, corpus_file, plan_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--plan",
            str(plan_path),
            "--quantizer",
            "quarot",
            "--seq-len",
            "40",
            "--windows",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "allow-mismatch" in err and "Traceback" not in err
    mismatched = run_eval(tmp_path, tiny_model_dir, corpus_file, plan_path, "--quantizer", "quarot", "--allow-mismatch")
    assert mismatched["quantizer"]["name"] == "quarot"


def test_plan_for_another_model_is_refused(tmp_path, corpus_file, plan_path, capsys):
    from tests.conftest import tiny_model, tiny_tokenizer

    other = tmp_path / "other"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    code = main(
        ["eval", "--model", str(other), "--corpus", str(corpus_file), "--plan", str(plan_path), "--seq-len", "40"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "has 2 layers" in err and "calibrate a plan for this model" in err


def test_generate_reports_real_cache_bytes(tmp_path, tiny_model_dir, plan_path, capsys):
    out = tmp_path / "gen.json"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--plan",
                str(plan_path),
                "--prompt",
                "the quick brown",
                "--max-new-tokens",
                "20",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["new_tokens"] == 20 and result["prompt_tokens"] > 0
    cache = result["cache_bytes"]
    assert cache["total"] == cache["codes"] + cache["metadata"] + cache["residual"] + cache["sink"] > cache["codes"] > 0
    assert "KV cache" in capsys.readouterr().err
    plan = Plan.load(plan_path)
    assert plan.residual_length == 8


# -- how much of what eval scores the plan touches ------------------------------------------------------------
def test_eval_counts_the_scored_predictions_that_read_quantized_storage(
    tmp_path, tiny_model_dir, corpus_file, plan_path, capsys
):
    """The plan's uniform design quantizes whole chunks of its residual window (8 tokens) after its S sink tokens:
    a query at position t sees a quantized key once t >= S + 8, so 31 - S of a 40-token window's 39 predictions
    (all scored) read quantized storage; with a residual window of 32, 7 - S (a warning); with 40, none (refused)."""
    sinks = Plan.load(plan_path).sink_tokens
    assert sinks < 7
    capsys.readouterr()
    result = run_eval(tmp_path, tiny_model_dir, corpus_file, plan_path)
    assert (result["quantized_predictions"], result["scored_predictions"]) == (2 * (31 - sinks), 2 * 39)
    assert result["quantized_share"] == pytest.approx((31 - sinks) / 39)
    out, err = capsys.readouterr()
    assert f"{(31 - sinks) / 39:.0%} of the scored predictions read quantized storage" in out and "warning" not in err
    # bytes of the plan beside a full-precision cache of the same tokens (3 layers x 2 kv heads x 16 dims, K and V)
    assert result["kv_bytes_per_token_float16"] == 3 * 2 * 2 * 16 * 2
    assert result["kv_bytes_per_token_model_dtype"] == 3 * 2 * 2 * 16 * 4  # the tiny model is float32
    assert 0 < result["kv_bytes_per_token"] < result["kv_bytes_per_token_float16"]
    assert "full precision 384 in float16, 768 in float32" in out

    mostly_full = run_eval(tmp_path, tiny_model_dir, corpus_file, plan_path, "--residual", "32")
    assert mostly_full["quantized_share"] == pytest.approx((7 - sinks) / 39)
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith(f"ratequant: warning: only {7 - sinks} of the 39 scored")]

    argv = ["eval", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--plan", str(plan_path)]
    json_out = tmp_path / "none.json"
    assert main([*argv, "--seq-len", "40", "--scoring", "all", "--residual", "40", "--json", str(json_out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ratequant: error: nothing would be quantized") and "--seq-len" in err[0]
    assert not json_out.exists()


def test_eval_takes_the_plan_as_its_positional_argument(tmp_path, tiny_model_dir, corpus_file, plan_path, capsys):
    common = ["--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--seq-len", "40", "--windows", "1"]
    positional, named = tmp_path / "positional.json", tmp_path / "named.json"
    assert main(["eval", str(plan_path), *common, "--json", str(positional)]) == 0
    assert main(["eval", "--plan", str(plan_path), *common, "--json", str(named)]) == 0
    a, b = json.loads(positional.read_text()), json.loads(named.read_text())
    assert a["plan"] == b["plan"] == str(plan_path) and a["kl"] == b["kl"] > 0
    capsys.readouterr()
    assert main(["eval", str(plan_path), "--plan", str(tmp_path / "other.json"), *common]) == 2
    assert "two plans given" in capsys.readouterr().err
