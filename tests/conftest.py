"""Shared fixtures: tiny randomly initialised models of each family, and the embedded default model.

Tiny models are built from configs (no download); the default model is loaded once per session and only
by tests marked ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")


def deny_reading(monkeypatch, path: Path) -> None:
    """Make opening ``path`` fail as a file without read permission does (even when the tests run as root)."""
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)


def tiny_config(family: str, **overrides):
    """Config of a tiny model of ``family`` (2 KV heads, 4 query heads, 3 layers, vocab 300)."""
    import transformers as tf

    kwargs = {**TINY, **overrides}
    if family == "llama":
        return tf.LlamaConfig(**kwargs)
    if family == "qwen2":
        return tf.Qwen2Config(**kwargs)
    if family == "qwen3":
        return tf.Qwen3Config(**{"head_dim": 24, **kwargs})
    if family == "mistral":
        return tf.MistralConfig(**{"sliding_window": None, **kwargs})
    if family == "gemma":
        return tf.GemmaConfig(**{"head_dim": 16, **kwargs})
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=kwargs["hidden_size"],
            n_head=kwargs["num_attention_heads"],
            n_layer=kwargs["num_hidden_layers"],
            vocab_size=kwargs["vocab_size"],
            n_positions=kwargs["max_position_embeddings"],
            bos_token_id=0,
            eos_token_id=1,
        )
    raise ValueError(f"unknown family {family}")


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised causal LM in eval mode (float32, eager-free: the default sdpa)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def tiny_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer trained in memory on a little English (vocab <= 300); with ``bos`` it
    prepends ``<s>`` to every encoded text, as Llama, Gemma and Mistral tokenizers do (by default it adds none,
    as SmolLM2's and GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "the quick brown fox jumps over the lazy dog. " * 20 + "def f(x): return x + 1\n" * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    if bos:
        from tokenizers.processors import TemplateProcessing

        fast.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", fast.bos_token_id)]
        )
    return fast


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny matmuls are far faster on one thread (two threads spin against each other on a busy machine);
    tests marked ``slow`` run the real model and keep every core."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local Hugging Face model directory (tiny Llama + tokenizer) as a user would pass with --model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M), loaded once per session."""
    from ratequant.inputs.models import load_model

    return load_model()
