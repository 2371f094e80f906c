"""True storage as a function of the widths: the byte formula of :mod:`ratequant.spec`, tabulated per width."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS, Geometry
from ratequant.spec import StoragePolicy
from ratequant.validation import check_bitset, check_int, finite_real

ALL_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8)
DEFAULT_WIDTHS = (2, 3, 4, 5, 6, 7, 8)
"""The widths calibration and comparison allow unless told otherwise. 1 bit is left out: with the real
residual window and sink tokens, turbo's 1-bit codebook (which reconstructs better than the mean, so the
informative-width rule keeps it) made RateQuant lose to K3V2 at 2.5 bits on the default model (KL 0.084
against 0.047, 37 components at 1 bit); allowing widths from 2 gave 0.049. The additive distortion model
under-rates many components at 1 bit together. ``--bits 1-8`` allows it again."""


@dataclass(frozen=True, eq=False)
class CostModel:
    """Bytes per token of context of the whole KV cache at ``context_tokens`` tokens, for any widths.

    ``table[i, j]`` holds component ``i``'s bytes (flattened ``[2, L, H]`` order) at width ``bitset[j]``: codes
    and metadata of its quantized tokens (:meth:`StoragePolicy.component_bytes`) divided by the context;
    ``fixed_bytes_per_token`` the tokens kept in the model's dtype (sinks and residual window,
    :meth:`StoragePolicy.full_precision_bytes`), also per token of context. So

        bytes_per_token(bits) = sum_i table[i, bits_i] + fixed_bytes_per_token

    Build it with :meth:`from_policy`, which applies the spec's formula; the constructor only validates.
    """

    bitset: tuple[int, ...]
    table: np.ndarray
    fixed_bytes_per_token: float
    context_tokens: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "bitset", check_bitset(self.bitset, name="cost model bitset"))
        t = np.array(self.table, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != len(self.bitset) or t.shape[0] < 2 or t.shape[0] % 2:
            raise RateQuantError(
                f"cost model: table must be [N, {len(self.bitset)}] with N even (keys then values), got {t.shape}"
            )
        if not np.isfinite(t).all() or (t < 0).any():
            raise RateQuantError("cost model: table must hold finite non-negative byte counts")
        if (np.diff(t, axis=1) < 0).any():
            raise RateQuantError("cost model: bytes must not decrease with the bit width")
        t.setflags(write=False)
        object.__setattr__(self, "table", t)
        fixed = self.fixed_bytes_per_token
        if not finite_real(fixed) or fixed < 0:
            raise RateQuantError(f"cost model: fixed_bytes_per_token must be a finite number >= 0, got {fixed!r}")
        object.__setattr__(self, "fixed_bytes_per_token", float(fixed))
        object.__setattr__(self, "context_tokens", check_int(self.context_tokens, "cost model context_tokens", lo=1))

    @classmethod
    def from_policy(
        cls,
        policy: StoragePolicy,
        geometry: Geometry,
        context_tokens: int,
        *,
        itemsize: int = 2,
        bitset: Sequence[int] = ALL_WIDTHS,
    ) -> CostModel:
        """Tabulate ``policy``'s byte formula for ``geometry`` at ``context_tokens``; the tokens kept at full
        precision take ``itemsize`` bytes per value (the model's dtype)."""
        if not isinstance(policy, StoragePolicy):
            raise RateQuantError(f"policy must be a StoragePolicy, got {type(policy).__name__}")
        bitset = check_bitset(bitset)
        t = check_int(context_tokens, "context tokens", lo=1)
        d, per_kind = geometry.head_dim, geometry.num_layers * geometry.num_kv_heads
        rows = [[sum(policy.component_bytes(kind, b, d, t)) / t for b in bitset] for kind in KINDS]
        table = np.repeat(np.array(rows)[:, None, :], per_kind, axis=1).reshape(geometry.num_components, len(bitset))
        fixed = sum(sum(policy.full_precision_bytes(kind, d, t, 1, itemsize)) for kind in KINDS) * per_kind / t
        return cls(bitset, table, fixed, t)

    @property
    def num_components(self) -> int:
        return self.table.shape[0]

    @property
    def depends_on_bits(self) -> bool:
        """False when every token sits at full precision at this context (nothing is quantized yet)."""
        return bool((self.table[:, -1] > self.table[:, 0]).any())

    def columns(self, bitset: Sequence[int]) -> np.ndarray:
        """``[N, len(bitset)]`` bytes per token of context at the widths ``bitset``."""
        missing = [b for b in bitset if b not in self.bitset]
        if missing:
            raise RateQuantError(f"cost model has no byte counts for width(s) {missing}; it covers {self.bitset}")
        return self.table[:, [self.bitset.index(b) for b in bitset]]

    def bytes_per_token(self, bits: np.ndarray) -> float:
        """True bytes per token of context for integer ``bits`` (``[2, L, H]`` or flat ``[N]``)."""
        flat = np.asarray(bits).reshape(-1)
        if flat.size != self.num_components:
            raise RateQuantError(f"cost model covers {self.num_components} components, bits has {flat.size}")
        lookup = np.full(9, -1)
        lookup[list(self.bitset)] = np.arange(len(self.bitset))
        if not np.issubdtype(flat.dtype, np.integer) or flat.min() < 1 or flat.max() > 8 or (lookup[flat] < 0).any():
            raise RateQuantError(f"bits must be integers from the cost model's bitset {self.bitset}")
        return float(self.table[np.arange(flat.size), lookup[flat]].sum()) + self.fixed_bytes_per_token


__all__ = ["CostModel"]
