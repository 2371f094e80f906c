"""Perplexity and KL divergence from full precision, per token and per window, for several conditions at once.

For each window the full-precision model runs once; its next-token distribution is the reference for every
condition, so all conditions are scored on the same tokens in the same process. Per condition and window:
the next-token NLL of the scored tokens, ``KL(p_full || p_condition)`` per token (llama.cpp's KLD, the less
noisy measure of damage), and whether the condition's top token is the reference's (llama.cpp's "same top").
Standard errors are over scored tokens, as llama.cpp reports them; paired comparisons between conditions use
the per-window means (:attr:`ConditionScore.window_nll`, :attr:`ConditionScore.window_kl`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ratequant.compat.placement import input_device
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import Condition, FullPrecision
from ratequant.evaluation.protocol import WindowProtocol, Windows
from ratequant.progress import progress_bar

REFERENCE = "full-precision"


@dataclass(frozen=True)
class ConditionScore:
    """Scores of one condition over the scored tokens of every window.

    ``ppl = exp(nll)``; ``nll``, ``kl`` (nats) and ``top1`` (share of tokens whose argmax matches the
    reference's) are means per scored token, each ``_se`` its standard error over tokens (for ``ppl``:
    ``ppl * nll_se``). ``window_nll``/``window_kl`` are the per-window means.
    """

    ppl: float
    ppl_se: float
    nll: float
    nll_se: float
    kl: float
    kl_se: float
    top1: float
    tokens: int
    window_nll: tuple[float, ...]
    window_kl: tuple[float, ...]
    seconds: float

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["window_nll"], d["window_kl"] = list(self.window_nll), list(self.window_kl)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConditionScore:
        try:
            return cls(
                **{
                    **d,
                    "window_nll": tuple(map(float, d["window_nll"])),
                    "window_kl": tuple(map(float, d["window_kl"])),
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RateQuantError(f"malformed condition score ({exc})") from None


@dataclass
class _Accumulator:
    sums: torch.Tensor = field(
        default_factory=lambda: torch.zeros(5, dtype=torch.float64)
    )  # nll, nll^2, kl, kl^2, top1
    tokens: int = 0
    window_nll: list = field(default_factory=list)
    window_kl: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, nll: torch.Tensor, kl: torch.Tensor, agree: torch.Tensor) -> None:
        nll, kl = nll.double(), kl.double()
        self.sums += torch.stack([nll.sum(), nll.square().sum(), kl.sum(), kl.square().sum(), agree.double().sum()])
        self.tokens += nll.numel()
        self.window_nll.append(float(nll.mean()))
        self.window_kl.append(float(kl.mean()))

    def result(self) -> ConditionScore:
        n = max(self.tokens, 1)
        nll, nll2, kl, kl2, top1 = (float(v) / n for v in self.sums)

        def se(mean: float, square: float) -> float:
            return math.sqrt(max(square - mean * mean, 0.0) / max(n - 1, 1))

        return ConditionScore(
            ppl=math.exp(nll),
            ppl_se=math.exp(nll) * se(nll, nll2),
            nll=nll,
            nll_se=se(nll, nll2),
            kl=kl,
            kl_se=se(kl, kl2),
            top1=top1,
            tokens=self.tokens,
            window_nll=tuple(self.window_nll),
            window_kl=tuple(self.window_kl),
            seconds=self.seconds,
        )


def token_kl(reference: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL divergence of each row's distribution from the reference's, ``[..., vocab]`` log-probabilities to
    ``[...]`` nats (clamped at 0 against rounding)."""
    return (reference.exp() * (reference - log_probs)).sum(dim=-1).clamp_(min=0)


@torch.inference_mode()
def score_conditions(
    model: torch.nn.Module,
    windows: Windows,
    conditions: dict[str, Condition],
    *,
    scorings: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, ConditionScore]]:
    """Score ``conditions`` on ``windows`` against the unmodified model: ``{scoring: {condition: score}}``.

    ``scorings`` (default: the windows' own) are scored from the same passes ("all" and "second-half" cost one
    run together). Each inner dict holds :data:`REFERENCE` (KL 0) first, then the conditions, in order.
    """
    if not isinstance(windows, Windows):
        raise RateQuantError(
            f"windows must be ratequant Windows (evaluation.protocol.make_windows), got {type(windows).__name__}"
        )
    if REFERENCE in conditions:
        raise RateQuantError(f"{REFERENCE!r} is the reference; name the conditions otherwise")
    scorings = tuple(dict.fromkeys(scorings or (windows.protocol.scoring,)))
    firsts = {name: WindowProtocol(windows.seq_len, 1, "no", name).first_target for name in scorings}
    first = min(firsts.values())
    device = input_device(model)
    runs = {REFERENCE: FullPrecision(), **conditions}
    acc = {scoring: {name: _Accumulator() for name in runs} for scoring in scorings}
    with progress_bar(total=windows.count * len(runs), desc="scoring", unit="pass", enabled=progress) as bar:
        for window in windows.ids:
            ids = window.unsqueeze(0).to(device)
            targets = ids[0, first:]
            reference = None
            for name, condition in runs.items():
                start = time.perf_counter()
                log_probs = condition.log_probs(model, ids, first)
                seconds = time.perf_counter() - start
                if reference is None:
                    reference = log_probs
                nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
                kl = token_kl(reference, log_probs)
                agree = log_probs.argmax(dim=-1) == reference.argmax(dim=-1)
                for scoring, skip in firsts.items():
                    rows = slice(skip - first, None)
                    acc[scoring][name].add(nll[rows], kl[rows], agree[rows])
                    acc[scoring][name].seconds += seconds
                bar.update()
    return {scoring: {name: a.result() for name, a in per.items()} for scoring, per in acc.items()}


def perplexity(
    model: torch.nn.Module, windows: Windows, condition: Condition | None = None, *, progress: bool = True
) -> ConditionScore:
    """Perplexity (and KL from full precision) of one condition (default: full precision) on ``windows``."""
    conditions = {} if condition is None else {"condition": condition}
    scores = score_conditions(model, windows, conditions, progress=progress)[windows.protocol.scoring]
    return scores["condition" if condition is not None else REFERENCE]


__all__ = ["REFERENCE", "ConditionScore", "perplexity", "score_conditions", "token_kl"]
