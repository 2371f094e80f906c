"""What the tool reads, what it executes, and what it never does (see docs/reliability.md).

* The source never unpickles: no ``pickle``-family imports, no ``torch.load`` without ``weights_only=True``,
  no ``numpy.load(allow_pickle=True)``, no ``eval``/``exec``, no shell, no literal ``trust_remote_code=True``
  (checked on the syntax tree of every module, with a self-test that the checker catches each pattern).
* ``trust_remote_code`` is False unless the user asks, through :func:`ratequant.inputs.models.load_model` (local
  directory, hub id, GGUF file, conversion cache) and through every CLI command that loads a model.
* A model directory whose config points at its own Python code never gets that code imported; a pickle
  checkpoint that would run code is refused with a clear error and the code never runs.
* The GGUF conversion cache writes safetensors, JSON and text only, atomically.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import struct
from pathlib import Path

import pytest

import ratequant
from ratequant.cli import COMMANDS, build_parser, main
from ratequant.errors import RateQuantError
from ratequant.inputs import models
from tests.conftest import tiny_config, tiny_model, tiny_tokenizer

SRC = Path(ratequant.__file__).resolve().parent
BENCHMARKS = SRC.parents[1] / "benchmarks"

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "pickletools"}
SHELL = {("os", "system"), ("os", "popen"), ("os", "execv"), ("os", "execvp"), ("os", "spawnl")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def violations(source: str, filename: str = "<src>", *, tooling: bool = False) -> list[str]:
    """Unsafe patterns in Python ``source``: each as ``file:line: what``.

    ``tooling`` (benchmarks) allows ``subprocess`` without a shell and imports by a computed name (to time
    fresh processes and probe optional packages); the library itself does neither.
    """
    found = []
    forbidden = PICKLE_MODULES if tooling else PICKLE_MODULES | {"subprocess"}
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in forbidden]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in forbidden:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"{where}: imports torch.load by name (its calls cannot be checked)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "compile"):
                found.append(f"{where}: calls {name}()")
            if name in ("__import__", "importlib.import_module", "import_module") and not tooling:
                found.append(f"{where}: imports a module by a computed name ({name})")
            if name == "torch.load" or name.endswith(".torch.load"):
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load"):
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where}: numpy.load with allow_pickle")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where}: {name}")
            if tuple(name.split(".")[-2:]) in SHELL:
                found.append(f"{where}: {name}")
            shell = _keyword(node, "shell")
            if isinstance(shell, ast.Constant) and shell.value is True:
                found.append(f"{where}: shell=True")
            trust = _keyword(node, "trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                found.append(f"{where}: trust_remote_code=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = (
                [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            )
            for arg, default in zip(args, defaults):
                # required (no default) is fine: every caller must decide; a default must be False
                if (
                    arg.arg == "trust_remote_code"
                    and default is not None
                    and not (isinstance(default, ast.Constant) and default.value is False)
                ):
                    found.append(f"{where}: {node.name}(trust_remote_code=...) does not default to False")
    return found


def test_the_checker_catches_every_pattern():
    bad = {
        "import pickle": "imports pickle",
        "from dill import loads": "imports from dill",
        "import subprocess": "imports subprocess",
        "torch.load(f)": "without weights_only",
        "torch.load(f, weights_only=False)": "without weights_only",
        "np.load(f, allow_pickle=True)": "allow_pickle",
        "eval(text)": "calls eval",
        "exec(code)": "calls exec",
        "os.system('ls')": "os.system",
        "run(cmd, shell=True)": "shell=True",
        "AutoModel.from_pretrained(p, trust_remote_code=True)": "trust_remote_code=True",
        "def load(trust_remote_code=True): pass": "does not default to False",
        "def load(*, trust_remote_code=None): pass": "does not default to False",
        "yaml.load(text)": "yaml.load",
        "from torch import load": "imports torch.load by name",
        "__import__(name)": "computed name",
        "importlib.import_module(name)": "computed name",
    }
    for source, what in bad.items():
        found = violations(source)
        assert len(found) == 1 and what in found[0], (source, found)
    fine = (
        "torch.load(f, weights_only=True)\nmodel.eval()\nnp.load(f)\n"
        "def load(trust_remote_code: bool = False): pass\ndef f(ref, trust_remote_code, *, x=1): pass\n"
        "f(trust_remote_code=trust_remote_code)"
    )
    assert violations(fine) == []
    assert violations("__import__(name)\nimport subprocess\nsubprocess.run([exe, '-c', code])", tooling=True) == []
    assert "shell=True" in violations("subprocess.run(cmd, shell=True)", tooling=True)[0]
    assert "imports pickle" in violations("import pickle", tooling=True)[0]


def test_source_and_benchmarks_never_unpickle_execute_or_trust_remote_code():
    library, benchmarks = sorted(SRC.rglob("*.py")), sorted(BENCHMARKS.glob("*.py"))
    assert len(library) > 20 and benchmarks
    found = [v for path in library for v in violations(path.read_text(encoding="utf-8"), str(path))]
    found += [v for path in benchmarks for v in violations(path.read_text(encoding="utf-8"), str(path), tooling=True)]
    assert found == []


# --------------------------------------------------------------------------------------------------------
# trust_remote_code
# --------------------------------------------------------------------------------------------------------
class Recorder:
    """Stands in for ``from_pretrained``: records its keyword arguments, then stops the load with OSError."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        raise OSError("stopped by the test")


