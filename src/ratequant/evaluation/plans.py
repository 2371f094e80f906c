"""Perplexity under a plan: simulated (whole sequences, fast) or streaming (token by token, real cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ratequant.allocation import CostModel
from ratequant.errors import RateQuantError
from ratequant.evaluation.perplexity import PerplexityResult, perplexity
from ratequant.evaluation.streaming import streaming_perplexity
from ratequant.plan import Plan
from ratequant.quantizers import Quantizer

MODES = ("simulated", "streaming")


@dataclass(frozen=True)
class PlanEvaluation:
    """Perplexity under a plan with the true KV bytes per token at ``kv_bytes_context`` tokens of context.

    ``kv_bytes_per_token`` is measured from the cache's tensors in streaming mode and computed with the
    same formula (:class:`CostModel`) in simulated mode.
    """

    result: PerplexityResult
    mode: str
    avg_bits: float
    kv_bytes_per_token: float
    kv_bytes_context: int
    residual_length: int
    quantizer: dict

    def to_dict(self) -> dict:
        return {
            **self.result.to_dict(),
            "mode": self.mode,
            "avg_bits": self.avg_bits,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_context": self.kv_bytes_context,
            "residual_length": self.residual_length,
            "quantizer": self.quantizer,
        }


def evaluate_plan(
    model: torch.nn.Module,
    windows: torch.Tensor,
    plan: Plan,
    *,
    mode: str = "simulated",
    quantizer: Quantizer | None = None,
    allow_mismatch: bool = False,
    residual_length: int | None = None,
    progress: bool = True,
) -> PlanEvaluation:
    """Evaluate ``plan`` on ``windows [n, seq_len]``; ``quantizer`` other than the plan's needs ``allow_mismatch``."""
    from ratequant.cache import RateQuantCache, resolve_plan
    from ratequant.simulate import simulated_quantization

    if mode not in MODES:
        raise RateQuantError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    bits, quantizer, residual = resolve_plan(plan, model, quantizer, residual_length, allow_mismatch)
    seq_len = windows.shape[1]
    if mode == "simulated":
        with simulated_quantization(model, bits, quantizer, residual):
            result = perplexity(model, windows, progress=progress)
        cost = CostModel.from_quantizer(
            quantizer, plan.geometry, residual_length=residual, context_tokens=seq_len,
            kv_dtype_bytes=next(model.parameters()).dtype.itemsize,  # the residual window keeps the model's dtype
        )
        kv_bytes, context = cost.bytes_per_token(bits), seq_len
    else:
        result, caches = streaming_perplexity(
            model, windows, lambda: RateQuantCache(bits, quantizer, residual), progress=progress
        )
        context = caches[-1].get_seq_length()
        kv_bytes = caches[-1].nbytes().total / context
    return PlanEvaluation(
        result=result,
        mode=mode,
        avg_bits=float(bits.mean()),
        kv_bytes_per_token=float(kv_bytes),
        kv_bytes_context=int(context),
        residual_length=int(residual),
        quantizer=quantizer.to_config(),
    )
