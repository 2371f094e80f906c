"""The safe default plan: build candidate allocations at one budget and keep the one with the lowest held-out KL.

RateQuant's allocation is the optimum of an additive model of fitted curves; on some models and designs the
damages of many narrow components combine worse than the model says and a fixed key/value split such as K3V2
does better, and where one shared beta per kind fits some components poorly the same allocator does better on
the measured distortions themselves. So ``calibrate`` does not trust one candidate: it builds RateQuant's
allocation, the same allocator's on the measured distortions (:data:`MEASURED`, where it differs) and the fixed
splits of the same budget (for ``--quantizer auto``, those of every design at the same true bytes), measures
the KL divergence from full precision each causes on calibration text that the capture did not see (simulated
quantization with the plan's residual window and sinks, the second half of each window scored as the
evaluation protocol does), and keeps the lowest. A close call is settled on more windows (:data:`CHOICE_WINDOWS`,
:data:`CHOICE_MARGIN`), a tie is not (:data:`CHOICE_TIE`). Every candidate's KL goes into the plan's calibration record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ratequant.allocation import Allocation, Budget, CostModel, Curves
from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import WindowProtocol, Windows, bos_token_id, encode_prefix, make_windows
from ratequant.inputs.corpora import Corpus
from ratequant.progress import progress_bar
from ratequant.spec import KVQuantSpec, StoragePolicy

MEASURED = "ratequant-measured"
"""The candidate (and allocator) name of RateQuant's allocator run on the measured distortion table instead of the
fitted curves."""
CHOICE_TOKENS = 1024
"""Tokens of each held-out window the candidates are scored on (the second half of each is scored)."""
CHOICE_WINDOWS = 3
"""Most held-out windows the candidates are scored on: every candidate on the first, and on each further window only
the candidates still within :data:`CHOICE_MARGIN` of the best mean KL so far (a close call gets more text, a clear
one or a tie costs one window)."""
CHOICE_MARGIN = 0.25
"""A candidate whose mean held-out KL is within this fraction above the best one's is scored on the next window."""
CHOICE_TIE = 0.05
"""When every candidate still in the running is within this fraction above the best one's mean KL, the choice stops:
a tie, closer than the evaluation's own standard error of the KL (about 4% on the embedded model's two windows)."""


