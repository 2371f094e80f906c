"""The benchmarks use only the library's public faces: every ``from ratequant... import`` in ``benchmarks/*.py`` names
``ratequant`` itself or one of its subpackages (``ratequant.cache``, never ``ratequant.cache.prefill`` nor a module
file such as ``ratequant.spec``), and every name it imports is one that package exports (in its ``__all__``; no
private names, no submodules the package does not export).

The few imports that still reach into a module are listed below with the reason; the list may only shrink.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))

PRIMITIVES = {
    "ratequant.jsonio": {"write_json"},
}
"""``{module: names}`` imported from a module: the root's primitives (the atomic JSON writer every result file goes
through). A name a package face comes to export must then be imported from there."""

PATCHED_MODULES = {
    ("prefill_paths.py", "ratequant.cache", "attention"),
    ("prefill_paths.py", "ratequant.cache", "layer"),
}
"""``(script, package, module)``: submodules a benchmark imports to patch a module constant (``MAX_QUERY``, which
has no public switch), where only the module object will do."""


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _exports(module, name: str) -> bool:
    if name.startswith("_") or not hasattr(module, name):
        return False
    return name in getattr(module, "__all__", (name,))


def import_problems(source: str, script: str = "<benchmark>") -> list[str]:
    """What is wrong with the ``ratequant`` imports of ``source`` (empty when they all use public faces)."""
    problems = []
    for node in ast.walk(ast.parse(source, script)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ratequant" and (len(parts) > 2 or not _is_package(alias.name)):
                    problems.append(f"{script}:{node.lineno}: import {alias.name} reaches into a module")
            continue
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        module = node.module
        parts = module.split(".")
        if parts[0] != "ratequant":
            continue
        names = [alias.name for alias in node.names]
        where = f"{script}:{node.lineno}: from {module} import {', '.join(names)}"
        if module in PRIMITIVES:
            face = importlib.import_module(module.rsplit(".", 1)[0]) if len(parts) > 2 else None
            for name in names:
                if name not in PRIMITIVES[module]:
                    problems.append(f"{where}: {name} is not a listed primitive")
                elif face is not None and _exports(face, name):
                    problems.append(f"{where}: {face.__name__} now exports {name}: import it from there")
            continue
        if len(parts) > 2 or not _is_package(module):
            problems.append(f"{where}: reaches into a module (import from ratequant or ratequant.<subpackage>)")
            continue
        package = importlib.import_module(module)
        for name in names:
            if (script, module, name) in PATCHED_MODULES:
                continue
            if not _exports(package, name):
                problems.append(f"{where}: {module} does not export {name}")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_only_public_names(script):
    assert import_problems(script.read_text(), script.name) == []


def test_the_check_catches_a_reach_into_a_module():
    assert import_problems("from ratequant.cache.prefill import prefill\n")
    assert import_problems("from ratequant.spec import KVQuantSpec\n")
    assert import_problems("def f():\n    from ratequant.cache import attention\n")
    assert import_problems("from ratequant.cache import no_such_name\n")
    assert import_problems("import ratequant.cache.prefill\n")
    assert import_problems("from ratequant.calibration.search import something_else\n")
    assert not import_problems("from ratequant import Plan, prefill\nfrom ratequant.cache import RateQuantCache\n")


def test_every_exception_is_still_used():
    """A primitive or patched module no benchmark uses any more is dropped from the lists above."""
    used = set()
    for script in SCRIPTS:
        for node in ast.walk(ast.parse(script.read_text(), script.name)):
            if isinstance(node, ast.ImportFrom) and node.module:
                used.update((script.name, node.module, alias.name) for alias in node.names)
    pending = {(module, name) for module, names in PRIMITIVES.items() for name in names}
    assert pending - {(module, name) for _, module, name in used} == set()
    assert PATCHED_MODULES - used == set()
