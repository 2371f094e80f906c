"""The lm-evaluation-harness integration: the ``ratequant`` lm-eval model and the ``ratequant lm-eval`` command.

Fully offline: two tiny local tasks (tests/data/lm_eval: multiple choice and loglikelihood_rolling) on the tiny
Llama of conftest; the datasets cache lives in a temporary folder. Skipped where lm-eval is not installed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest

# Before lm_eval (and through it datasets and huggingface_hub) is imported: nothing here may reach the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}
for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from ratequant.cli import main  # noqa: E402
from ratequant.errors import PlanError, RateQuantError  # noqa: E402
from ratequant.integrations.lm_eval import RateQuantLM, resolve_device  # noqa: E402
from ratequant.plan import Plan  # noqa: E402
from tests.conftest import tiny_model, tiny_tokenizer  # noqa: E402

DATA = Path(__file__).parents[1] / "data" / "lm_eval"
ROOT = Path(__file__).parents[2]  # the task YAMLs name their data files relative to the repository root
TASKS = ("ratequant_mc", "ratequant_rolling")


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def offline_datasets(tmp_path_factory):
    """Offline hub and datasets, and a datasets cache in a temporary folder (also where datasets was imported
    before this module, so its configuration already read the environment)."""
    import datasets.config

    cache = tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        }.items():
            mp.setenv(name, value)
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        yield cache


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, offline_datasets) -> Path:
    """The task YAMLs with absolute data paths (lm-eval resolves relative ones against the working directory)
    and the datasets cache in a temporary folder."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    for name in TASKS:
        config = yaml.safe_load((DATA / f"{name}.yaml").read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(ROOT / path) for split, path in files.items()}
        config["dataset_kwargs"]["cache_dir"] = str(offline_datasets)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def task_manager(task_dir) -> TaskManager:
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def uniform_plan(bits: int, residual: int = 0) -> Plan:
    """Every key and value of the tiny Llama (3 layers x 2 kv heads x head_dim 16) at ``bits``, KIVI in groups of
    8 tokens: a short quantization chunk, so the short test texts are mostly quantized."""
    widths = [[bits, bits] for _ in range(3)]
    return Plan(
        model={"name": "tiny-llama", "num_layers": 3, "num_kv_heads": 2, "head_dim": 16, "num_heads": 4},
        quantizer={"name": "kivi", "params": {"group_size": 8}},
        budget={"kind": "avg_bits", "value": float(bits)},
        allocator="uniform",
        avg_bits=float(bits),
        bits={"key": widths, "value": widths},
        residual_length=residual,
    )


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("plans")
    out = {}
    for bits, residual in ((2, 0), (8, 0), (2, 16)):
        out[bits, residual] = uniform_plan(bits, residual).to_json(folder / f"kivi-{bits}bit-r{residual}.json")
    return out