@pytest.fixture
def recorded(monkeypatch):
    import transformers

    rec = Recorder()
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", rec)
    return rec


def test_load_model_signature_defaults_to_no_remote_code():
    assert inspect.signature(models.load_model).parameters["trust_remote_code"].default is False


@pytest.mark.parametrize("kind", ["directory", "hub"])
def test_load_model_passes_trust_remote_code_only_when_asked(recorded, tiny_model_dir, kind):
    spec = str(tiny_model_dir) if kind == "directory" else "some-org/some-model"
    for asked in (None, False, True):
        recorded.calls.clear()
        kwargs = {} if asked is None else {"trust_remote_code": asked}
        with pytest.raises(RateQuantError, match="could not load model"):
            models.load_model(spec, **kwargs)
        assert recorded.calls and all(call["trust_remote_code"] is bool(asked) for call in recorded.calls)
        assert all(call["local_files_only"] is (kind == "directory") for call in recorded.calls)


def test_gguf_files_and_the_conversion_cache_never_trust_remote_code(recorded, tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setenv("RATEQUANT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RateQuantError, match="could not read GGUF"):
        models.load_model(str(gguf), trust_remote_code=True)
    assert recorded.calls and all(not call.get("trust_remote_code", False) for call in recorded.calls)
    converted = tmp_path / "cache" / "gguf" / models._file_key(gguf)
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"")
    recorded.calls.clear()
    with pytest.raises(RateQuantError):
        models.load_model(str(gguf), trust_remote_code=True)
    assert recorded.calls and all(call.get("trust_remote_code", False) is False for call in recorded.calls)


def command_parsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices  # argparse has no public lookup


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_flag_is_off_unless_given(name):
    flags = [a for a in command_parsers()[name]._actions if "--trust-remote-code" in a.option_strings]
    loads_a_model = any("--model" in a.option_strings for a in command_parsers()[name]._actions)
    assert len(flags) == int(loads_a_model), name  # every command that takes --model offers the flag
    for flag in flags:
        assert flag.default is False and flag.nargs == 0 and flag.const is True


MINIMAL = {
    "eval": [],
    "info": [],
    "generate": ["--prompt", "x"],
    "calibrate": ["--avg-bits", "3", "--out", "{tmp}/plan.json"],
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_cli_commands_pass_the_flag_to_load_model(name, tmp_path, capsys, monkeypatch):
    if name not in COMMANDS:
        pytest.skip(f"{name} is not registered")
    seen = []

    def fake_load_model(spec=None, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        raise RateQuantError("stopped by the test")

    monkeypatch.setattr(models, "load_model", fake_load_model)
    argv = [name, "--model", "some-model", *[a.format(tmp=tmp_path) for a in MINIMAL[name]]]
    assert main(argv) == 2 and main([*argv, "--trust-remote-code"]) == 2
    assert seen == [False, True]
    assert capsys.readouterr().err.count("ratequant: error: stopped by the test") == 2


# --------------------------------------------------------------------------------------------------------
# code shipped inside a model directory or checkpoint never runs
# --------------------------------------------------------------------------------------------------------
def model_dir_with_remote_code(tmp_path, model_type: str, marker: Path) -> Path:
    path = tmp_path / f"remote-{model_type}"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
    )
    return path


def test_custom_code_in_a_model_directory_is_never_imported(tmp_path):
    marker = tmp_path / "IMPORTED"
    with pytest.raises(RateQuantError, match="custom code"):
        models.load_model(str(model_dir_with_remote_code(tmp_path, "evil-arch", marker)))
    assert not marker.exists()
    # a known architecture that also names custom code loads with the library's own class
    loaded = models.load_model(str(model_dir_with_remote_code(tmp_path, "llama", marker)))
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and not marker.exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_checkpoint_that_would_run_code_is_refused(tmp_path, writer):
    import torch

    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "model"
    tiny_config("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    payload = {"model.embed_tokens.weight": _RunsCode(marker)}
    if writer == "pickle":
        (path / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path / "pytorch_model.bin")
    with pytest.raises(RateQuantError, match="refused .loading it could run code.; use a safetensors checkpoint"):
        models.load_model(str(path))
    assert not marker.exists()


def test_default_model_is_found_without_importing_its_package(tmp_path, monkeypatch):
    import importlib.machinery
    import importlib.util

    package = tmp_path / models.DEFAULT_PACKAGE
    package.mkdir()
    marker = tmp_path / "IMPORTED"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (package / models.DEFAULT_GGUF).write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec(models.DEFAULT_PACKAGE, None, origin=str(package / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == models.DEFAULT_PACKAGE else None)
    assert models.default_gguf_path() == package / models.DEFAULT_GGUF
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------
# the GGUF conversion cache
# --------------------------------------------------------------------------------------------------------
SAFE_SUFFIXES = {".json", ".safetensors", ".txt", ".jinja", ".model"}


def check_safetensors(path: Path) -> dict:
    """Parse a safetensors header (8-byte little-endian length, then JSON); returns it."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert 0 < length <= len(raw) - 8
    return json.loads(raw[8 : 8 + length])


def test_conversion_cache_writes_safetensors_json_and_text_only(tmp_path):
    target = tmp_path / "gguf" / "converted"
    models._store_conversion(tiny_model("llama"), tiny_tokenizer(), target)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    assert {p.suffix for p in files} <= SAFE_SUFFIXES, files
    header = check_safetensors(target / "model.safetensors")
    assert "model.embed_tokens.weight" in header
    for p in files:
        assert not p.read_bytes().startswith(b"\x80"), p  # no pickle stream (protocol 2+) anywhere
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
    assert sorted(os.listdir(target.parent)) == ["converted"]  # the temporary folder was renamed away
    loaded = models._load_pretrained(str(target), trust_remote_code=False, local_only=True)[0]
    assert type(loaded).__name__ == "LlamaForCausalLM"


def test_conversion_cache_failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    target = tmp_path / "gguf" / "converted"
    models._store_conversion(tiny_model("llama"), tiny_tokenizer(), target)  # only costs speed: no error
    assert not target.exists() and os.listdir(target.parent) == []


@pytest.mark.slow
def test_default_model_conversion_cache_holds_no_pickle(default_model):
    folder = models.cache_dir() / "gguf" / models._file_key(Path(default_model.source))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files and {p.suffix for p in files} <= SAFE_SUFFIXES, files
    check_safetensors(folder / "model.safetensors")


# --------------------------------------------------------------------------------------------------------
# what ratequant prints of names it reads is inert
# --------------------------------------------------------------------------------------------------------
HOSTILE_NAME = "m\x1b]0;pwned\x07\x1b[2J\r\nratequant: error: fake\x9b31m\u202eevil\x00"


def test_inert_escapes_control_characters_and_collapses_line_breaks():
    from ratequant.validation import inert

    shown = inert(HOSTILE_NAME)
    assert shown == r"m\x1b]0;pwned\x07\x1b[2J ratequant: error: fake\x9b31m\u202eevil\x00"
    assert shown.isprintable() and inert(shown) == shown  # idempotent
    assert inert("plain name, ünïcödé, 中文 and  two  spaces") == "plain name, ünïcödé, 中文 and  two  spaces"
    assert inert("a\n\n  \r\nb\u2028c\td") == r"a b c\x09d"


def test_cli_prints_names_from_plans_and_errors_inert(tmp_path, capsys):
    """``inspect`` of a plan whose model and corpus names hold escapes, and the error of applying it to another
    model: one line each, the escapes shown, never sent to the terminal."""
    from ratequant.plan import Plan
    from ratequant.progress import Stages, note

    widths = [[3, 3]] * 3
    plan = Plan(
        model={"name": HOSTILE_NAME, "num_layers": 3, "num_kv_heads": 2, "head_dim": 16, "num_heads": 4},
        quantizer={"name": "uniform", "params": {}},
        budget={"kind": "avg_bits", "value": 3.0},
        allocator="test\x1b[31m",
        avg_bits=3.0,
        bits={"key": widths, "value": widths},
        calibration={"corpus": HOSTILE_NAME, "corpus_sha256": None, "tokens": 1, "seconds": 0.0},
    ).to_json(tmp_path / "plan.json")
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert not any(line.startswith("ratequant: error: fake") for line in out.splitlines())
    assert r"m\x1b]0;pwned\x07" in out
    other = tmp_path / "other"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert main(["eval", "--model", str(other), "--plan", str(plan), "--seq-len", "40", "--windows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "\x1b" not in err[0] and r"made for m\x1b]0;pwned" in err[0]
    Stages(True)(f"loaded {HOSTILE_NAME}")
    note(HOSTILE_NAME)
    err = capsys.readouterr().err
    assert "\x1b" not in err and len(err.strip().splitlines()) == 2
