"""What the source never does (see docs/reliability.md), checked on the syntax tree of every module of
``src/ratequant`` and of ``benchmarks/``, with a self-test that the checker catches each pattern.

* The source never unpickles: no ``pickle``-family imports, no ``torch.load`` without ``weights_only=True``,
  no ``numpy.load(allow_pickle=True)``, no ``eval``/``exec``, no shell, no literal ``trust_remote_code=True`` and no
  ``trust_remote_code`` parameter that defaults to anything but False; the library imports no module by a computed
  name.

These scans read every file of the source, so they belong to no single module. What the library does at run time
(``trust_remote_code`` off unless asked, custom code and pickle checkpoints refused, the GGUF conversion cache):
tests/inputs/test_models.py and tests/cli/test_options.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ratequant

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