@pytest.fixture(scope="module")
def evaluations(task_manager):
    """``evaluate(key, make_lm)``: lm-eval's results on both tasks, computed once per key for the module."""
    done = {}

    def evaluate(key, make_lm):
        if key not in done:
            done[key] = lm_eval.simple_evaluate(
                model=make_lm(),
                tasks=list(TASKS),
                task_manager=task_manager,
                log_samples=True,
                bootstrap_iters=0,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        return done[key]

    return evaluate


def scores(results: dict) -> list[float]:
    """Every loglikelihood lm-eval computed: each choice of each multiple-choice doc, each rolling document."""
    out = []
    for task in TASKS:
        for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
            for resp in sample["resps"]:
                value = resp[0]
                out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
    return out


def relative_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def ours(evaluations, model_dir, plan=None, **kwargs) -> dict:
    """lm-eval's results for our model on ``model_dir`` with ``plan`` (a path or None) and ``kwargs``."""
    key = (str(plan), tuple(sorted(kwargs.items())))
    make = functools.partial(RateQuantLM, pretrained=str(model_dir), plan=None if plan is None else str(plan), **kwargs)
    return evaluations(key, make)


# -- (a) full precision is lm-eval's own HF model ------------------------------------------------------------
def test_full_precision_scores_equal_plain_hflm(evaluations, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(HFLM, "get_model_info", lambda self: {})  # HFLM's own asks the hub for the model's sha

    def plain():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), batch_size=2)

    base = evaluations("hf", plain)
    full = ours(evaluations, tiny_model_dir, batch_size=2, device="cpu")
    assert relative_gap(scores(full), scores(base)) < 1e-6
    for task in TASKS:
        numbers = {k: v for k, v in base["results"][task].items() if isinstance(v, float)}
        assert numbers and {k: full["results"][task][k] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    config = full["config"]
    assert config["ratequant_mode"] == "full precision" and config["ratequant_plan"] is None
    assert config["ratequant_spec"] is None and config["model_num_parameters"] > 0


# -- (b) the plan changes the scores inside lm-eval's single prefill pass --------------------------------------
def test_quantized_plans_change_the_scores_and_more_bits_change_them_less(evaluations, tiny_model_dir, plans):
    full = scores(ours(evaluations, tiny_model_dir, batch_size=2, device="cpu"))
    two = ours(evaluations, tiny_model_dir, plans[2, 0], batch_size=2, device="cpu")
    eight = ours(evaluations, tiny_model_dir, plans[8, 0], batch_size=2, device="cpu")
    gap2, gap8 = relative_gap(scores(two), full), relative_gap(scores(eight), full)
    assert gap2 > 1e-4, "a 2-bit plan must move lm-eval's scores (the prefill trap)"
    assert relative_gap(scores(two), scores(eight)) > 1e-4
    assert 0 < gap8 < gap2 / 10
    config = two["config"]
    assert config["ratequant_plan"] == os.path.abspath(plans[2, 0])
    assert config["ratequant_mode"] == "simulated" and config["ratequant_avg_bits"] == 2.0
    assert config["ratequant_spec"]["bits"]["key"] == [[2, 2]] * 3
    assert config["ratequant_spec"]["quantizer"]["params"]["group_size"] == 8
    json.dumps(config["ratequant_spec"])  # plain JSON in lm-eval's results file


# -- (c) the real cache, fed in pieces of its quantization chunk, gives the simulated scores --------------------
@pytest.mark.parametrize("residual", [0, 16])
def test_streaming_mode_gives_the_simulated_scores(evaluations, tiny_model_dir, plans, residual):
    simulated = ours(evaluations, tiny_model_dir, plans[2, residual], batch_size=2, device="cpu")
    # another batch size: other right-padding, which must not touch the real tokens' scores
    streaming = ours(evaluations, tiny_model_dir, plans[2, residual], mode="streaming", batch_size=3, device="cpu")
    full = ours(evaluations, tiny_model_dir, batch_size=2, device="cpu")
    assert relative_gap(scores(streaming), scores(simulated)) < 1e-4
    assert relative_gap(scores(simulated), scores(full)) > 1e-4
    assert streaming["config"]["ratequant_mode"] == "streaming"


def test_streaming_feeds_the_cache_in_chunks_after_the_sinks(monkeypatch):
    model = tiny_model("llama")
    spec = uniform_plan(2, residual=16).resolve(model, sink_tokens=3)
    lm = RateQuantLM(model, tokenizer=tiny_tokenizer(), plan=spec, mode="streaming")
    pieces = []
    forward = type(model).forward

    def spy(self, *args, input_ids=None, **kwargs):
        pieces.append(input_ids.shape[1])
        return forward(self, *args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    logits = lm._model_call(torch.randint(2, 300, (2, 50)))
    assert pieces == [19, 16, 15] and logits.shape[:2] == (2, 50)


# -- generation and arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["simulated", "streaming"])
def test_generate_until_runs_under_the_plan(mode):
    lm = RateQuantLM(tiny_model("llama"), tokenizer=tiny_tokenizer(), plan=uniform_plan(2, 16), mode=mode)
    request = (
        "the quick brown fox jumps over the lazy dog.",
        {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False},
    )
    out = lm.generate_until([Instance("generate_until", {}, request, 0)] * 2, disable_tqdm=True)
    assert len(out) == 2 and all(isinstance(text, str) for text in out)


def test_model_args_arrive_as_strings_and_are_checked(tiny_model_dir, plans, monkeypatch):
    lm = RateQuantLM(
        pretrained=str(tiny_model_dir),
        plan=str(plans[2, 16]),
        mode="Streaming",
        dtype="auto",
        device="cpu",
        batch_size="4",
        max_length="96",
        residual="8",
        sink_tokens=2,
    )
    assert (lm.rq_mode, lm.batch_size, lm.max_length) == ("streaming", 4, 96)
    assert (lm.rq_spec.residual_length, lm.rq_spec.sink_tokens) == (8, 2)
    with pytest.raises(RateQuantError, match="mode must be one of"):
        RateQuantLM(pretrained=str(tiny_model_dir), mode="fast")
    with pytest.raises(RateQuantError, match="pass plan= as well"):
        RateQuantLM(pretrained=str(tiny_model_dir), residual=8)
    with pytest.raises(RateQuantError, match="tokenizer="):
        RateQuantLM(pretrained=object())
    with pytest.raises(RateQuantError, match="batch_size must be an integer"):
        RateQuantLM(pretrained=str(tiny_model_dir), batch_size="many")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda:0") == "cpu" and resolve_device(None) == "cpu"


def test_a_plan_for_another_model_is_refused(tiny_model_dir, tmp_path):
    widths = [[3, 3, 3]] * 2
    plan = Plan(
        model={"name": "other", "num_layers": 2, "num_kv_heads": 3, "head_dim": 16},
        quantizer={"name": "kivi", "params": {"group_size": 8}},
        budget={"kind": "avg_bits", "value": 3.0},
        allocator="uniform",
        avg_bits=3.0,
        bits={"key": widths, "value": widths},
    ).to_json(tmp_path / "other.json")
    with pytest.raises(PlanError, match="calibrate a plan for this model"):
        RateQuantLM(pretrained=str(tiny_model_dir), plan=str(plan))


# -- (d) the command ------------------------------------------------------------------------------------------
def test_the_command_runs_lm_eval_with_the_ratequant_model(tiny_model_dir, plans, task_dir, tmp_path, monkeypatch):
    import lm_eval.tasks

    # the CLI builds lm_eval.tasks.TaskManager itself; skip indexing lm-eval's ~14k built-in tasks
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    out = tmp_path / "results"
    argv = [
        "lm-eval",
        "--model",
        "ratequant",
        "--model_args",
        f"pretrained={tiny_model_dir},plan={plans[2, 0]}",
        "--include_path",
        str(task_dir),
        "--tasks",
        "ratequant_mc",
        "--batch_size",
        "2",
        "--output_path",
        str(out),
    ]
    assert main(argv) == 0
    (written,) = out.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert 0.0 <= results["results"]["ratequant_mc"]["acc,none"] <= 1.0
    assert results["config"]["ratequant_plan"] == os.path.abspath(plans[2, 0])
    assert results["config"]["ratequant_spec"]["bits"]["value"] == [[2, 2]] * 3


def test_the_command_passes_lm_eval_its_arguments_and_its_exit_status(capsys, monkeypatch):
    import lm_eval.__main__

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append((sys.argv[1:], torch.get_num_threads())))
    threads = torch.get_num_threads()
    assert main(["lm-eval", "--threads", "3", "--model", "ratequant", "--threads", "2", "-h"]) == 0
    assert main(["lm-eval", "--", "ls", "tasks"]) == 0
    assert seen == [(["--model", "ratequant", "--threads", "2", "-h"], 3), (["ls", "tasks"], threads)]
    assert torch.get_num_threads() == threads and sys.argv[0] != "lm-eval"
    monkeypatch.undo()

    with pytest.raises(SystemExit) as exc:  # our own help, as for every ratequant command
        main(["lm-eval", "--help"])
    assert exc.value.code == 0 and "usage: ratequant lm-eval" in capsys.readouterr().out
    assert main(["lm-eval", "run", "--help"]) == 0
    assert "--model_args" in capsys.readouterr().out
    assert main(["lm-eval", "run", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_task_that_cannot_download_its_data_is_refused_in_one_line(capsys, monkeypatch):
    """RULER's niah_* tasks fetch essays on every run; offline that is one line naming the offline equivalents."""
    import urllib.error

    import lm_eval.__main__

    def offline():  # what a download from a machine without network raises (httpx's ConnectError where installed)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", offline)
    assert main(["lm-eval", "--model", "ratequant", "--tasks", "niah_single_1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "URLError: <urlopen error [Errno -3]" in err and "ratequant eval --task niah-single" in err


def test_the_command_without_lm_eval_says_how_to_install_it(capsys, monkeypatch):

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["lm-eval", "--model", "ratequant", "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ratequant: error: lm-evaluation-harness is not installed: pip install 'ratequant[lm-eval]'"


# -- model arguments that would be dropped silently -------------------------------------------------------------
def test_unknown_and_empty_model_args_are_refused_naming_the_accepted_ones(tiny_model_dir, plans):
    plan = str(plans[2, 0])
    with pytest.raises(RateQuantError, match=r"unknown model argument resdiual \(did you mean residual\?\)") as exc:
        RateQuantLM(pretrained=str(tiny_model_dir), plan=plan, resdiual=0)
    assert "residual, sink_tokens" in str(exc.value) and "add_bos_token" in str(exc.value)
    with pytest.raises(RateQuantError, match="unknown model argument revision"):  # HFLM ignores it for our model
        RateQuantLM(pretrained=str(tiny_model_dir), revision="main")
    for empty in ({"plan": ""}, {"plan": "  "}, {"residual": ""}, {"pretrained": ""}, {"add_bos_token": ""}):
        with pytest.raises(RateQuantError, match=f"model argument {next(iter(empty))} is empty"):
            RateQuantLM(**{"pretrained": str(tiny_model_dir), **empty})
    lm = RateQuantLM(pretrained=str(tiny_model_dir), plan=plan, residual=0, add_bos_token=True)
    assert lm.rq_spec.residual_length == 0 and lm.rq_spec.avg_bits == 2.0


@pytest.mark.parametrize(
    "model_args, fragment",
    [("resdiual=0", "unknown model argument resdiual (did you mean residual?)"), ("plan=", "plan is empty")],
)
def test_the_command_refuses_bad_model_args_in_one_line(
    tiny_model_dir, plans, task_dir, capsys, monkeypatch, model_args, fragment
):
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    argv = ["lm-eval", "--model", "ratequant", "--model_args", f"pretrained={tiny_model_dir},{model_args}"]
    capsys.readouterr()
    assert main([*argv, "--include_path", str(task_dir), "--tasks", "ratequant_mc", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (lm-eval's logging handlers may complain about an earlier test's closed stream: only our error matters)
    assert err[-1].startswith("ratequant: error: ") and fragment in err[-1] and "RateQuantError" not in "".join(err)