def choice_tokens_for(tokens: int | None, residual_length: int, sink_tokens: int) -> int:
    """Tokens per held-out window: ``tokens``, or by default :data:`CHOICE_TOKENS` grown (in steps of 256) until the
    scored second half of a window lies past the residual window and the sinks, so it reads quantized history.
    Raises :class:`RateQuantError` when a given length is too short for that."""
    least = 2 * (residual_length + sink_tokens) + 2
    if tokens is None:
        return max(CHOICE_TOKENS, -(-least // 256) * 256)
    if tokens < least:
        raise RateQuantError(
            f"the held-out windows that choose the plan ({tokens} tokens) must be longer than twice the residual "
            f"window plus the sinks ({residual_length} + {sink_tokens}), or their scored half reads nothing "
            f"quantized; give at least {least} tokens, or turn the choice off"
        )
    return tokens


@dataclass(frozen=True, eq=False)
class Candidate:
    """One way to store the cache at the budget: ``name`` (e.g. ``"kivi/ratequant"``, ``"kivi/K3V2"``), the
    widths ``allocation`` (with their true bytes), the storage ``policy``, and the ``curves`` and ``cost_model`` it
    was made with."""

    name: str
    allocation: Allocation
    policy: StoragePolicy
    curves: Curves
    cost_model: CostModel

    @property
    def spec(self) -> KVQuantSpec:
        p = self.policy
        return KVQuantSpec(
            self.allocation.bits, p.quantizer, residual_length=p.residual_length, sink_tokens=p.sink_tokens
        )


def split_allocations(
    budget: Budget,
    curves: Curves,
    cost_model: CostModel,
    widths: tuple[int, ...],
    value_widths: tuple[int, ...] | None = None,
) -> dict[str, Allocation]:
    """``{"K{k}V{v}": Allocation}``: every fixed split of one key width among ``widths`` and one value width among
    ``value_widths`` (default the same) that meets ``budget`` (an average-bits budget exactly; a byte budget as the
    largest splits under it: no kind could take one more bit and still fit)."""
    shape = curves.shape
    fits: dict[tuple[int, int], float] = {}
    for k in widths:
        for v in widths if value_widths is None else value_widths:
            bits = np.empty(shape, dtype=np.int64)
            bits[0], bits[1] = k, v
            nbytes = cost_model.bytes_per_token(bits)
            if budget.kind == "avg_bits":
                if abs((k + v) / 2 - budget.value) <= 1e-9 * budget.value:
                    fits[(k, v)] = nbytes
            elif nbytes <= budget.value * (1 + 1e-9):
                fits[(k, v)] = nbytes
    if budget.kind != "avg_bits":  # keep the maximal ones
        fits = {kv: b for kv, b in fits.items() if (kv[0] + 1, kv[1]) not in fits and (kv[0], kv[1] + 1) not in fits}
    out = {}
    for (k, v), nbytes in sorted(fits.items(), key=lambda item: (-item[0][0], item[0][1])):
        bits = np.empty(shape, dtype=np.int64)
        bits[0], bits[1] = k, v
        out[f"K{k}V{v}"] = Allocation(
            bits=bits,
            avg_bits=float(bits.mean()),
            bytes_per_token=nbytes,
            predicted_distortion=curves.total(bits)
            if curves.predicts and k in curves.bitset and v in curves.bitset
            else None,
            method="kv-split",
            details={"split": f"K{k}V{v}", "solver": "fixed", "budget": budget.to_dict()},
        )
    return out


def held_out_windows(
    tokenizer, corpus: Corpus, skip_tokens: int, tokens: int = CHOICE_TOKENS, windows: int = CHOICE_WINDOWS
) -> Windows:
    """``windows`` windows of ``tokens`` tokens of ``corpus``'s calibration split after its first ``skip_tokens``
    (the text the capture used), BOS first where the tokenizer adds one, the second half of each scored. Where the
    split is too short, the last windows it holds (which may overlap the capture's text), and where it holds not
    even one, one window of all of it."""
    skip = -(-skip_tokens // tokens)
    try:
        cut = make_windows(tokenizer, corpus.calibration, WindowProtocol(tokens, skip + windows, "auto", "second-half"))
    except RateQuantError:
        available = encode_prefix(tokenizer, corpus.calibration, tokens).numel()
        tokens, windows = available + (bos_token_id(tokenizer) is not None), 1
        cut = make_windows(tokenizer, corpus.calibration, WindowProtocol(tokens, 1, "auto", "second-half"))
    ids = cut.ids[-windows:]
    return Windows(ids, WindowProtocol(tokens, ids.shape[0], "auto", "second-half"), cut.bos_token_id)


@dataclass(frozen=True, eq=False)
class Choice:
    """The ``best`` candidate, every scored candidate's mean held-out KL ``{name: kl}`` and how many windows each
    was scored on ``{name: windows}`` (both empty when one candidate was not scored)."""

    best: Candidate
    kl: dict[str, float]
    windows: dict[str, int]


def choose_candidate(
    kl: Callable[[KVQuantSpec, int], float],
    candidates: list[Candidate],
    windows: int = 1,
    margin: float = CHOICE_MARGIN,
    tie: float = CHOICE_TIE,
) -> Choice:
    """The candidate whose spec causes the least mean ``kl(spec, window)``
    (:func:`ratequant.calibration.search.window_kl`) over up to ``windows`` windows: every candidate is scored on window
    0, and on each further window only those whose mean so far is within ``margin`` (a fraction) above the best mean,
    unless all of those are within ``tie`` of it (a tie costs no more text); the winner is the least mean among the
    candidates scored on the most windows. The first listed wins a tie. One candidate is returned unscored."""
    if not candidates:
        raise RateQuantError("no candidate allocation meets the budget")
    if len(candidates) == 1:
        return Choice(candidates[0], {}, {})
    scores: dict[str, list[float]] = {c.name: [] for c in candidates}
    contenders = list(candidates)
    for window in range(windows):
        if window:
            least = min(np.mean(scores[c.name]) for c in contenders)
            contenders = [c for c in contenders if np.mean(scores[c.name]) <= least * (1 + margin)]
            if all(np.mean(scores[c.name]) <= least * (1 + tie) for c in contenders):
                break
        with progress_bar(total=len(contenders), desc=f"plan choice, window {window + 1}", unit="candidate") as bar:
            for c in contenders:
                scores[c.name].append(kl(c.spec, window))
                bar.update(1)
    best = min(contenders, key=lambda c: np.mean(scores[c.name]))
    return Choice(best, {n: float(np.mean(v)) for n, v in scores.items()}, {n: len(v) for n, v in scores.items()})


__all__ = [
    "CHOICE_MARGIN",
    "CHOICE_TIE",
    "CHOICE_TOKENS",
    "CHOICE_WINDOWS",
    "MEASURED",
    "Candidate",
    "Choice",
    "choose_candidate",
    "choice_tokens_for",
    "held_out_windows",
    "split_allocations",
]
