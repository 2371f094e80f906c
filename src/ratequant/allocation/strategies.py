"""Grouping strategies (which components share a width) and the one entry point :func:`allocate`.

A strategy partitions the ``2 * L * H`` components into groups; every group gets one width, and the exact
solver (:func:`ratequant.allocation.solvers.solve_groups`) picks the widths that minimise the summed
distortion of the curves under the budget. RateQuant is the finest grouping (every component alone); the
baselines are coarser ones: one width for everything, one per kind (a key/value split such as K4V2, "Quantize
What Counts"), one per layer (KVTuner-style), one per layer and kind. Adding a strategy is one class with a
``groups`` method and ``@STRATEGIES.register``; the shared tests pick it up from the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ratequant.allocation.budget import EXACT_TOL, Budget
from ratequant.allocation.cost import CostModel
from ratequant.allocation.curves import Curves
from ratequant.allocation.solvers import allocate_closed_form, solve_groups
from ratequant.errors import BudgetError, RateQuantError
from ratequant.registry import Registry
from ratequant.validation import check_bitset, check_int

STRATEGIES: Registry[type[Strategy]] = Registry("allocation strategy")


@dataclass(frozen=True, eq=False)
class Allocation:
    """Integer widths ``bits [2, L, H]`` with what they cost and what the curves predict they lose.

    ``avg_bits`` is the mean code width; ``bytes_per_token`` the true storage from the cost model (None
    without one); ``predicted_distortion`` the summed distortion under the curves used to allocate (None
    when the curves predict nothing); ``method`` the strategy's name; ``details`` solver, budget and the
    curves' provenance (JSON-friendly except arrays).
    """

    bits: np.ndarray
    avg_bits: float
    bytes_per_token: float | None
    predicted_distortion: float | None
    method: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bits = np.asarray(self.bits)
        if bits.ndim != 3 or bits.shape[0] != 2 or not np.issubdtype(bits.dtype, np.integer):
            raise RateQuantError(f"allocation: bits must be an integer array [2, L, H], got {bits.dtype} {bits.shape}")
        if bits.min() < 1 or bits.max() > 8:
            raise RateQuantError("allocation: bits must lie in 1..8")
        bits = bits.astype(np.int64)
        bits.setflags(write=False)
        object.__setattr__(self, "bits", bits)
        if abs(float(self.avg_bits) - float(bits.mean())) > 1e-9:
            raise RateQuantError(f"allocation: avg_bits {self.avg_bits} != mean of bits {bits.mean()}")
        object.__setattr__(self, "avg_bits", float(self.avg_bits))
        if not isinstance(self.method, str) or not self.method:
            raise RateQuantError("allocation: method must be a non-empty string")

    @property
    def key_bits(self) -> np.ndarray:
        return self.bits[0]

    @property
    def value_bits(self) -> np.ndarray:
        return self.bits[1]


@dataclass(frozen=True)
class AllocationOptions:
    """Restrictions shared by every strategy: the allowed widths (default: those of the curves), the lowest
    and highest width, and the cost model that byte budgets need (and that reports true bytes)."""

    bitset: tuple[int, ...] | None = None
    b_min: int | None = None
    b_max: int | None = None
    cost_model: CostModel | None = None

    def __post_init__(self) -> None:
        if self.bitset is not None:
            object.__setattr__(self, "bitset", check_bitset(self.bitset))
        for name in ("b_min", "b_max"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, lo=1, hi=8)
        if self.cost_model is not None and not isinstance(self.cost_model, CostModel):
            raise RateQuantError(f"cost_model must be a CostModel, got {type(self.cost_model).__name__}")


@dataclass(frozen=True)
class Strategy(ABC):
    """Which components share a width. Subclasses set ``name`` and ``summary`` and implement :meth:`groups`;
    :meth:`allocate` (exact, grouped) serves them all unless a strategy needs more."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def groups(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Group ids ``[2, L, H]`` (integers ``0..M-1``, every id used) for components of ``shape``."""

    def allocate(self, curves: Curves, budget: Budget, options: AllocationOptions) -> Allocation:
        """The exact optimum of ``curves`` with one width per group, meeting ``budget``."""
        allowed = curves.restrict(options.bitset, options.b_min, options.b_max)
        groups = self.groups(curves.shape)
        bits, details = solve_groups(
            groups,
            allowed.values,
            allowed.bitset,
            budget,
            options.cost_model,
            f"{self.name} allocation",
            allowed.floors(),
        )
        return self.finish(bits.reshape(curves.shape), allowed, budget, options, details)

    def finish(
        self, bits: np.ndarray, curves: Curves, budget: Budget, options: AllocationOptions, details: dict
    ) -> Allocation:
        """The :class:`Allocation` of ``bits`` with its cost and predicted distortion under ``curves``."""
        details = {"bitset": list(curves.bitset), "budget": budget.to_dict(), **details, "curves": curves.provenance()}
        if curves.fit is not None:
            details["beta_key"], details["beta_value"] = curves.fit.beta_key, curves.fit.beta_value
        cost = options.cost_model
        return Allocation(
            bits=bits,
            avg_bits=float(np.mean(bits)),
            bytes_per_token=None if cost is None else cost.bytes_per_token(bits),
            predicted_distortion=curves.total(bits) if curves.predicts else None,
            method=self.name,
            details=details,
        )


