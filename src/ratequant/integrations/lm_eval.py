"""lm-evaluation-harness model ``ratequant``: any lm-eval task on a model whose KV cache follows a ratequant plan.

Importing this module registers :class:`RateQuantLM` with lm-eval's model registry under the name ``ratequant``.
lm-eval's own command line cannot find models that other packages register, so run it through ours, which
imports this module first::

    ratequant lm-eval --model ratequant --model_args pretrained=default,plan=plan.json --tasks hellaswag

or from Python::

    import lm_eval
    from ratequant.integrations.lm_eval import RateQuantLM

    lm = RateQuantLM(pretrained="default", plan="plan.json")
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

**The prefill trap.** lm-eval scores ``loglikelihood``, ``multiple_choice`` and ``loglikelihood_rolling`` requests
with one forward pass over context and continuation (a prefill). A quantized cache only changes what it *stores*
for later steps, so inside that single pass every query sees full-precision keys and values: plugging a
quantized cache (Hugging Face's ``QuantizedCache`` at 2 bits and at 8 bits alike) into such a pass gives exactly
the full-precision scores, and says nothing about the quantization. This model therefore applies the plan
inside the pass:

* ``mode="simulated"`` (default): every forward (``_model_call``: loglikelihood, multiple choice, rolling
  loglikelihood, the batch-size probe) and every ``generate`` runs inside
  :func:`ratequant.cache.simulate.simulated_quantization`, so each query sees the keys and values it would see when
  decoding token by token through a :class:`~ratequant.cache.RateQuantCache` of the plan (sinks and its own
  quantization chunk at full precision, every earlier chunk quantized as stored). One pass, no decode loop.
* ``mode="streaming"``: every forward feeds the input through a fresh, real :class:`~ratequant.cache.RateQuantCache`
  in pieces of the cache's quantization chunk (``min(spec.chunks)`` tokens; the first piece also holds the sink
  tokens), which reproduces token-by-token decoding exactly and gives the simulated scores to floating-point
  tolerance, slower. ``generate`` gets a fresh ``RateQuantCache``: its prompt is one prefill, as in deployment
  (the prompt's tokens see each other at full precision; generated tokens see the prompt as stored).

lm-eval pads a loglikelihood batch on the right. Both modes stay exact for the real tokens: a causal query never
attends to a later position, and a quantization chunk a real query sees as stored ends before that query's own
chunk, so it holds real tokens only (pads that share a real query's chunk sit at full precision with it).

**The residual window.** A plan keeps its last ``residual_length`` tokens (128 by default, KIVI's) at full
precision, and quantizes only whole chunks after the sink tokens: a request shorter than ``sink_tokens +
residual_length`` tokens is not quantized at all, in either mode, as in the real cache. Most lm-eval tasks have
short requests; pass ``residual=0`` (model argument) to quantize every whole chunk, as ``ratequant compare`` does.

Without a plan the model runs at full precision and scores exactly as lm-eval's ``hf`` model on the same weights.
:meth:`RateQuantLM.get_model_info` adds the plan's path, the mode and the resolved spec to lm-eval's results.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from ratequant.compat import cache_argument
from ratequant.errors import RateQuantError
from ratequant.integrations import MissingIntegrationError, require_lm_eval
from ratequant.spec import KVQuantSpec

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only where the extra is missing or broken
    require_lm_eval()  # not installed: the install hint
    raise MissingIntegrationError(
        f"lm-evaluation-harness could not be imported ({exc}); reinstall it: pip install 'ratequant[lm-eval]'"
    ) from exc

MODES = ("simulated", "streaming")
"""How the plan is applied: one simulated pass, or the real cache fed in pieces of its quantization chunk."""

_NONE_STRINGS = ("", "none", "null")
HFLM_ARGUMENTS = (
    "backend",
    "truncation",
    "logits_cache",
    "softmax_dtype",
    "mixed_precision_dtype",
    "max_batch_size",
    "add_bos_token",
    "prefix_token_id",
    "think_end_token",
    "enable_thinking",
    "chat_template_args",
)
"""lm-eval ``HFLM`` arguments passed on: those that act on a model this class has loaded (HFLM ignores the rest,
such as ``revision``, ``parallelize`` or ``peft``, for a model it is handed; they are refused, not dropped)."""
_DTYPES = ("float32", "float16", "bfloat16")
_HF_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

log = logging.getLogger(__name__)


# -- argument coercion: lm-eval passes model_args as strings, ints, floats, booleans or None -------------------
def _is_none(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS)


def _optional_int(value: object, name: str, lo: int) -> int | None:
    if _is_none(value):
        return None
    if isinstance(value, bool):
        raise RateQuantError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
        result = int(number)
    except (TypeError, ValueError):
        raise RateQuantError(f"{name} must be an integer, got {value!r}") from None
    if result != number or result < lo:
        raise RateQuantError(f"{name} must be an integer of at least {lo}, got {value!r}")
    return result


def _batch_size(value: object) -> int | str:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return value.strip().lower()
    size = _optional_int(value, "batch_size", 1)
    return 1 if size is None else size


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RateQuantError(f"{name} must be true or false, got {value!r}")


def _dtype(value: object) -> str | torch.dtype | None:
    if _is_none(value) or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    text = str(value).removeprefix("torch.")
    if text not in _DTYPES:
        raise RateQuantError(f"dtype must be auto, {', '.join(_DTYPES)}, got {value!r}")
    return text


def accepted_model_args() -> tuple[str, ...]:
    """Every model argument ``--model ratequant`` takes: :class:`RateQuantLM`'s own, then :data:`HFLM_ARGUMENTS`."""
    import inspect

    own = [
        name
        for name, p in inspect.signature(RateQuantLM.__init__).parameters.items()
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    return (*own, *HFLM_ARGUMENTS)


def check_model_args(named: dict, extra: dict) -> None:
    """Refuse, in one line naming the accepted ones, a model argument this model does not take (a misspelling such
    as ``resdiual=0`` would otherwise be dropped silently) or one given empty (``plan=`` would run at full
    precision); ``none`` or leaving it out says "not set"."""
    accepted = accepted_model_args()
    unknown = [name for name in extra if name not in HFLM_ARGUMENTS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), accepted, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RateQuantError(
            f"unknown model argument {', '.join(map(str, unknown))}{hint}; --model ratequant takes "
            f"{', '.join(accepted)}"
        )
    empty = [name for name, value in {**named, **extra}.items() if isinstance(value, str) and not value.strip()]
    if empty:
        raise RateQuantError(
            f"model argument {', '.join(empty)} is empty; give a value (none to leave it unset) or leave it out. "
            f"--model ratequant takes {', '.join(accepted)}"
        )


def resolve_device(device: object) -> str:
    """The device to load on: ``device`` (lm-eval's CLI passes ``cuda:0`` unless told otherwise), or the CPU,
    with a warning, when CUDA is asked for and this machine has none; None picks CUDA when available."""
    if _is_none(device):
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device)
    if text.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for, but CUDA is not available here: running on the CPU", text)
        return "cpu"
    return text


