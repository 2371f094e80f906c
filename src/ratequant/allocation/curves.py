"""What an allocator optimises: every component's distortion at every allowed width, and where it came from.

:class:`Curves` is the one input of :func:`ratequant.allocation.allocate`. It is built from a fitted model
(:meth:`Curves.from_fit`: ``alpha * beta^-b`` at any widths), from a measured table (:meth:`Curves.measured`),
or as :meth:`Curves.flat` (no prediction: fixed schemes that need none). Its provenance (``source``, and the
``design`` whose distortion it is) travels into the allocation: allocating with one design's curves and
storing with another (the paper's *distortion-model mismatch*) is a provenance, not another allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ratequant.allocation.fitting import DistortionFit
from ratequant.errors import BudgetError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.validation import check_bitset, check_int

SOURCES = ("fit", "measured", "model", "none")


@dataclass(frozen=True, eq=False)
class Curves:
    """Distortion ``values [2, L, H, nb]`` (kind 0 = key) at the widths ``bitset``.

    ``source``: ``"fit"`` (predicted by ``fit``), ``"measured"`` (a measured table), ``"model"`` (an analytical
    error model, e.g. from weight norms) or ``"none"`` (zeros: no prediction); ``design``: the quantizer design
    whose distortion it is (None when unknown); ``label``: a free description of the measurement (e.g.
    ``"fisher"`` or ``"measured KL"``); ``min_bits``: the lowest width an allocation may give, per kind
    ``(keys, values)`` or per component (an integer array ``[2, L, H]``), e.g. the design's informative widths
    (None: any).
    """

    values: np.ndarray
    bitset: tuple[int, ...]
    source: str = "fit"
    design: str | None = None
    fit: DistortionFit | None = None
    label: str = ""
    min_bits: tuple[int, int] | np.ndarray | None = None

    def __post_init__(self) -> None:
        bitset = check_bitset(self.bitset, name="curve widths")
        values = np.array(self.values, dtype=np.float64)
        if values.ndim != 4 or values.shape[0] != 2 or values.shape[3] != len(bitset) or min(values.shape) < 1:
            raise RateQuantError(f"curves must be [2, layers, kv_heads, {len(bitset)}], got {values.shape}")
        if not np.isfinite(values).all():
            raise RateQuantError("curves hold NaN or Inf; re-run the measurement")
        if self.source not in SOURCES:
            raise RateQuantError(f"curve source must be one of {SOURCES}, got {self.source!r}")
        if self.fit is not None and not isinstance(self.fit, DistortionFit):
            raise RateQuantError(f"curves: fit must be a DistortionFit or None, got {type(self.fit).__name__}")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "bitset", bitset)
        if self.min_bits is not None:
            object.__setattr__(self, "min_bits", _check_min_bits(self.min_bits, values.shape[:3]))

    @classmethod
    def from_fit(
        cls,
        fit: DistortionFit,
        bitset: Sequence[int] | None = None,
        *,
        design: str | None = None,
        label: str = "",
        min_bits: tuple[int, int] | np.ndarray | None = None,
    ) -> Curves:
        """The fitted ``alpha * beta^-b`` at ``bitset`` (default: the widths the fit used)."""
        if not isinstance(fit, DistortionFit):
            raise RateQuantError(f"from_fit needs a DistortionFit, got {type(fit).__name__}")
        widths = check_bitset(fit.bitset if bitset is None else bitset)
        return cls(fit.curves(widths), widths, "fit", design, fit, label, min_bits)

    @classmethod
    def measured(
        cls,
        table: np.ndarray,
        bitset: Sequence[int],
        *,
        design: str | None = None,
        label: str = "",
        min_bits: tuple[int, int] | np.ndarray | None = None,
    ) -> Curves:
        """A measured table ``[2, L, H, nb]`` at ``bitset``, used as it is."""
        return cls(table, tuple(bitset), "measured", design, None, label, min_bits)

    @classmethod
    def flat(cls, geometry: Geometry, bitset: Sequence[int]) -> Curves:
        """No prediction (zeros): for schemes that choose no widths (uniform, fixed splits)."""
        widths = check_bitset(bitset)
        return cls(np.zeros((*geometry.shape, len(widths))), widths, "none")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(2, num_layers, num_kv_heads)``."""
        return tuple(self.values.shape[:3])  # type: ignore[return-value]

    @property
    def predicts(self) -> bool:
        return self.source != "none"

    def restrict(
        self, bitset: Sequence[int] | None = None, b_min: int | None = None, b_max: int | None = None
    ) -> Curves:
        """These curves at the widths of ``bitset`` (default: all of them) within ``[b_min, b_max]``.

        A fit predicts at any width; a measured table only at the widths it measured.
        """
        wanted = self.bitset if bitset is None else check_bitset(bitset)
        lo, hi = 1 if b_min is None else b_min, 8 if b_max is None else b_max
        widths = tuple(b for b in wanted if lo <= b <= hi)
        if not widths:
            raise BudgetError(f"no allowed width in {wanted} lies within [b_min={lo}, b_max={hi}]")
        if widths == self.bitset:
            return self
        if self.fit is not None:
            return Curves(
                self.fit.curves(widths), widths, self.source, self.design, self.fit, self.label, self.min_bits
            )
        missing = [b for b in widths if b not in self.bitset]
        if missing and self.source != "none":
            raise RateQuantError(f"the curves were measured at widths {self.bitset}, not at {missing}")
        values = (
            np.zeros((*self.shape, len(widths)))
            if self.source == "none"
            else self.values[..., [self.bitset.index(b) for b in widths]]
        )
        return Curves(values, widths, self.source, self.design, None, self.label, self.min_bits)

    def component_min_bits(self) -> np.ndarray:
        """The lowest width every component may take ``[2, L, H]``: ``min_bits``, else the narrowest of ``bitset``."""
        low = self.bitset[0] if self.min_bits is None else self.min_bits
        if isinstance(low, tuple):
            low = np.asarray(low)[:, None, None]
        return np.broadcast_to(np.asarray(low, dtype=np.int64), self.shape)

    def lowest_widths(self) -> tuple[int, int]:
        """The lowest width any component of each kind may take (keys, values)."""
        low = self.component_min_bits()
        return int(low[0].min()), int(low[1].min())

    def kind_widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The widths of ``bitset`` each kind may take (keys, values): from its lowest informative width up."""
        return tuple(tuple(w for w in self.bitset if w >= b) for b in self.lowest_widths())  # type: ignore[return-value]

    def floors(self) -> np.ndarray:
        """Index into ``bitset`` of every component's lowest allowed width ``[2, L, H]`` (from ``min_bits``)."""
        low = self.component_min_bits()
        if int(low.max()) > self.bitset[-1]:
            kind, layer, head = np.unravel_index(int(low.argmax()), low.shape)
            raise BudgetError(
                f"no allowed width in {self.bitset} is at least {int(low.max())}, the lowest informative width of "
                f"layer {layer} kv-head {head}'s {('keys', 'values')[kind]}"
            )
        return np.searchsorted(np.asarray(self.bitset), low).astype(np.int64)

    def total(self, bits: np.ndarray) -> float:
        """Summed distortion of integer widths ``bits [2, L, H]`` under these curves (any width for a fit)."""
        bits = np.asarray(bits)
        if bits.shape != self.shape:
            raise RateQuantError(f"bits {bits.shape} do not match the curves' components {self.shape}")
        if self.fit is not None:
            return float(self.fit.predict(bits).sum())
        lookup = np.full(9, -1)
        lookup[list(self.bitset)] = np.arange(len(self.bitset))
        if not np.issubdtype(bits.dtype, np.integer) or bits.min() < 1 or bits.max() > 8 or (lookup[bits] < 0).any():
            raise RateQuantError(f"bits must be widths the curves cover: {self.bitset}")
        return float(np.take_along_axis(self.values, lookup[bits][..., None], axis=-1).sum())

    def provenance(self) -> dict:
        """JSON-ready description: source, design, label and the lowest widths allowed (per kind; per component
        as ``floors {"key": [[b] * H] * L, "value": ...}`` where they differ within a kind)."""
        out = {
            "source": self.source,
            "design": self.design,
            "label": self.label,
            "min_bits": None if self.min_bits is None else list(self.lowest_widths()),
        }
        low = self.component_min_bits()
        if self.min_bits is not None and any(int(low[k].min()) != int(low[k].max()) for k in range(2)):
            out["floors"] = {kind: low[k].tolist() for k, kind in enumerate(("key", "value"))}
        return out


def _check_min_bits(min_bits, shape: tuple[int, int, int]) -> tuple[int, int] | np.ndarray:
    """``(key, value)`` widths, or a read-only int array ``[2, L, H]``, each in 1..8."""
    if isinstance(min_bits, np.ndarray) and min_bits.ndim == 3:
        low = np.asarray(min_bits)
        if low.shape != shape or not np.issubdtype(low.dtype, np.integer) or low.min() < 1 or low.max() > 8:
            raise RateQuantError(f"min_bits per component must be integers in 1..8 shaped {shape}, got {low.shape}")
        low = low.astype(np.int64)
        low.setflags(write=False)
        return low
    low = tuple(check_int(b, "min_bits", lo=1, hi=8) for b in min_bits)
    if len(low) != 2:
        raise RateQuantError(f"min_bits must give the lowest width for keys and values, got {min_bits!r}")
    return low


__all__ = ["SOURCES", "Curves"]