@STRATEGIES.register
@dataclass(frozen=True)
class PerComponent(Strategy):
    """RateQuant: a width per component (kind, layer, kv head), the exact integer optimum of the curves.

    With fitted curves, ``details["continuous_bits"]`` holds the reverse-waterfilling closed form at the same
    code-bit total (within one bit of the integer answer on contiguous widths; docs/method.md).
    """

    name = "ratequant"
    summary = "a width per component (RateQuant)"

    def groups(self, shape):
        return np.arange(int(np.prod(shape))).reshape(shape)

    def allocate(self, curves, budget, options):
        alloc = super().allocate(curves, budget, options)
        if curves.fit is not None:
            allowed = curves.restrict(options.bitset, options.b_min, options.b_max)
            low = np.asarray(allowed.bitset)[allowed.floors()].reshape(-1)
            fit = curves.fit
            alloc.details["continuous_bits"] = allocate_closed_form(
                fit.alpha.reshape(-1), fit.beta.reshape(-1), 1.0, float(alloc.bits.sum()), low, allowed.bitset[-1]
            ).reshape(curves.shape)
        return alloc


@STRATEGIES.register
@dataclass(frozen=True)
class Uniform(Strategy):
    """One width for every component (the usual KV quantizer). An average-bits budget must be a width."""

    name = "uniform"
    summary = "one width for everything"

    def groups(self, shape):
        return np.zeros(shape, dtype=np.int64)