@contextlib.contextmanager
def _quiet_hflm() -> Iterator[None]:
    """Drop HFLM's warnings about being handed an already-loaded model: that is how this class loads models."""
    logger = logging.getLogger("lm_eval.models.huggingface")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HF_WARNINGS)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@register_model("ratequant")
class RateQuantLM(HFLM):
    """lm-eval's Hugging Face model (``HFLM``) with the KV cache of a ratequant plan (module doc: the prefill trap).

    Args:
        pretrained: a ratequant model spec (``"default"``: the embedded SmolLM2-135M, a model directory, a ``.gguf``
            file, a hub id), loaded with :func:`ratequant.inputs.models.load_model`; or an already-loaded model object,
            with ``tokenizer=`` (then ``dtype`` and ``device`` are not applied: the model stays as it is).
        plan: a plan file from ``ratequant calibrate`` (a path), a :class:`~ratequant.plan.Plan` or a
            :class:`~ratequant.spec.KVQuantSpec`; None (default) runs at full precision.
        mode: ``"simulated"`` (default) or ``"streaming"`` (module doc).
        dtype: ``auto`` (the checkpoint's; float32 for GGUF), ``float32``, ``float16`` or ``bfloat16``.
        device: torch device; CUDA falls back to the CPU when unavailable (lm-eval's CLI passes ``cuda:0``).
        batch_size: an integer (default 1) or ``auto`` / ``auto:N`` (probing is slow on a CPU).
        max_length: context length lm-eval may use (default: the model's).
        residual, sink_tokens: override the plan's full-precision residual window and sink-token count.
        allow_mismatch: accept ``quantizer`` / a plan for another design (see :meth:`Plan.resolve`); rarely needed.
        trust_remote_code: let a hub model's own code run.
        **kwargs: passed on to ``HFLM`` (e.g. ``add_bos_token``, ``truncation``, ``max_batch_size``).
    """

    def __init__(
        self,
        pretrained: object = "default",
        plan: object = None,
        mode: str = "simulated",
        dtype: object = None,
        device: object = None,
        batch_size: object = 1,
        max_length: object = None,
        residual: object = None,
        sink_tokens: object = None,
        tokenizer: object = None,
        trust_remote_code: object = False,
        allow_mismatch: object = False,
        **kwargs,
    ) -> None:
        from ratequant.inputs.models import load_model

        check_model_args(
            {"pretrained": pretrained, "plan": plan, "mode": mode, "dtype": dtype, "device": device}
            | {"batch_size": batch_size, "max_length": max_length, "residual": residual, "sink_tokens": sink_tokens}
            | {"tokenizer": tokenizer, "trust_remote_code": trust_remote_code, "allow_mismatch": allow_mismatch},
            kwargs,
        )
        mode = str(mode).strip().lower()
        if mode not in MODES:
            raise RateQuantError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        trust = _bool(trust_remote_code, "trust_remote_code")
        if isinstance(pretrained, (str, os.PathLike)) or pretrained is None:
            loaded = load_model(
                None if _is_none(pretrained) else os.fspath(pretrained),
                dtype=_dtype(dtype),
                device=resolve_device(device),
                trust_remote_code=trust,
            )
            model, name, source = loaded.model, loaded.name, loaded.source
            tokenizer = loaded.tokenizer if _is_none(tokenizer) else tokenizer
        else:
            if _is_none(tokenizer):
                raise RateQuantError(
                    "pass tokenizer= with an already-loaded model (or pass a model spec: default, a directory, "
                    "a .gguf file)"
                )
            model = pretrained
            name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
            source = name
        spec, plan_path = self._resolve_spec(
            model,
            plan,
            residual=_optional_int(residual, "residual", 0),
            sink_tokens=_optional_int(sink_tokens, "sink_tokens", 0),
            allow_mismatch=_bool(allow_mismatch, "allow_mismatch"),
        )
        # set before HFLM's constructor: it may already call _model_call (batch-size probing)
        self.rq_spec: KVQuantSpec | None = spec
        self.rq_mode = mode
        self.rq_plan = plan_path
        self.rq_name, self.rq_source = name, source
        with _quiet_hflm():
            super().__init__(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=_batch_size(batch_size),
                max_length=_optional_int(max_length, "max_length", 1),
                trust_remote_code=trust,
                **kwargs,
            )

    @staticmethod
    def _resolve_spec(
        model, plan: object, *, residual: int | None, sink_tokens: int | None, allow_mismatch: bool
    ) -> tuple[KVQuantSpec | None, str | None]:
        from ratequant.plan import Plan

        if isinstance(plan, KVQuantSpec):
            if residual is not None or sink_tokens is not None:
                raise RateQuantError("residual and sink_tokens override a plan; with a KVQuantSpec, build it so")
            plan.check_model(model)
            return plan, None
        if _is_none(plan):
            if residual is not None or sink_tokens is not None:
                raise RateQuantError("residual and sink_tokens override a plan's; pass plan= as well")
            return None, None
        path = None
        if not isinstance(plan, Plan):
            path = os.fspath(plan) if isinstance(plan, (str, os.PathLike)) else None
            if path is None:
                raise RateQuantError(f"plan must be a plan file, a Plan or a KVQuantSpec, got {type(plan).__name__}")
            plan = Plan.load(path)
            path = os.path.abspath(path)
        spec = plan.resolve(model, residual_length=residual, sink_tokens=sink_tokens, allow_mismatch=allow_mismatch)
        return spec, path

    # -- the forward passes lm-eval makes ---------------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        spec = self.rq_spec
        if spec is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if self.rq_mode == "streaming" and attn_mask is None and labels is None:
            return self._streaming_call(inps)
        from ratequant.cache.simulate import simulated_quantization

        with simulated_quantization(self.model, spec):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _streaming_call(self, inps: torch.Tensor) -> torch.Tensor:
        """Logits of ``inps`` fed through a fresh RateQuantCache: the sinks and one chunk, then a chunk at a time."""
        from ratequant.cache import RateQuantCache
        from ratequant.cache.prefill import piece_bounds

        spec = self.rq_spec
        cache = RateQuantCache(spec, model=self.model)
        bounds = piece_bounds(inps.shape[1], min(spec.chunks), spec.sink_tokens)
        parts = []
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            for lo, hi in zip(bounds, bounds[1:]):
                out = self.model(input_ids=inps[:, lo:hi], use_cache=True, **cache_argument(self.model, cache))
                parts.append(out.logits)
        return torch.cat(parts, dim=1)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        spec = self.rq_spec
        if spec is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if self.rq_mode == "streaming":
            from ratequant.cache import RateQuantCache

            generation_kwargs.update(cache_argument(self.model, RateQuantCache(spec, model=self.model)))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        from transformers import DynamicCache

        from ratequant.cache.simulate import simulated_quantization

        # a cache that keeps every position: simulated quantization reads positions as cache indices, which a
        # sliding-window cache layer (built from the config of Mistral, Gemma2/3) would shift
        generation_kwargs.update(cache_argument(self.model, DynamicCache()))
        with simulated_quantization(self.model, spec):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- what lm-eval records ---------------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        """Model facts for lm-eval's results (no hub lookup, unlike HFLM's), with the plan, mode and spec."""
        from ratequant import __version__

        model = self._model
        spec = self.rq_spec
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(getattr(model, "dtype", "")),
            "model_revision": None,
            "model_sha": "",
            "ratequant_version": __version__,
            "ratequant_model": self.rq_name,
            "ratequant_source": self.rq_source,
            "ratequant_device": str(self.device),
            "ratequant_plan": self.rq_plan,
            "ratequant_mode": self.rq_mode if spec is not None else "full precision",
            "ratequant_avg_bits": spec.avg_bits if spec is not None else None,
            "ratequant_spec": spec.to_dict() if spec is not None else None,
        }


__all__ = ["HFLM_ARGUMENTS", "MODES", "RateQuantLM", "accepted_model_args", "check_model_args", "resolve_device"]
