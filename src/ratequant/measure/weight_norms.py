"""The geometry argument of "Quantize What Counts" on the user's model: the norms of W_K against W_V.

"Quantize What Counts" (arXiv:2502.15075, Theorem 1) bounds the attention error caused by quantizing keys
through ``||W_K||`` and the one caused by quantizing values through ``||W_V||``; on most models the key
projections have the larger norms, which is why keys deserve more bits. :func:`weight_norms` gives, per layer
and kind, the spectral and Frobenius norms (and per kv head, for the head slices of the projections).

:func:`norm_curves` turns them into the allocation model of the layer-wise K/V allocators that derive widths
from weight norms (spectral-kv / PyPI ``kvq``): the error of kind ``k`` in layer ``l`` at ``b`` bits is
``||W||^2 * 2^(-2b)``, a fixed decay of 4 per bit for everything: exactly the fixed-beta assumption RateQuant
calls distortion-model mismatch. Allocated with the ``layer-kind`` strategy it is the peer baseline ``norms``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ratequant.allocation import Curves
from ratequant.compat import kv_projections, model_geometry
from ratequant.geometry import KINDS
from ratequant.validation import check_bitset

NORMS = ("spectral", "frobenius")


@dataclass(frozen=True, eq=False)
class WeightNorms:
    """``spectral``/``frobenius`` ``[2, L]`` (kind 0 = W_K) per layer; ``head_spectral`` ``[2, L, H]`` per kv head."""

    spectral: np.ndarray
    frobenius: np.ndarray
    head_spectral: np.ndarray

    def key_over_value(self, norm: str = "spectral") -> np.ndarray:
        """``||W_K|| / ||W_V||`` per layer ``[L]``."""
        values = getattr(self, norm)
        return values[0] / np.maximum(values[1], 1e-30)

    def to_dict(self) -> dict:
        return {
            **{f"{norm}_{kind}": getattr(self, norm)[k].tolist() for norm in NORMS for k, kind in enumerate(KINDS)},
            "head_spectral": {kind: self.head_spectral[k].tolist() for k, kind in enumerate(KINDS)},
        }


@torch.no_grad()
def weight_norms(model: torch.nn.Module) -> WeightNorms:
    """Norms of every layer's key and value projections (computed in float64 on the CPU)."""
    g = model_geometry(model)
    spectral, frobenius = np.zeros((2, g.num_layers)), np.zeros((2, g.num_layers))
    heads = np.zeros(g.shape)
    for layer, pair in enumerate(kv_projections(model)):
        for k, w in enumerate(pair):
            w = w.to(device="cpu", dtype=torch.float64)
            spectral[k, layer] = float(torch.linalg.matrix_norm(w, ord=2))
            frobenius[k, layer] = float(torch.linalg.matrix_norm(w))
            per_head = w.reshape(g.num_kv_heads, g.head_dim, -1)
            heads[k, layer] = torch.linalg.matrix_norm(per_head, ord=2).numpy()
    return WeightNorms(spectral, frobenius, heads)


def norm_curves(norms: WeightNorms, bitset, *, norm: str = "spectral") -> Curves:
    """The weight-norm error model ``||W||^2 * 4^-b`` of every component (its layer's norm shared by its heads)."""
    widths = check_bitset(bitset)
    per_layer = getattr(norms, norm) ** 2  # [2, L]
    heads = norms.head_spectral.shape[2]
    values = per_layer[:, :, None, None] / heads * 4.0 ** -np.asarray(widths, dtype=np.float64)
    values = np.broadcast_to(values, (*norms.head_spectral.shape, len(widths)))
    return Curves(values, widths, "model", None, label=f"{norm} norm^2 x 4^-b (fixed beta)")


__all__ = ["NORMS", "WeightNorms", "norm_curves", "weight_norms"]