@STRATEGIES.register
@dataclass(frozen=True)
class PerKind(Strategy):
    """One width for all keys and one for all values (e.g. K4V2, "Quantize What Counts", arXiv:2502.15075).

    With ``key_bits`` and ``value_bits`` the split is fixed and the budget must hold for it (exactly for
    average bits, as an upper bound for bytes); without them the best split of the curves is chosen.
    """

    name = "kv-split"
    summary = "one width for keys and one for values"
    key_bits: int | None = None
    value_bits: int | None = None

    def __post_init__(self) -> None:
        if (self.key_bits is None) != (self.value_bits is None):
            raise RateQuantError("kv-split: pass both key_bits and value_bits, or neither to pick the best split")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), f"kv-split {name}", lo=1, hi=8)

    @property
    def label(self) -> str | None:
        return None if self.key_bits is None else f"K{self.key_bits}V{self.value_bits}"

    def groups(self, shape):
        return np.broadcast_to(np.arange(2)[:, None, None], shape).copy()

    def allocate(self, curves, budget, options):
        if self.key_bits is None:
            alloc = super().allocate(curves, budget, options)
            alloc.details["split"] = f"K{alloc.bits[0].flat[0]}V{alloc.bits[1].flat[0]}"
            return alloc
        widths = tuple(sorted({self.key_bits, self.value_bits}))
        allowed = curves.restrict(
            options.bitset or (widths if curves.fit is not None or not curves.predicts else None),
            options.b_min,
            options.b_max,
        )
        if any(b not in allowed.bitset for b in widths):
            raise RateQuantError(f"kv-split: widths {self.label} are not all in the allowed set {allowed.bitset}")
        bits = np.empty(curves.shape, dtype=np.int64)
        bits[0], bits[1] = self.key_bits, self.value_bits
        alloc = self.finish(bits, allowed, budget, options, {"solver": "fixed", "split": self.label})
        if budget.kind == "avg_bits" and abs(alloc.avg_bits - budget.value) > EXACT_TOL * budget.value:
            raise BudgetError(f"{self.label} averages {alloc.avg_bits:g} bits, not the budget {budget.value:g}")
        if budget.kind == "bytes_per_token":
            if alloc.bytes_per_token is None:
                raise BudgetError("kv-split: a bytes-per-token budget needs a cost model")
            if alloc.bytes_per_token > budget.value * (1 + EXACT_TOL):
                raise BudgetError(
                    f"{self.label} takes {alloc.bytes_per_token:g} bytes per token, over the budget of {budget.value:g}"
                )
        return alloc


@STRATEGIES.register
@dataclass(frozen=True)
class PerLayer(Strategy):
    """One width per layer, shared by all its heads and both kinds (KVTuner-style, arXiv:2502.04420)."""

    name = "layerwise"
    summary = "a width per layer"

    def groups(self, shape):
        return np.broadcast_to(np.arange(shape[1])[None, :, None], shape).copy()


@STRATEGIES.register
@dataclass(frozen=True)
class PerLayerKind(Strategy):
    """One width per layer for its keys and one for its values (what engines with per-layer K/V types take)."""

    name = "layer-kind"
    summary = "a width per layer and kind"

    def groups(self, shape):
        return np.arange(shape[0] * shape[1])[:, None].repeat(shape[2], axis=1).reshape(shape)


def get_strategy(name: str, **params) -> Strategy:
    """A strategy by registry name with its parameters (e.g. ``get_strategy("kv-split", key_bits=4, value_bits=2)``)."""
    cls = STRATEGIES.get(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise RateQuantError(f"allocation strategy {name!r}: {exc}") from None


def allocate(
    curves: Curves, budget: Budget, strategy: str | Strategy = "ratequant", options: AllocationOptions | None = None
) -> Allocation:
    """Widths for every component of ``curves`` under ``budget``, grouped by ``strategy`` (a name or an instance).

    ``options`` restricts the widths and supplies the cost model (needed for byte budgets; it also makes
    :attr:`Allocation.bytes_per_token` available). Raises :class:`BudgetError` when no allocation meets the
    budget, naming the reachable range.
    """
    if not isinstance(curves, Curves):
        raise RateQuantError(
            f"allocate needs Curves (Curves.from_fit, Curves.measured, Curves.flat), got {type(curves).__name__}"
        )
    if not isinstance(budget, Budget):
        raise BudgetError(f"budget must be a Budget, got {type(budget).__name__}")
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    if not isinstance(strategy, Strategy):
        raise RateQuantError(f"strategy must be a Strategy or its name, got {type(strategy).__name__}")
    options = AllocationOptions() if options is None else options
    return strategy.allocate(curves, budget, options)


__all__ = [
    "STRATEGIES",
    "Allocation",
    "AllocationOptions",
    "PerComponent",
    "PerKind",
    "PerLayer",
    "PerLayerKind",
    "Strategy",
    "Uniform",
    "allocate",
    "get_strategy",
]
