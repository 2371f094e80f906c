"""Rank reduction: the baseline that keeps fewer dimensions at high precision instead of all at low precision.

Per component (kind, layer, kv head) the calibration keys or values are centred and their principal
directions computed (PCA). A token is stored as its ``r`` leading coefficients, at 16 bits
(``coefficient_bits=16``) or quantized (the rank-plus-quantization hybrid); the basis and mean are a fixed
per-model cost, not a per-token one. Reconstruction: ``x_hat = mean + coeffs @ basis[:, :r].T``.

At the same storage per token, "Quantization versus rank reduction" (see ``shared/seeds``) finds that
keeping every dimension at low precision beats dropping dimensions, because softmax routing is fragile to
the directions lost; this module lets a user check that on their own model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS


@dataclass(frozen=True)
class RankBases:
    """PCA of every component: ``means [2, L, H, D]``, ``bases [2, L, H, D, D]`` (columns are principal
    directions, by decreasing variance), ``variances [2, L, H, D]`` (per direction, descending)."""

    means: torch.Tensor
    bases: torch.Tensor
    variances: torch.Tensor

    @classmethod
    def fit(cls, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RankBases:
        """Fit from calibration ``keys``/``values`` ``[L, B, H, T, D]``; ``attention_mask [B, T]`` drops padding."""
        if keys.dim() != 5 or keys.shape != values.shape:
            raise RateQuantError(
                f"keys and values must both be [L, B, H, T, D], got {tuple(keys.shape)}, {tuple(values.shape)}"
            )
        L, B, H, T, D = keys.shape
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        means, bases, variances = [], [], []
        for x in (keys, values):
            # [L, H, N, D] rows = real tokens
            rows = x.detach().float().cpu().permute(0, 2, 1, 3, 4)[:, :, mask]
            if rows.shape[2] < 2:
                raise RateQuantError("rank reduction needs at least two calibration tokens")
            mean = rows.mean(dim=2)
            centred = rows - mean[:, :, None]
            covariance = centred.transpose(-1, -2) @ centred / (rows.shape[2] - 1)  # [L, H, D, D]
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
            means.append(mean)
            bases.append(eigenvectors.flip(-1).float())
            variances.append(eigenvalues.flip(-1).clamp_min(0).float())
        return cls(torch.stack(means), torch.stack(bases), torch.stack(variances))

    @property
    def head_dim(self) -> int:
        return self.means.shape[-1]

    def reconstruct(self, x: torch.Tensor, kind: str, layer: int, rank: int, quantize=None) -> torch.Tensor:
        """Project ``x [B, H, T, D]`` of ``layer`` onto its ``rank`` leading directions and back.

        ``quantize(coefficients [B, H, T, rank]) -> same shape`` optionally quantizes the coefficients
        (the hybrid); without it they stay in ``x``'s precision (stored as 16-bit numbers).
        """
        if not 0 <= rank <= self.head_dim:
            raise RateQuantError(f"rank must be between 0 and head_dim={self.head_dim}, got {rank}")
        k = KINDS.index(kind)
        mean = self.means[k, layer].to(x)[None, :, None, :]  # [1, H, 1, D]
        basis = self.bases[k, layer, :, :, :rank].to(x)  # [H, D, r]
        coefficients = (x - mean) @ basis[None]  # [B, H, T, r]
        if quantize is not None and rank > 0:
            coefficients = quantize(coefficients)
        return mean + coefficients @ basis.transpose(-1, -2)[None]

    def residual_variance(self, rank: int) -> torch.Tensor:
        """Expected squared reconstruction error per token ``[2, L, H]``: the sum of the dropped variances."""
        return self.variances[..., rank:].sum(-1)


def rank_for_bits(bits_per_token: float, coefficient_bits: int = 16, metadata_bits: float = 0.0) -> int:
    """Largest rank whose per-token storage ``rank * coefficient_bits + metadata_bits`` fits ``bits_per_token``."""
    return max(0, math.floor((bits_per_token - metadata_bits) / coefficient_bits + 1e-9))


@contextlib.contextmanager
def simulated_rank_reduction(model: torch.nn.Module, bases: RankBases, rank: int, quantize=None):
    """Within the block, attention sees every key and value reconstructed from ``rank`` PCA coefficients
    (quantized by ``quantize`` when given). Applies to all tokens (no full-precision residual window)."""
    from ratequant.compat import intercept_attention, original_attention

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        key = bases.reconstruct(key, "key", layer, rank, quantize)
        value = bases.reconstruct(value, "value", layer, rank, quantize)
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    with intercept_attention(model, attention):
        yield model
