"""Round two of what a careless or hostile user tried: each case failed once (a traceback, silent garbage, a
lost or deleted file) and must now end in one clear line with exit status 2, or in the right result.

The numbers in the test names follow the reliability issue's list. Item 1 (``compare --force`` deleting files
it did not write) is in ``tests/lab/test_compare.py``; items 10 and 11 (caches that do not fit the model, float32
agreement of streaming and simulation) in ``tests/cache/test_cache.py`` and ``tests/cache/test_simulate.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ratequant.cli import build_parser
from ratequant.errors import PlanError, RateQuantError
from tests.cli.test_errors import assert_one_line_error, assert_usage_error, run
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(
        "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog, paragraph {i}." * 4 for i in range(60))
    )
    return path


def plan_dict(layers: int, heads: int, quantizer=None) -> dict:
    bits = [[3] * heads for _ in range(layers)]
    return {
        "format_version": 2,
        "model": {"name": "huge", "num_layers": layers, "num_kv_heads": heads, "head_dim": 64},
        "quantizer": quantizer or {"name": "kivi", "params": {}},
        "budget": {"kind": "avg_bits", "value": 3.0},
        "allocator": "uniform",
        "avg_bits": 3.0,
        "bits": {"key": bits, "value": bits},
    }


# -- 2 and 3: figures -------------------------------------------------------------------------------------
def test_2_a_heatmap_too_large_to_draw_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(plan_dict(64, 4096)))
    assert_one_line_error(capsys, ["inspect", str(path), "--heatmap", str(tmp_path / "h.png")], "too large to draw")
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize(
    "target, extra, fragment",
    [
        ("picture.txt", [], "a figure must end in .png, .pdf, .svg"),
        ("a-folder", ["--force"], "is a directory"),
        ("blocker/inside.png", [], "cannot write the figure"),
    ],
)
def test_3_figure_outputs_that_cannot_be_written_are_refused_before_drawing(tmp_path, capsys, target, extra, fragment):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(2, 2)))
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert_one_line_error(capsys, ["inspect", str(path), "--heatmap", str(tmp_path / target), *extra], fragment)


def test_3_compare_into_an_unwritable_folder_fails_before_the_run(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    assert_one_line_error(
        capsys, ["compare", "--quick", "--out", str(tmp_path / "blocker" / "report")], "cannot write the report"
    )


def test_3_json_outputs_are_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    assert_one_line_error(
        capsys, ["info", "--json", str(tmp_path / "blocker" / "x.json")], "cannot write the results file"
    )
    assert_one_line_error(capsys, ["calibrate", "--avg-bits", "3", "--out", str(tmp_path)], "is a directory")


# -- 4: integer parameters are bounded where declared -------------------------------------------------------
def test_4_a_seed_too_large_is_refused_on_the_command_line_and_in_a_plan(tmp_path, capsys):
    assert_one_line_error(
        capsys,
        [
            "calibrate",
            "--quantizer",
            "turbo",
            "--param",
            f"seed={2**64}",
            "--avg-bits",
            "3",
            "--out",
            str(tmp_path / "p.json"),
        ],
        "seed must be",
    )
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(2, 2, {"name": "turbo", "params": {"seed": 2**64}})))
    assert_one_line_error(capsys, ["inspect", str(path)], "too large")


# -- 6: sizes bounded by the model's context ------------------------------------------------------------------
def test_6_a_group_larger_than_anything_or_than_the_models_context_is_refused_before_allocating():
    from ratequant.cache import RateQuantCache
    from ratequant.cache.simulate import simulated_quantization
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    with pytest.raises(RateQuantError, match="group_size must be an integer from 1 to 65536"):
        get_quantizer("kivi", group_size=10**9)
    model = tiny_model("llama")  # 512 positions
    spec = KVQuantSpec(np.full((2, 3, 2), 2), get_quantizer("kivi", group_size=4096), residual_length=0)
    with pytest.raises(PlanError, match="exceed the model's context of 512 tokens"):
        RateQuantCache(spec, model=model)
    with pytest.raises(PlanError, match="exceed the model's context"), simulated_quantization(model, spec):
        pass


# -- 7: generate -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--seed", str(2**64)], "--seed: must be an integer from 0 to 2**62"),
        (["--sample", "--temperature", "1e-300"], "--temperature: must be a number from 0.01 to 100"),
        (["--top-p", "2"], "--top-p: must be a number from 1e-06 to 1"),
    ],
)
def test_7_generate_refuses_values_that_would_break_sampling(capsys, argv, fragment):
    assert_usage_error(capsys, ["generate", "--prompt", "hello", *argv], fragment)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt", "caf\udce9"], "not valid UTF-8"),  # a byte that is not UTF-8, as the shell hands it over
        (["--prompt", "hi", "--device", "bogus"], "unknown device 'bogus'"),
        (["--prompt", "hi", "--max-new-tokens", "1000000000"], "exceed the model's context of 512 tokens"),
    ],
)
def test_7_generate_bad_inputs_are_one_line(capsys, tiny_model_dir, argv, fragment):
    assert_one_line_error(capsys, ["generate", "--model", str(tiny_model_dir), *argv], fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_7_generate_on_cuda_without_cuda_is_one_line(capsys, tiny_model_dir):
    assert_one_line_error(
        capsys,
        ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "cuda"],
        "has no CUDA; use --device cpu",
    )


def test_7_generate_streams_its_output(capsys, tiny_model_dir):
    code, out, err = run(
        capsys, ["generate", "--model", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "6"]
    )
    quiet_code, quiet_out, _ = run(
        capsys,
        ["generate", "--model", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "6", "--quiet"],
    )
    assert code == quiet_code == 0 and out.strip() == quiet_out.strip() and "KV cache" not in out


# -- 8: hostile configs, interrupts --------------------------------------------------------------------------
def test_8_a_compare_config_with_nested_designs_is_one_line(tmp_path, capsys):
    from ratequant.lab import CompareConfig

    data = CompareConfig().to_dict()
    data["designs"] = [["kivi"]]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    assert_one_line_error(capsys, ["compare", "--config", str(path), "--out", str(tmp_path / "out")], "design names")


def test_8_a_compare_search_on_text_that_is_never_quantized_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--residual", "128", "--search", "2", "--search-tokens", "100", "--out", str(out)]
    assert_one_line_error(capsys, argv, "residual window (128)")
    assert not out.exists()  # refused before the report folder is made


def test_8_an_interrupt_while_the_parser_is_built_exits_130(monkeypatch, capsys):
    import ratequant.cli as cli

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run(capsys, ["eval"])
    assert code == 130 and err.strip() == "ratequant: interrupted"
    assert build_parser  # the real one is untouched


# -- 9: flags that were silently ignored -----------------------------------------------------------------------
def test_9_flags_that_would_be_ignored_are_refused(capsys, tmp_path, corpus):
    assert_one_line_error(capsys, ["eval", "--mode", "streaming"], "pass --plan")
    assert_one_line_error(
        capsys,
        ["calibrate", "--avg-bits", "3", "--context", "512", "--out", str(tmp_path / "p.json")],
        "--context applies to --bytes-per-token",
    )
    assert_one_line_error(capsys, ["eval", "--task", "passkey", "--windows", "3"], "passkey takes --context")
    assert_one_line_error(capsys, ["eval", "--trials", "5"], "apply to the retrieval tasks")


def test_9_calibration_says_when_the_split_holds_fewer_sequences_than_asked(capsys, tmp_path, tiny_model_dir, corpus):
    code, out, err = run(
        capsys,
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus),
            "--avg-bits",
            "3",
            "--seq-len",
            "64",
            "--sequences",
            "1000",
            "--out",
            str(tmp_path / "p.json"),
        ],
    )
    assert code == 0 and "ratequant: note: the calibration split holds only" in err


# -- 10: caches built directly ------------------------------------------------------------------------------------
def test_10_a_cache_with_more_layers_than_the_model_is_refused_at_the_next_forward():
    from ratequant.cache import RateQuantCache
    from ratequant.compat import cache_argument
    from ratequant.quantizers import get_quantizer
    from ratequant.spec import KVQuantSpec

    model = tiny_model("llama")  # 3 layers
    cache = RateQuantCache(KVQuantSpec(np.full((2, 4, 2), 4), get_quantizer("uniform")))
    ids = torch.randint(2, 300, (1, 5))
    with torch.no_grad():
        model(ids, **cache_argument(model, cache), use_cache=True)
        with pytest.raises(PlanError, match="fewer layers than the spec's 4"):
            model(ids[:, :1], **cache_argument(model, cache), use_cache=True)
    with pytest.raises(PlanError, match="layers"):
        RateQuantCache(KVQuantSpec(np.full((2, 4, 2), 4), get_quantizer("uniform")), model=model)
