"""The headroom of per-head allocation: every component's *measured* damage alone, and curves built from it.

RateQuant allocates on a proxy (the Fisher-weighted error, fitted as ``alpha * beta^-b``) under an additive model.
To see how much of a gap is the proxy's, the fit's, the additivity's or the model's, this module measures the
damage directly: for each component (kind, layer, kv head) and width, the KL divergence from full precision on
calibration text when *only that component* is quantized (as ``benchmarks/metric_validation.py`` does for a
sample). Allocating on these curves (:func:`measured_curves`) is the best a per-head allocation can do under
the additive assumption; comparing it with RateQuant's allocation says where the gap is.

Cost: one forward pass per (component, width), batched ``batch`` perturbations per pass (each row of the batch
quantizes another component). For SmolLM2-135M, 180 components at widths 2..5 on one 512-token window is 720
perturbations, about ten minutes on two CPU cores: a diagnostic for ``compare``, not the default path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ratequant.allocation import Curves
from ratequant.compat import intercept_attention, model_geometry, original_attention
from ratequant.compat.placement import input_device
from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS
from ratequant.progress import progress_bar
from ratequant.quantizers.base import Quantizer
from ratequant.validation import check_bitset, check_int


@dataclass(frozen=True, eq=False)
class DamageTable:
    """Measured damage ``values [2, L, H, nb]``: mean KL (nats per token) when only that component is quantized
    at ``bitset[j]``; ``tokens`` scored tokens, ``seconds`` the measurement time."""

    values: np.ndarray
    bitset: tuple[int, ...]
    design: str
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "values": self.values.tolist(),
            "bitset": list(self.bitset),
            "design": self.design,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }


@torch.inference_mode()
def measure_component_damage(
    model: torch.nn.Module,
    ids: torch.Tensor,
    quantizer: Quantizer,
    bitset,
    *,
    sink_tokens: int = 0,
    batch: int = 8,
    progress: bool = True,
) -> DamageTable:
    """KL from full precision of quantizing each component alone, for every width of ``bitset``.

    ``ids [1, T]`` is one calibration window; the component's keys (or values) after the first ``sink_tokens``
    are quantized for every query (the whole window stored), the rest of the model stays at full precision.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise RateQuantError(f"ids must be one window [1, T >= 2], got {tuple(getattr(ids, 'shape', ()))}")
    bitset = check_bitset(bitset)
    batch = check_int(batch, "batch", lo=1, hi=1024)
    sinks = check_int(sink_tokens, "sink tokens", lo=0, hi=ids.shape[1] - 1)
    g = model_geometry(model)
    device = input_device(model)
    ids = ids.to(device)
    reference = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
    jobs = [
        (k, layer, h, j)
        for k in range(2)
        for layer in range(g.num_layers)
        for h in range(g.num_kv_heads)
        for j in range(len(bitset))
    ]
    values = np.zeros((2, g.num_layers, g.num_kv_heads, len(bitset)))
    current: list[tuple[int, int, int, int]] = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        rows = [(r, job) for r, job in enumerate(current) if job[1] == layer]
        if rows:
            key, value = key.clone(), value.clone()
            for r, (k, _, h, j) in rows:
                target = key if k == 0 else value
                part = target[r : r + 1, h : h + 1, sinks:]
                target[r : r + 1, h : h + 1, sinks:] = quantizer.fake_quantize(part, bitset[j], KINDS[k])
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    start = time.perf_counter()
    with (
        intercept_attention(model, attention),
        progress_bar(total=len(jobs), desc="damage", unit="perturbation", enabled=progress) as bar,
    ):
        for first in range(0, len(jobs), batch):
            current[:] = jobs[first : first + batch]
            logits = model(input_ids=ids.expand(len(current), -1), use_cache=False).logits[:, :-1].float()
            log_probs = torch.log_softmax(logits, -1)
            kl = (reference.exp()[None] * (reference[None] - log_probs)).sum(-1).mean(-1)  # [rows]
            for (k, layer, h, j), value in zip(current, kl.tolist()):
                values[k, layer, h, j] = max(value, 0.0)
            bar.update(len(current))
    return DamageTable(values, bitset, quantizer.name, int(ids.shape[1] - 1), time.perf_counter() - start)


def measured_curves(damage: DamageTable, fitted: Curves) -> Curves:
    """Allocation curves from measured damage at its widths, continued above them by the fitted curve scaled to
    meet the measurement at the widest measured width (per component); made non-increasing in the width (a
    wider width never measures worse but for noise). Keeps ``fitted``'s lowest widths (``min_bits``)."""
    widths = fitted.bitset
    missing = [b for b in damage.bitset if b not in widths]
    if missing:
        raise RateQuantError(f"the damage was measured at widths {missing} that the curves do not cover ({widths})")
    out = fitted.values.copy()
    top = damage.bitset[-1]
    scale = damage.values[..., -1] / np.maximum(fitted.values[..., widths.index(top)], 1e-300)
    for j, b in enumerate(widths):
        out[..., j] = (
            damage.values[..., damage.bitset.index(b)] if b in damage.bitset else fitted.values[..., j] * scale
        )
    out = np.minimum.accumulate(out, axis=-1)
    return Curves.measured(out, widths, design=damage.design, label="measured KL", min_bits=fitted.min_bits)


__all__ = ["DamageTable", "measure_component_damage", "measured_curves"]
