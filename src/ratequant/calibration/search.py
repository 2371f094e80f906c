"""Refine an allocation on the KL divergence it really causes: a local search of one-bit moves.

RateQuant allocates on fitted curves of a proxy (the Fisher-weighted error) under an additive model: it never sees how
the damages of components combine. This search starts from an allocation (in ``calibrate``, the better of RateQuant's
and the fixed key/value splits of the same size on the search text, and the moves found are kept only if they also help
on a held-out window: :func:`ratequant.calibration.pipeline.refine_allocation`) and proposes moving one bit from one
component (kind, layer, kv head) to another at equal or fewer true bytes; a move is kept when the mean KL divergence
from full precision over the search windows (simulated quantization, every position scored) falls. Donors and receivers
are drawn (seeded) with weights from the fitted curves: the donor among the components whose next bit down the curve
says costs least, the receiver among those whose next bit up it says gains most.

Each proposal costs one simulated forward pass over the search windows: about 5.5 s for 1,024 tokens on the
embedded default model with two threads, so it is off by default (``calibrate --search N``).
``benchmarks/joint_search.py`` measures what it buys on unseen text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ratequant.allocation import CostModel, Curves
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import FullPrecision, Simulated
from ratequant.evaluation.perplexity import token_kl
from ratequant.evaluation.protocol import Windows
from ratequant.spec import KVQuantSpec
from ratequant.validation import check_int


@dataclass(frozen=True)
class SearchResult:
    """The searched widths ``bits [2, L, H]`` and how the search went (KL on the search windows, in nats)."""

    bits: np.ndarray
    start_kl: float
    kl: float
    proposals: int
    accepted: int
    trace: tuple[float, ...]  # the best KL after each proposal, the start first
    seconds: float

    def summary(self) -> dict:
        """Scalars for a plan's calibration record."""
        return {
            "search_proposals": self.proposals,
            "search_moves_kept": self.accepted,
            "search_kl_start": self.start_kl,
            "search_kl": self.kl,
        }


def proposal_weights(curves: Curves, bits: np.ndarray, step: int, widths, temperature: float) -> np.ndarray:
    """Sampling weights over components ``[2 * L * H]`` for a move of ``step`` (+1 receive, -1 give) from
    ``bits [2, L, H]``: softmax of the fitted curve's predicted gain (receive) or negative cost (give) in units of
    its spread; 0 where the new width is not among ``widths[kind]`` (those of keys, of values) or lies below the
    component's lowest allowed width (the curves' ``min_bits``)."""
    index = {b: i for i, b in enumerate(curves.bitset)}
    flat, floors = bits.reshape(-1), curves.component_min_bits().reshape(-1)
    score = np.full(flat.size, -np.inf)
    for c, b in enumerate(flat):
        kind, layer, head = np.unravel_index(c, bits.shape)
        to = b + step
        if to in widths[kind] and to >= floors[c] and to in index and b in index:
            now, then = curves.values[kind, layer, head, index[b]], curves.values[kind, layer, head, index[to]]
            score[c] = np.log(max(now - then, 1e-30)) if step > 0 else -np.log(max(then - now, 1e-30))
    out = np.zeros(flat.size)
    finite = np.isfinite(score)
    if finite.any():
        s = score[finite]
        out[finite] = np.exp((s - s.max()) / (temperature * (s.std() + 1e-12)))
    return out / out.sum() if out.sum() > 0 else out


def window_kl(model: torch.nn.Module, windows: Windows) -> Callable[[KVQuantSpec, int], float]:
    """``(spec, i) -> mean KL from full precision`` over the scored positions of window ``i`` of ``windows``; each
    window's full-precision reference is computed once, when it is first needed."""
    first = windows.protocol.first_target
    references: dict[int, torch.Tensor] = {}

    def kl(spec: KVQuantSpec, i: int) -> float:
        window = windows.ids[i].unsqueeze(0)
        with torch.inference_mode():
            if i not in references:
                references[i] = FullPrecision().log_probs(model, window, first)
            log_probs = Simulated(spec).log_probs(model, window, first)
            return float(token_kl(references[i], log_probs).mean())

    return kl


