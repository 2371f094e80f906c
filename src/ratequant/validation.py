"""Checks of user-supplied values, in one place: each returns the canonical value or raises one clear error.

Every check takes the ``name`` to put in the message and the ``error`` class to raise (a
:class:`~ratequant.errors.RateQuantError` subclass: plans raise :class:`~ratequant.errors.PlanError`,
budgets :class:`~ratequant.errors.BudgetError`), so a message always names the field that is wrong and the
range that is right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from ratequant.errors import RateQuantError

MIN_BITS = 1
MAX_BITS = 8
MAX_INT = 2**62
"""The largest integer any parameter may take (far below int64 overflow in torch and numpy)."""
MAX_STRING = 4096


def finite_real(v: object) -> bool:
    """True for a finite real number (int or float, not bool); huge ints that overflow a float are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def show_value(v: object) -> str:
    """``v`` for an error message: its repr for scalars (cut at 60 characters), else its type name."""
    text = repr(v) if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


_LINE_BREAKS = re.compile(r"[ \t]*(?:[\r\n\v\f\x85\u2028\u2029][ \t]*)+")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def inert(text: object) -> str:
    """``text`` safe to print on one terminal line: line breaks collapse to one space, and every other control
    character (escape sequences, C1 controls, bidirectional overrides, a BOM) and lone surrogate (a byte of a
    file name that is not UTF-8) is shown as ``\\xNN`` or ``\\uNNNN``. Use it on everything read from a file
    or given as a name before printing it."""
    text = _LINE_BREAKS.sub(" ", str(text))
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def check_int(v: object, name: str, *, lo: int | None = None, hi: int | None = MAX_INT, error=RateQuantError) -> int:
    """``v`` as an ``int`` in ``[lo, hi]`` (``hi`` defaults to :data:`MAX_INT`; bools are refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise error(f"{name} must be an integer, got {show_value(v)}")
    v = int(v)
    if hi is not None and v > hi:
        top = "2**62" if hi == MAX_INT else str(hi)
        bounds = f"from {lo} to {top}" if lo is not None else f"at most {top}"
        raise error(f"{name} must be {bounds}, got {show_value(v)}")
    if lo is not None and v < lo:
        if hi is None or hi == MAX_INT:
            bounds = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
        else:
            bounds = f"from {lo} to {hi}"
        raise error(f"{name} must be {bounds}, got {show_value(v)}")
    return v


def check_float(
    v: object,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    error=RateQuantError,
) -> float:
    """``v`` as a finite ``float`` with ``lo <= v`` (``lo < v`` when ``lo_open``) and ``v <= hi``."""
    if not finite_real(v):
        raise error(f"{name} must be a finite number, got {show_value(v)}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise error(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise error(f"{name} must be <= {hi:g}, got {v:g}")
    return v


def check_str(v: object, name: str, *, empty: bool = False, max_len: int = MAX_STRING, error=RateQuantError) -> str:
    """``v`` when it is a string of at most ``max_len`` characters (non-empty unless ``empty``)."""
    if not isinstance(v, str) or (not empty and not v) or len(v) > max_len:
        raise error(
            f"{name} must be a {'' if empty else 'non-empty '}string of at most {max_len} characters, "
            f"got {show_value(v)}"
        )
    return v


def check_object(v: object, name: str, *, error=RateQuantError) -> dict:
    """``v`` when it is a JSON object (a dict with string keys)."""
    if not isinstance(v, dict):
        raise error(f"{name} must be an object, got {show_value(v)}")
    for k in v:
        if not isinstance(k, str):
            raise error(f"{name} has a non-string key {show_value(k)}")
    return v


def check_keys(
    d: dict, name: str, required: Sequence[str], optional: Sequence[str] = (), *, error=RateQuantError
) -> None:
    """Refuse a missing required field or an unknown one."""
    missing = [k for k in required if k not in d]
    if missing:
        raise error(f"{name} is missing: {', '.join(missing)}")
    unknown = [k for k in d if k not in required and k not in optional]
    if unknown:
        raise error(f"{name} has unknown field(s): {', '.join(show_value(k) for k in sorted(unknown))}")


def check_json_value(
    v: object, name: str, *, max_depth: int = 4, max_items: int = 4096, error=RateQuantError
) -> object:
    """A bounded JSON value (nested at most ``max_depth`` deep, at most ``max_items`` values): a canonical copy
    with tuples as lists, integers within :data:`MAX_INT`, finite floats."""
    budget = [max_items]

    def walk(x: object, where: str, depth: int) -> object:
        budget[0] -= 1
        if budget[0] < 0:
            raise error(f"{name} is too large")
        if depth > max_depth:
            raise error(f"{name} is nested more than {max_depth} levels deep")
        if x is None or isinstance(x, bool):
            return x
        if isinstance(x, str):
            return check_str(x, where, empty=True, error=error)
        if isinstance(x, (int, np.integer)):
            if abs(int(x)) > MAX_INT:
                raise error(f"{where} holds an integer too large to store (over 2**62)")
            return int(x)
        if isinstance(x, (float, np.floating)):
            return check_float(x, where, error=error)
        if isinstance(x, (list, tuple)):
            return [walk(y, f"{where}[{i}]", depth + 1) for i, y in enumerate(x)]
        if isinstance(x, dict):
            check_object(x, where, error=error)
            return {k: walk(y, f"{where}.{k}", depth + 1) for k, y in x.items()}
        raise error(f"{where} must be JSON data, got {type(x).__name__}")

    return walk(v, name, 0)


def check_choice(v: object, name: str, choices: Sequence[str], *, error=RateQuantError) -> str:
    """``v`` when it is one of ``choices``."""
    if not isinstance(v, str) or v not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, got {show_value(v)}")
    return v


def check_bitset(bitset: Sequence[int], *, name: str = "bitset", min_len: int = 1) -> tuple[int, ...]:
    """Validate a set of bit widths: strictly increasing integers in 1..8. Returns it as a tuple."""
    try:
        values = tuple(bitset)
    except TypeError:
        raise RateQuantError(f"{name} must be a sequence of integers 1..8, got {bitset!r}") from None
    for b in values:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not MIN_BITS <= int(b) <= MAX_BITS:
            raise RateQuantError(f"{name} must hold integers from 1 to 8, got {b!r} in {values!r}")
    values = tuple(int(b) for b in values)
    if any(b2 <= b1 for b1, b2 in zip(values, values[1:])):
        raise RateQuantError(f"{name} must be strictly increasing without repeats, got {values!r}")
    if len(values) < min_len:
        raise RateQuantError(f"{name} needs at least {min_len} bit width(s), got {values!r}")
    return values


def check_bits_array(bits, shape: tuple[int, int] | None = None, *, error=RateQuantError) -> np.ndarray:
    """Validate widths ``[2, layers, kv_heads]`` (kind 0 = key) of integers in 1..8; returns a read-only int64 copy.

    ``shape`` ``(layers, kv_heads)`` is the model's; a mismatch raises ``error`` asking for a plan of this model.
    """
    arr = np.asarray(bits)
    if arr.ndim != 3 or arr.shape[0] != 2 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise RateQuantError(
            f"bits must have shape [2, num_layers, num_kv_heads] (kind 0 = key, 1 = value), got {arr.shape}"
        )
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise RateQuantError("bits must hold integer bit widths")
    arr = arr.astype(np.int64)  # a copy
    if arr.min() < MIN_BITS or arr.max() > MAX_BITS:
        raise RateQuantError(f"bit widths must be from {MIN_BITS} to {MAX_BITS}, got {arr.min()}..{arr.max()}")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise error(
            f"bits have shape {arr.shape} but the model has {shape[0]} layers with {shape[1]} kv-heads; "
            "use a plan made for this model"
        )
    arr.setflags(write=False)
    return arr


__all__ = [
    "MAX_BITS",
    "MAX_INT",
    "MIN_BITS",
    "check_bits_array",
    "check_bitset",
    "check_choice",
    "check_float",
    "check_int",
    "check_json_value",
    "check_keys",
    "check_object",
    "check_str",
    "finite_real",
    "inert",
    "show_value",
]
