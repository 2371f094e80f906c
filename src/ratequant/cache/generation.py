"""Text generation with a plan's mixed-precision KV cache, reporting the cache's real bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ratequant.cache.attention import ATTENTION_PATHS
from ratequant.cache.prefill import DEFAULT_PREFILL_CHUNK, prefill
from ratequant.compat import cache_argument, max_positions
from ratequant.errors import RateQuantError
from ratequant.inputs.models import LoadedModel
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, KVQuantSpec
from ratequant.validation import check_float, check_int


@dataclass(frozen=True)
class GenerationResult:
    """A continuation and the KV cache it needed: ``cache_bytes`` (real, split) against a float16 cache."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    cache_bytes: dict | None  # {"codes", "metadata", "residual", "sink", "buffer", "total"}; None without a plan
    fp16_cache_bytes: int
    model_dtype_cache_bytes: int  # a full-precision cache in the model's own dtype
    prefill_chunk: int | None = None  # tokens per prefill pass; None: the prompt in one pass
    attention: str | None = None  # "packed" (from the codes) or "decode" (the history decoded); None: no plan

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        head = (
            f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_second:.1f} tokens/s)"
        )
        if self.cache_bytes is None:
            return f"{head}; full-precision cache (a float16 cache would hold {self.fp16_cache_bytes:,} bytes)"
        b = self.cache_bytes
        return (
            f"{head}\nKV cache {b['total']:,} bytes (codes {b['codes']:,}, metadata {b['metadata']:,}, "
            f"residual {b['residual']:,}, sink tokens {b['sink']:,}); a full-precision cache would hold "
            f"{self.model_dtype_cache_bytes:,} "
            f"in the model's dtype, {self.fp16_cache_bytes:,} in float16 "
            f"({b['total'] / self.fp16_cache_bytes:.1%} of it)"
            + (
                "\nthe newest tokens (the residual window) stay at full precision until a whole chunk of them is "
                "quantized, so a context this short is mostly that window; the saving shows in long contexts (the "
                f"plan's bytes per token are stated at {DEFAULT_CONTEXT_TOKENS:,} tokens)"
                if b["residual"] > b["codes"]
                else ""
            )
        )

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "cache_bytes": self.cache_bytes,
            "fp16_cache_bytes": self.fp16_cache_bytes,
            "model_dtype_cache_bytes": self.model_dtype_cache_bytes,
            "prefill_chunk": self.prefill_chunk,
            "attention": self.attention,
        }


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompt: str,
    spec: KVQuantSpec | None = None,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    stream: bool = False,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    attention: str = "packed",
) -> GenerationResult:
    """Continue ``prompt`` with ``model.generate`` and a :class:`RateQuantCache` of ``spec`` (e.g.
    ``plan.resolve(model)``; a full-precision ``DynamicCache`` when ``spec`` is None). With ``stream`` the
    continuation is printed to standard output as it is generated.

    The prompt but its last token is prefilled through the cache ``prefill_chunk`` tokens at a time (after the
    spec's sink tokens; :mod:`ratequant.cache.prefill`), so the peak activation memory is one chunk's, not the
    prompt's; ``None`` prefills in one pass. With a full-precision cache the chunking changes nothing but
    rounding; with a quantized one each prompt token sees its own chunk at full precision.

    ``attention="packed"`` (default) computes decode steps' attention straight from the packed codes (the cache
    is made with ``attention=`` and the model, which routes the model's attention: ``model.generate`` runs with
    no context manager, as a user's own call would); ``"decode"`` decodes the history on every step first.
    Prefill pieces read the history one block at a time either way (:func:`ratequant.cache.prefill.piece_attention`):
    that is what bounds their memory. Calls from several threads on one model are safe (each its own cache).

    ``max_new_tokens`` must fit the model's context after the prompt; sampling takes ``temperature`` in
    [0.01, 100] and ``top_p`` in (0, 1]."""
    from transformers import DynamicCache

    from ratequant.cache import RateQuantCache

    if not prompt:
        raise RateQuantError("the prompt is empty; pass some text to continue")
    tokenizer, model = loaded.tokenizer, loaded.model
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RateQuantError(f"{loaded.name} has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(loaded.device)
    check_int(max_new_tokens, "max_new_tokens", lo=1)
    if attention not in ATTENTION_PATHS:
        raise RateQuantError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {attention!r}")
    if prefill_chunk is not None:
        check_int(prefill_chunk, "prefill chunk", lo=1)
    check_int(seed, "seed", lo=0)
    if sample:
        check_float(temperature, "temperature", lo=0.01, hi=100.0)
        check_float(top_p, "top_p", lo=0.0, hi=1.0, lo_open=True)
    limit = max_positions(model)
    prompt_tokens = encoded["input_ids"].shape[1]
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise RateQuantError(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's context of {limit} "
            f"tokens; ask for at most {max(limit - prompt_tokens, 0)} new tokens"
        )
    if spec is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = RateQuantCache(spec, model=model, attention=attention)
    torch.manual_seed(seed)
    options = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    if stream:
        from transformers import TextStreamer

        options["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if prefill_chunk is not None and prompt_tokens > 1:
        prefill(model, encoded["input_ids"][:, :-1], cache, prefill_chunk)
    output = model.generate(
        **encoded, **cache_argument(model, cache), max_new_tokens=max_new_tokens, pad_token_id=pad, **options
    )
    seconds = time.perf_counter() - start
    new = output[0, prompt_tokens:]
    g = loaded.geometry
    stored = cache.get_seq_length()
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        new_tokens=int(new.numel()),
        seconds=seconds,
        cache_bytes=None if spec is None else cache.nbytes().to_dict(),
        fp16_cache_bytes=g.kv_bytes_per_token(2) * stored,
        model_dtype_cache_bytes=g.kv_bytes_per_token(loaded.dtype.itemsize) * stored,
        prefill_chunk=prefill_chunk,
        attention=None if spec is None else attention,
    )
