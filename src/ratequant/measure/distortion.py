"""Measure each component's distortion ``d_i(b)`` from calibration statistics.

For every component (kind, layer, kv-head) and every bit width ``b`` of the bit set, the distortion caused
by quantizing *only that component* at ``b`` bits with a given quantizer design (RateQuant's distortion
model, arXiv:2605.06675). Three metrics, all averaged per real calibration token so tables from different
calibration sizes are comparable:

``"mse"``
    plain squared error of the tensor, per element: ``sum_{t,d} (X - Q_b(X))^2 / (N * D)``. Blind to how
    much the model cares about a head; the baseline.
``"fisher"``
    gradient-weighted (diagonal Fisher) error: ``sum_{t,d} (g * (X - Q_b(X)))^2 / N`` with ``g = dL/dX`` the
    gradient of the summed next-token loss (see :class:`~ratequant.measure.capture.CalibrationStats`). A
    second-order estimate of the loss increase, as in KVQuant (Hooper et al., 2024) and the Fisher-based
    sensitivity of "Quantize What Counts".
``"attention"``
    squared error of the head group's attention output when only that kv-head's keys (or values) are
    quantized, per element, on at most ``max_queries`` evenly spread query positions per sequence (causal
    and sliding-window masks respected). Query heads of group ``h`` only attend to kv-head ``h``, so all kv
    heads of a layer are quantized at once and each group's error is still that of its own head alone.

One quantizer call per (kind, bit) covers every layer and head at once (layers are stacked along the batch
axis; every design quantizes each (sequence, head) block independently). No loops over tokens or heads.

One module of this size because the three metrics share the per-component loop, the table and its floors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS
from ratequant.measure.capture import CalibrationStats
from ratequant.quantizers.base import Quantizer, from_config
from ratequant.registry import Registry
from ratequant.spec import MAX_SINK_TOKENS
from ratequant.validation import check_bitset, check_int


@dataclass(frozen=True)
class Metric:
    """A distortion metric: its name, what the calibration capture must record for it, and what it measures."""

    name: str
    summary: str
    needs_gradients: bool = False
    needs_queries: bool = False


METRICS: Registry[Metric] = Registry("distortion metric")
METRICS.register(Metric("mse", "squared error of the tensor, per element"))
METRICS.register(Metric("fisher", "gradient-weighted (diagonal Fisher) squared error", needs_gradients=True))
METRICS.register(Metric("attention", "squared error of the head group's attention output", needs_queries=True))
DEFAULT_METRIC = "fisher"
"""The metric whose ranking of (component, bits) best predicts measured model damage.