def kl_on(model: torch.nn.Module, windows: Windows) -> Callable[[KVQuantSpec], float]:
    """``spec -> mean KL from full precision`` over every scored position of ``windows`` (every window scores as
    many positions, so this is the mean of :func:`window_kl` over the windows)."""
    per_window = window_kl(model, windows)
    count = windows.ids.shape[0]

    def kl(spec: KVQuantSpec) -> float:
        return sum(per_window(spec, i) for i in range(count)) / count

    return kl


def check_search_tokens(tokens: int, residual_length: int, sink_tokens: int = 0) -> int:
    """``tokens`` if a search window of that many tokens has any quantized position: a window no longer than the
    residual window plus the sink tokens is never quantized, so every KL on it would be 0 and no move would be
    kept."""
    tokens = check_int(tokens, "search tokens", lo=2)
    if tokens <= residual_length + sink_tokens:
        raise RateQuantError(
            f"the KL search's text ({tokens} tokens) is no longer than the full-precision residual window "
            f"({residual_length}) plus the sink tokens (up to {sink_tokens}), so nothing in it is quantized; give more "
            f"search tokens (e.g. {max(1024, 2 * (residual_length + sink_tokens))}) or a smaller residual window"
        )
    return tokens


def best_start(kl: Callable[[KVQuantSpec], float], spec: KVQuantSpec, starts: dict[str, np.ndarray]):
    """``(name, {name: KL})``: which of ``starts`` (widths for ``spec``) causes the least KL."""
    values = {name: kl(replace(spec, bits=bits)) for name, bits in starts.items()}
    return min(values, key=values.get), values


def search_allocation(
    kl: Callable[[KVQuantSpec], float],
    spec: KVQuantSpec,
    curves: Curves,
    cost_model: CostModel,
    *,
    proposals: int,
    widths: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    start_kl: float | None = None,
) -> SearchResult:
    """``proposals`` one-bit moves from ``spec.bits``, each kept when ``kl`` (see :func:`kl_on`) falls and the true
    bytes per token do not grow; a component's width stays among ``widths[kind]`` (default: the curves').
    ``start_kl``: ``kl(spec)`` where the caller knows it already."""
    proposals = check_int(proposals, "search proposals", lo=0)
    if curves.shape != tuple(spec.bits.shape):
        raise RateQuantError(f"the curves cover components {curves.shape} but the widths are {spec.bits.shape}")
    widths = widths or (curves.bitset, curves.bitset)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    bits = np.array(spec.bits)
    best = start_kl = kl(spec) if start_kl is None else start_kl
    limit = cost_model.bytes_per_token(bits) * (1 + 1e-9)
    accepted, trace = 0, [best]
    for _ in range(proposals):
        give = proposal_weights(curves, bits, -1, widths, temperature)
        take = proposal_weights(curves, bits, +1, widths, temperature)
        if give.sum() == 0 or take.sum() == 0:
            break
        donor, receiver = rng.choice(give.size, p=give), rng.choice(take.size, p=take)
        candidate = bits.copy().reshape(-1)
        candidate[donor] -= 1
        candidate[receiver] += 1
        candidate = candidate.reshape(bits.shape)
        if donor != receiver and cost_model.bytes_per_token(candidate) <= limit:
            value = kl(replace(spec, bits=candidate))
            if value < best:
                bits, best, accepted = candidate, value, accepted + 1
        trace.append(best)
    return SearchResult(bits, start_kl, best, len(trace) - 1, accepted, tuple(trace), time.perf_counter() - start)


__all__ = [
    "SearchResult",
    "best_start",
    "check_search_tokens",
    "kl_on",
    "proposal_weights",
    "search_allocation",
    "window_kl",
]
