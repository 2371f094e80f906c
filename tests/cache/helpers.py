"""What the cache tests share: the designs and dtypes they run, random mixed widths and token ids, greedy
generation through a cache, simulated logits, a model with a NaN weight, and a plan made for a tiny model.

Not a test module: ``from tests.cache.helpers import ...``.
"""

from __future__ import annotations

import numpy as np
import torch

from ratequant.cache.simulate import simulated_quantization
from ratequant.compat import model_geometry
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec

KIVI4 = get_quantizer("kivi", group_size=4)
UNIFORM = get_quantizer("uniform")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DESIGNS = {
    "uniform": get_quantizer("uniform", group_size=8),
    "kivi": get_quantizer("kivi", group_size=4),
    "quarot": get_quantizer("quarot"),
    "turbo": get_quantizer("turbo"),
}


def mixed_bits(model, low=1, high=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=model_geometry(model).shape)


def ids_of(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def simulated(model, ids, bits, quantizer, residual) -> torch.Tensor:
    with simulated_quantization(model, KVQuantSpec(bits, quantizer, residual)):
        return model(ids).logits


def generate(model, ids, cache, n=10, **kw):
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def poisoned(model, layer: int = 1):
    """``model`` whose layer ``layer`` computes NaN keys for kv-head 0 (a NaN weight row)."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.k_proj.weight[0, 0] = float("nan")
    return model


def make_plan(model, bits, quantizer, residual_length=8):
    from ratequant.plan import Plan

    g = model_geometry(model)
    return Plan(
        model={"name": "tiny", **g.to_dict()},
        quantizer=quantizer.to_config(),
        budget={"kind": "avg_bits", "value": float(bits.mean())},
        allocator="test",
        avg_bits=float(bits.mean()),
        bits={"key": bits[0].tolist(), "value": bits[1].tolist()},
        residual_length=residual_length,
    )
