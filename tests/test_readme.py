"""The README runs as written: every shell command of its ``sh`` blocks and its Python block, each checked.

Shell commands run in ``bash`` in a temporary folder with this environment's ``ratequant`` first on ``PATH``, one
block at a time in order (a block's later commands read what its earlier ones wrote). Lines that cannot run here
are skipped for a stated reason: ``make`` targets (the Makefile's own), ``pip install`` (network), and commands
on another model than the embedded one (a hub download, or Qwen2.5-Coder after ``make qwen-model``). Every other
command must be a ``ratequant`` command with a check below that could fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fenced_blocks() -> list[tuple[str, str]]:
    """``[(language, body), ...]`` of the README's fenced code blocks, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```\s*$", README.read_text(), re.S | re.M)


def shell_lines(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, blank lines dropped."""
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def skip_reason(line: str) -> str | None:
    """Why a README command cannot run in the tests, or None when it must."""
    words = shlex.split(line, comments=True)
    if words[0] == "make":
        return "a make target (the Makefile's own job)"
    if words[0] == "pip" or "pip install" in line:
        return "installs packages (network)"
    if "--model" in words and words[words.index("--model") + 1] not in ("default", "smollm2-135m"):
        return "needs another model than the embedded one (network, or make qwen-model)"
    if any(w.startswith("hf:") for w in words):
        return "reads a Hugging Face dataset (network)"
    return None


def option(line: str, name: str) -> str | None:
    words = shlex.split(line, comments=True)
    return words[words.index(name) + 1] if name in words else None


# -- what each command must have done --------------------------------------------------------------------------
def check_calibrate(line: str, out: str, err: str, cwd: Path) -> None:
    from ratequant.plan import Plan

    plan = Plan.load(cwd / option(line, "--out"))
    assert abs(plan.avg_bits - float(option(line, "--avg-bits"))) < 1e-9
    assert f"plan written to {option(line, '--out')}" in out
    scores = re.search(r"candidates by mean KL on held-out calibration windows of \d+ tokens.*?: (.*)", out).group(1)
    found = re.findall(r"(\S+) (\d+\.\d+)(?: \((\d+) windows\))?", scores)
    names = {name: float(kl) for name, kl, _ in found}
    windows = {name: int(n or 1) for name, _, n in found}
    assert {"ratequant", "K3V2", "K2V3"} <= set(names), scores
    chosen = re.search(r"chosen: (\S+)", out).group(1)
    longest = [name for name in names if windows[name] == max(windows.values())]
    assert chosen == min(longest, key=names.get) and plan.calibration["choice"] == chosen


def check_inspect(line: str, out: str, err: str, cwd: Path) -> None:
    assert (cwd / option(line, "--heatmap")).read_bytes()[:8] == PNG_MAGIC
    assert "heatmap written to" in out and "kivi" in out


def check_eval(line: str, out: str, err: str, cwd: Path) -> None:
    full, quantized = (ln for ln in out.splitlines() if ln.startswith("perplexity"))
    assert full.endswith("full precision")
    assert "second-half scored" in quantized and f"{option(line, '--windows')} windows" in quantized
    kl = float(re.search(r"KL (\d+\.\d+) ± (\d+\.\d+)", quantized).group(1))
    assert 0 < kl < 0.1, quantized  # a 2.5-bit plan on the embedded model: a few hundredths of a nat


def check_generate(line: str, out: str, err: str, cwd: Path) -> None:
    assert len(out.split()) > 5, out  # the continuation
    share = float(re.search(r"\((\d+\.\d+)% of it\)", err).group(1))
    assert share < 50, err  # a 2,000-token prompt: most of the cache is packed, well under a float16 cache


CHECKS = {"calibrate": check_calibrate, "inspect": check_inspect, "eval": check_eval, "generate": check_generate}


def run_block(body: str, cwd: Path) -> list[str]:
    """Run a shell block's commands in ``cwd`` and check each; returns the skipped lines with their reasons."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    skipped = []
    for line in shell_lines(body):
        reason = skip_reason(line)
        if reason:
            skipped.append(f"{line}: {reason}")
            continue
        words = shlex.split(line, comments=True)
        assert words[0] == "ratequant" and words[1] in CHECKS, f"README command without a check: {line}"
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        CHECKS[words[1]](line, done.stdout, done.stderr, cwd)
    return skipped


def shell_blocks() -> list[str]:
    return [body for lang, body in fenced_blocks() if lang == "sh"]


def python_block() -> str:
    (code,) = [body for lang, body in fenced_blocks() if lang == "python"]
    return code


# -- the README's shape ----------------------------------------------------------------------------------------
def test_readme_starts_with_the_two_make_commands():
    lang, body = fenced_blocks()[0]
    assert lang == "sh"
    assert [line.split("#")[0].strip() for line in body.splitlines()] == ["make demo", "make test"]


def test_every_code_block_is_run_or_skipped_for_a_reason():
    """A new block or command cannot slip in untested: shell blocks are ``sh``, examples of output ``text``, and
    there is one Python block; every shell line is a ``ratequant`` command with a check, or skipped by rule."""
    blocks = fenced_blocks()
    assert {lang for lang, _ in blocks} <= {"sh", "python", "text"}
    assert sum(lang == "python" for lang, _ in blocks) == 1
    runnable = 0
    for body in shell_blocks():
        for line in shell_lines(body):
            if skip_reason(line) is None:
                words = shlex.split(line, comments=True)
                assert words[0] == "ratequant" and words[1] in CHECKS, line
                runnable += 1
    assert runnable >= 4  # calibrate, inspect, eval, generate


def test_readme_python_block_uses_the_fast_path():
    code = python_block()
    assert "RateQuantCache.from_plan(" in code and "past_key_values=cache" in code and ".generate(" in code
    assert len(code.strip().splitlines()) <= 12


def test_readme_links_resolve():
    root = README.parent
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text()) + re.findall(
        r"`((?:docs|benchmarks)/[\w./-]+)`", README.read_text()
    )
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (root / link).exists(), link


# -- the README's commands, as written -------------------------------------------------------------------------
def block_params():
    out = []
    for i, body in enumerate(shell_blocks()):
        runs = any(skip_reason(line) is None for line in shell_lines(body))
        out.append(pytest.param(body, id=f"block{i}", marks=[pytest.mark.slow] if runs else []))
    return out


@pytest.mark.parametrize("body", block_params())
def test_readme_shell_block_runs(body, tmp_path):
    skipped = run_block(body, tmp_path)
    if len(skipped) == len(shell_lines(body)):
        pytest.skip("; ".join(skipped))


@pytest.mark.slow
def test_readme_python_block_runs(tmp_path, monkeypatch):
    """The Python block as a user runs it (``tests/test_api.py`` runs it too, checking only the top-level API)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block(), "README.md", "exec"), namespace)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["avg_bits"] == 2.5
    loaded, cache, inputs, out = (namespace[k] for k in ("loaded", "cache", "inputs", "out"))
    assert out.shape[1] > inputs.input_ids.shape[1]
    assert cache.get_seq_length() >= inputs.input_ids.shape[1]
    assert loaded.model.config._attn_implementation.startswith("ratequant_")  # routed to the packed codes
    nbytes = cache.nbytes()
    assert nbytes.codes > 0 and nbytes.metadata > 0
    fp16 = 2 * 2 * loaded.geometry.num_layers * loaded.geometry.num_kv_heads * loaded.geometry.head_dim
    assert nbytes.total < 0.5 * fp16 * cache.get_seq_length()  # well under a float16 cache of the same tokens
