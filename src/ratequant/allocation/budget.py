"""Storage budgets: average code bits per element (as the paper) or true bytes per token of context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ratequant.errors import BudgetError
from ratequant.validation import check_bitset, finite_real

BUDGET_KINDS = ("avg_bits", "bytes_per_token")
EXACT_TOL = 1e-9
"""A budget within this (relative) of a reachable value counts as that value."""


@dataclass(frozen=True)
class Budget:
    """A storage budget.

    ``kind == "avg_bits"``: mean code bits per element over all components (metadata excluded), met
    exactly. ``kind == "bytes_per_token"``: true bytes per token of the whole KV cache (all layers, heads,
    keys and values; codes, scales, zeros and the full-precision residual window amortised over
    ``context_tokens``), met as an upper bound with the largest reachable allocation under it.
    """

    kind: str
    value: float
    context_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        v = self.value
        if not finite_real(v):
            raise BudgetError(f"budget value must be a finite number, got {v!r}")
        if v <= 0:
            raise BudgetError(f"budget value must be positive, got {v!r}")
        object.__setattr__(self, "value", float(v))
        c = self.context_tokens
        if self.kind == "bytes_per_token":
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
                raise BudgetError(
                    "a bytes-per-token budget needs context_tokens (a positive integer: the context length "
                    f"over which the residual window is amortised), got {c!r}"
                )
            object.__setattr__(self, "context_tokens", int(c))
        elif c is not None:
            raise BudgetError("context_tokens only applies to bytes_per_token budgets; leave it unset")

    @classmethod
    def avg_bits(cls, value: float) -> Budget:
        return cls("avg_bits", value)

    @classmethod
    def bytes_per_token(cls, value: float, context_tokens: int) -> Budget:
        return cls("bytes_per_token", value, context_tokens)

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "value": self.value}
        if self.context_tokens is not None:
            d["context_tokens"] = self.context_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        if not isinstance(d, dict) or "kind" not in d or "value" not in d:
            raise BudgetError(f"budget must be an object with 'kind' and 'value', got {d!r}")
        unknown = set(d) - {"kind", "value", "context_tokens"}
        if unknown:
            raise BudgetError(f"budget has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(d["kind"], d["value"], d.get("context_tokens"))

    def describe(self) -> str:
        if self.kind == "avg_bits":
            return f"{self.value:g} average code bits"
        return f"{self.value:g} bytes per token at {self.context_tokens} tokens of context"


def check_reachable(
    budget: Budget, bitset: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), b_min: int | None = None, b_max: int | None = None
) -> tuple[int, ...]:
    """Refuse, before any measurement, a budget that no allocation with these widths can reach.

    Returns the usable widths (``bitset`` within ``[b_min, b_max]``). An average-bits budget must lie in
    ``[min width, max width]``; whether the exact average is reachable with the model's number of
    components, and byte budgets (which need the quantizer's cost model), are decided by the allocators.
    Raises :class:`BudgetError` naming the reachable range.
    """
    if not isinstance(budget, Budget):
        raise BudgetError(f"budget must be a Budget, got {type(budget).__name__}")
    allowed = check_bitset(bitset)
    lo = 1 if b_min is None else b_min
    hi = 8 if b_max is None else b_max
    usable = tuple(b for b in allowed if lo <= b <= hi)
    if not usable:
        raise BudgetError(f"no allowed width in {allowed} lies within [b_min={lo}, b_max={hi}]")
    if budget.kind == "avg_bits":
        low, high = usable[0], usable[-1]
        if not low * (1 - EXACT_TOL) <= budget.value <= high * (1 + EXACT_TOL):
            raise BudgetError(
                f"an average of {budget.value:g} bits cannot be met with widths {usable}: reachable averages lie "
                f"in [{low}, {high}]"
            )
    return usable


def fmt(x: float) -> str:
    """A budget figure in messages: six significant digits."""
    return f"{x:.6g}"


__all__ = ["BUDGET_KINDS", "EXACT_TOL", "Budget", "check_reachable", "fmt"]