``benchmarks/metric_validation.py`` on SmolLM2-135M, KIVI, 40 random (component, bits <= 4) pairs, true
damage = KL from full precision on held-out text when only that component is quantized: Spearman 0.97
(fisher) vs 0.88 (mse) and 0.88 (attention); among components at one fixed width 0.68 vs -0.08 and 0.38.
``tests/measure/test_distortion.py`` has a small version that fails if mse were as good."""

DEFAULT_BITSET = tuple(range(1, 9))
DEFAULT_MAX_QUERIES = 256
CHUNK_ELEMENTS = 1 << 21
"""Values per quantizer call when stacking layers (8 MiB of float32); see :func:`_tensor_errors`."""
TABLE_FORMAT_VERSION = 1


def _frozen_table(values, shape: tuple, what: str) -> np.ndarray:
    """A read-only float64 copy of ``values`` with ``shape`` (None: any size), finite and non-negative."""
    arr = np.array(values, dtype=np.float64)
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        expected = ", ".join("n" if want is None else str(want) for want in shape)
        raise RateQuantError(f"{what} must be [{expected}], got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise RateQuantError(f"{what} must be finite and non-negative")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class DistortionTable:
    """Measured distortion ``values[kind, layer, kv_head, j]`` (float64) of each component at ``bitset[j]``.

    ``quantizer`` is the design's config (:meth:`Quantizer.to_config`), ``metric`` one of :data:`METRICS`,
    ``seconds`` the measurement time, ``token_count`` the real calibration tokens it averages over. The same
    pass records the evidence for :meth:`informative_widths`: ``error [2, L, H, nb]``, the plain squared
    reconstruction error per element, and ``spread [2, L, H]``, the squared deviation of the tensor from its
    per-channel mean over tokens, per element (what storing only the mean would cost).
    """

    values: np.ndarray
    bitset: tuple[int, ...]
    metric: str
    quantizer: dict
    seconds: float = 0.0
    token_count: int = 0
    error: np.ndarray | None = None
    spread: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bitset", check_bitset(self.bitset))
        METRICS.get(self.metric)
        values = _frozen_table(self.values, (2, None, None, len(self.bitset)), "distortion values")
        object.__setattr__(self, "values", values)
        if self.error is not None:
            object.__setattr__(self, "error", _frozen_table(self.error, values.shape, "reconstruction error"))
        if self.spread is not None:
            object.__setattr__(self, "spread", _frozen_table(self.spread, values.shape[:3], "spread"))
        if not isinstance(self.quantizer, dict) or not isinstance(self.quantizer.get("name"), str):
            raise RateQuantError(
                f"quantizer must be a config dict {{'name': ..., 'params': ...}}, got {self.quantizer!r}"
            )

    def informative_widths(self, per: str = "kind") -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The widths of the bit set that carry information about (keys, values): those at which the design
        reconstructs the calibration tensor better than storing each channel's mean would
        (``sum (X - Q_b(X))^2 < sum (X - mean_tokens(X))^2``, summed over the components of a kind).

        A width that fails carries no information (1-bit min-max keeps only each group's extremes and does
        worse than the mean); its damage also departs from the exponential model, so an allocator must not
        trade bits down to it. Error falls with the width, so the lowest passing width and everything above it
        are kept (the widest width always). ``per="pooled"`` requires a width to pass for keys and values alike.
        """
        if self.error is None or self.spread is None:
            raise RateQuantError("this distortion table holds no reconstruction error; measure it again")
        if per not in ("kind", "pooled"):
            raise RateQuantError(f"per must be 'kind' or 'pooled', got {per!r}")
        passing = self.error.sum(axis=(1, 2)) < self.spread.sum(axis=(1, 2))[:, None]  # [2, nb]
        if per == "pooled":
            passing = np.broadcast_to(passing.all(axis=0), passing.shape)
        out = []
        for k in range(2):
            first = next((j for j in range(len(self.bitset)) if passing[k, j]), len(self.bitset) - 1)
            out.append(self.bitset[first:])
        return out[0], out[1]

    def component_floors(self) -> np.ndarray:
        """The lowest informative width of every component ``[2, L, H]`` (int): the narrowest width from which
        on the design reconstructs that component's calibration tensor better than storing each channel's mean
        (``sum (X - Q_b(X))^2 < sum (X - mean_tokens(X))^2``) at that width and every wider one.

        The per-component form of :meth:`informative_widths`: one outlier head (a Qwen2 layer's key bias) no
        longer decides for every head of its kind; it simply starts higher. A component that passes at no width
        starts at the widest.
        """
        if self.error is None or self.spread is None:
            raise RateQuantError("this distortion table holds no reconstruction error; measure it again")
        passing = self.error < self.spread[..., None]  # [2, L, H, nb]
        # the lowest index from which every wider width passes too (noise can make one narrow width pass alone)
        from_here = np.flip(np.logical_and.accumulate(np.flip(passing, -1), axis=-1), -1)
        first = np.where(from_here.any(-1), from_here.argmax(-1), len(self.bitset) - 1)
        return np.asarray(self.bitset, dtype=np.int64)[first]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(2, num_layers, num_kv_heads)``."""
        return tuple(self.values.shape[:3])

    def at(self, bits: int) -> np.ndarray:
        """``[2, L, H]`` distortions at one bit width of the bit set."""
        if bits not in self.bitset:
            raise RateQuantError(f"{bits} bits is not in the measured bit set {self.bitset}")
        return self.values[..., self.bitset.index(bits)]

    def to_dict(self) -> dict:
        return {
            "format_version": TABLE_FORMAT_VERSION,
            "metric": self.metric,
            "bitset": list(self.bitset),
            "quantizer": self.quantizer,
            "seconds": self.seconds,
            "token_count": self.token_count,
            "values": self.values.tolist(),
            **({} if self.error is None else {"error": self.error.tolist()}),
            **({} if self.spread is None else {"spread": self.spread.tolist()}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> DistortionTable:
        if not isinstance(data, dict) or data.get("format_version") != TABLE_FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise RateQuantError(
                f"distortion table format_version {version!r} is not supported (expected {TABLE_FORMAT_VERSION})"
            )
        try:
            return cls(
                values=np.asarray(data["values"], dtype=np.float64),
                bitset=tuple(data["bitset"]),
                metric=data["metric"],
                quantizer=data["quantizer"],
                seconds=float(data.get("seconds", 0.0)),
                token_count=int(data.get("token_count", 0)),
                error=None if data.get("error") is None else np.asarray(data["error"], dtype=np.float64),
                spread=None if data.get("spread") is None else np.asarray(data["spread"], dtype=np.float64),
            )
        except KeyError as exc:
            raise RateQuantError(f"distortion table is missing the field {exc.args[0]!r}") from None


def measure_distortion(
    stats: CalibrationStats,
    quantizer: Quantizer,
    bitset: Sequence[int] = DEFAULT_BITSET,
    metric: str = DEFAULT_METRIC,
    *,
    max_queries: int = DEFAULT_MAX_QUERIES,
    chunk_elements: int | None = None,
    sink_tokens: int = 0,
) -> DistortionTable:
    """Distortion of every component at every width of ``bitset`` under ``quantizer``; see the module doc.

    ``stats`` must hold gradients for ``"fisher"`` and queries for ``"attention"``. With ``sink_tokens`` the
    first tokens of every sequence stay unquantized, as the cache keeps them (``mse``/``fisher``; token groups
    start after them). Returns a :class:`DistortionTable` with ``values`` ``[2, L, H, len(bitset)]``.
    """
    return measure_distortions(
        stats,
        quantizer,
        bitset,
        (metric,),
        max_queries=max_queries,
        chunk_elements=chunk_elements,
        sink_tokens=sink_tokens,
    )[metric]


def measure_distortions(
    stats: CalibrationStats,
    quantizer: Quantizer,
    bitset: Sequence[int] = DEFAULT_BITSET,
    metrics: Sequence[str] = METRICS,
    *,
    max_queries: int = DEFAULT_MAX_QUERIES,
    chunk_elements: int | None = None,
    sink_tokens: int = 0,
) -> dict[str, DistortionTable]:
    """Several metrics at once, sharing each quantizer call: ``{metric: DistortionTable}``."""
    if not isinstance(stats, CalibrationStats):
        raise RateQuantError(
            f"expected CalibrationStats (from ratequant.measure.capture.capture), got {type(stats).__name__}"
        )
    if not isinstance(quantizer, Quantizer):
        raise RateQuantError(
            f"expected a Quantizer (ratequant.quantizers.get_quantizer(...)), got {type(quantizer).__name__}"
        )
    bitset = check_bitset(bitset)
    metrics = tuple(dict.fromkeys(metrics))
    if not metrics:
        raise RateQuantError(f"no distortion metric given; choose from: {', '.join(METRICS)}")
    for name in metrics:
        metric = METRICS.get(name)
        if metric.needs_gradients and not stats.has_gradients:
            raise RateQuantError(f"the {name!r} metric needs gradients: capture(..., gradients=True)")
        if metric.needs_queries and stats.queries is None:
            raise RateQuantError(f"the {name!r} metric needs queries: capture(..., queries=True)")
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
        raise RateQuantError(f"max_queries must be a positive integer, got {max_queries!r}")
    config = quantizer.to_config()
    from_config(config)  # refuse designs that cannot be rebuilt from their config (plans must reload them)

    L, B, H, T, D = stats.keys.shape
    n_tokens = stats.token_count
    mask = stats.attention_mask
    keep = None if bool(mask.all()) else mask[None, :, None, :, None].to(torch.float32)
    out = {}
    seconds = dict.fromkeys(metrics, 0.0)
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise RateQuantError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")
    with torch.no_grad():
        if "attention" in metrics:
            t0 = time.perf_counter()
            out["attention"] = _AttentionProbe(stats, max_queries).measure(quantizer, bitset)
            seconds["attention"] = time.perf_counter() - t0
        # the tensor pass always runs: it measures mse and the informative-width evidence (and fisher)
        t0 = time.perf_counter()
        sinks = check_int(sink_tokens, "sink tokens", lo=0, hi=MAX_SINK_TOKENS)
        tensor = _tensor_errors(stats, quantizer, bitset, "fisher" in metrics, keep, chunk_elements, sinks)
        elapsed = time.perf_counter() - t0
        for m in ("mse", "fisher"):
            if m in metrics:
                out[m], seconds[m] = tensor[m], elapsed
    return {
        m: DistortionTable(
            values=out[m],
            bitset=bitset,
            metric=m,
            quantizer=config,
            seconds=seconds[m],
            token_count=n_tokens,
            error=tensor["mse"],
            spread=tensor["spread"],
        )
        for m in metrics
    }


def _tensor_errors(
    stats: CalibrationStats,
    quantizer: Quantizer,
    bitset: tuple[int, ...],
    fisher: bool,
    keep: torch.Tensor | None,
    chunk_elements: int,
    sink_tokens: int = 0,
) -> dict[str, np.ndarray]:
    """``mse`` (and ``fisher``) tables ``[2, L, H, nb]`` and the ``spread [2, L, H]`` of every component, per
    element; one quantizer call per (kind, layer chunk, bit).

    Layers are stacked along the batch axis in chunks of about ``chunk_elements`` values: large enough to
    amortise per-call overhead, small enough that temporaries are reused by the allocator instead of
    being mapped fresh from the OS on every call (which costs more than the arithmetic on small machines).
    """
    L, B, H, T, D = stats.keys.shape
    s = min(sink_tokens, T - 1)  # the tokens [s, T) are quantized, as the cache stores them after its sinks
    n_tokens = stats.token_count
    per_layer = B * H * (T - s) * D
    step = max(1, min(L, chunk_elements // per_layer))
    out = {m: np.zeros((2, L, H, len(bitset))) for m in ("mse", "fisher")}
    out["spread"] = np.zeros((2, L, H))
    weights = stats.attention_mask[None, :, None, s:, None].to(torch.float32)  # [1, B, 1, T - s, 1]
    tokens_per_sequence = weights.sum(dim=3, keepdim=True).clamp_(min=1)
    if keep is not None:
        keep = keep[..., s:, :]
    for k, kind in enumerate(KINDS):
        x_all, g_all = stats.tensor(kind)[..., s:, :], stats.grads(kind)
        g_all = None if g_all is None else g_all[..., s:, :]
        T = x_all.shape[3]
        for lo in range(0, L, step):
            hi = min(L, lo + step)
            x5 = x_all[lo:hi]
            mean = (x5 * weights).sum(dim=3, keepdim=True) / tokens_per_sequence
            spread = ((x5 - mean).square_() * weights).sum(dim=(1, 3, 4))
            out["spread"][k, lo:hi] = (spread / (n_tokens * D)).double().cpu().numpy()
            x = x5.reshape((hi - lo) * B, H, T, D)
            weight = g_all[lo:hi].square() if fisher else None  # padding holds zero gradients
            for j, bits in enumerate(bitset):
                xq = quantizer.fake_quantize(x, bits, kind)
                if xq.shape != x.shape:
                    raise RateQuantError(
                        f"{quantizer.name}.fake_quantize changed the shape {tuple(x.shape)} -> {tuple(xq.shape)}"
                    )
                if xq.dtype != torch.float32 or xq.data_ptr() == x.data_ptr():  # never touch the statistics
                    xq = xq.to(torch.float32, copy=True)
                err = xq.view(hi - lo, B, H, T, D).sub_(x5)  # Q_b(X) - X, in place
                if keep is not None:
                    err.mul_(keep)
                err.square_()
                out["mse"][k, lo:hi, :, j] = (err.sum(dim=(1, 3, 4)) / (n_tokens * D)).double().cpu().numpy()
                if fisher:
                    err.mul_(weight)
                    out["fisher"][k, lo:hi, :, j] = (err.sum(dim=(1, 3, 4)) / n_tokens).double().cpu().numpy()
    return out


class _AttentionProbe:
    """Attention-output error of each kv-head group on subsampled query positions, one layer at a time.

    Full-precision probabilities ``P`` and outputs ``O`` are computed once per layer. Quantizing values
    changes the output by ``P (V_hat - V)`` (linear, no new softmax); quantizing keys needs a new softmax.
    Soft-capping (Gemma2) is not modelled.
    """

    def __init__(self, stats: CalibrationStats, max_queries: int):
        L, B, H, T, D = stats.keys.shape
        self.stats = stats
        hq = stats.queries.shape[2]
        self.rep = hq // H
        n = min(T, max_queries)
        pos = torch.unique(torch.linspace(0, T - 1, n).round().long())
        self.pos = pos.to(stats.keys.device)
        P = self.pos.numel()
        mask = stats.attention_mask
        key_pos = torch.arange(T, device=self.pos.device)
        causal = key_pos[None, :] <= self.pos[:, None]  # [P, T]
        base = causal[None] & mask[:, None, :]  # [B, P, T]
        self.q_valid = mask[:, self.pos]  # [B, P]
        base = base & self.q_valid[:, :, None]
        self.masks = []
        for layer in range(L):
            window = stats.sliding_windows[layer] if stats.sliding_windows else None
            m = base if window is None else base & (key_pos[None, :] > self.pos[:, None] - window)[None]
            self.masks.append(m[:, None, None])  # [B, 1, 1, P, T]
        # normaliser: real sampled queries x query heads per group x head_dim
        self.count = float(self.q_valid.sum()) * self.rep * D
        self.scalings = stats.scalings or tuple([D**-0.5] * L)
        self.P = P

    def _probs(self, layer: int, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bhrpd,bhtd->bhrpt", q, keys) * self.scalings[layer]
        scores = scores.masked_fill_(~self.masks[layer], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.nan_to_num_(probs, nan=0.0)  # padded query rows have no key at all

    def measure(self, quantizer: Quantizer, bitset: tuple[int, ...]) -> np.ndarray:
        """``[2, L, H, nb]``: one quantizer call per (layer, kind, bit) covering every kv-head at once."""
        L, B, H, T, D = self.stats.keys.shape
        result = np.zeros((2, L, H, len(bitset)))
        scale = 1.0 / max(self.count, 1.0)
        for layer in range(L):  # memory stays O(B * Hq * P * T): one layer's probabilities at a time
            keys, values = self.stats.keys[layer], self.stats.values[layer]
            q = self.stats.queries[layer][:, :, self.pos].reshape(B, H, self.rep, self.P, D)
            probs = self._probs(layer, q, keys)
            ref = torch.einsum("bhrpt,bhtd->bhrpd", probs, values)
            for j, bits in enumerate(bitset):
                k_hat = quantizer.fake_quantize(keys, bits, "key").to(torch.float32)
                diff = torch.einsum("bhrpt,bhtd->bhrpd", self._probs(layer, q, k_hat), values).sub_(ref)
                result[0, layer, :, j] = (diff.square_().sum(dim=(0, 2, 3, 4)) * scale).double().cpu().numpy()
                v_err = quantizer.fake_quantize(values, bits, "value").to(torch.float32).sub_(values)
                diff = torch.einsum("bhrpt,bhtd->bhrpd", probs, v_err)  # P (V_hat - V): linear in V
                result[1, layer, :, j] = (diff.square_().sum(dim=(0, 2, 3, 4)) * scale).double().cpu().numpy()
        return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties) of two equally long sequences."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 3:
        raise RateQuantError("spearman needs two 1-D sequences of equal length >= 3")
    value = spearmanr(a, b).statistic
    return float(value) if math.isfinite(value) else 0.0


__all__ = [
    "DEFAULT_BITSET",
    "DEFAULT_MAX_QUERIES",
    "DEFAULT_METRIC",
    "METRICS",
    "Metric",
    "DistortionTable",
    "measure_distortion",
    "measure_distortions",
    "spearman",
]
