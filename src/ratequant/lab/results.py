"""Typed results of a comparison: one record per method, one per design, and the whole run (``results.json``).

Every method carries its own fields (method, design, budget, mean key and value widths, bits, bytes) and its
scores per evaluation (corpus and scoring), so a report only formats them and never parses a label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ratequant.allocation.fitting import DistortionFit
from ratequant.errors import RateQuantError
from ratequant.evaluation.perplexity import ConditionScore
from ratequant.geometry import KINDS
from ratequant.jsonio import JsonDocument
from ratequant.lab.config import ALLOCATED_METHODS, FIXED_METHODS, FORMAT_VERSION, FULL_PRECISION, CompareConfig


def _bits_to_json(bits: np.ndarray) -> dict:
    return {kind: np.asarray(bits[k]).astype(int).tolist() for k, kind in enumerate(KINDS)}


def _bits_from_json(d: dict) -> np.ndarray:
    if not isinstance(d, dict) or set(d) != set(KINDS):
        raise RateQuantError("compare results: bits must be an object with 'key' and 'value'")
    return np.array([d[kind] for kind in KINDS], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class MethodResult:
    """One scored method: a method at a budget with a design (``design``/``budget`` None where they do not
    apply: full precision; rank methods have no design).

    ``avg_bits``: stored code bits per element of the original head (metadata excluded); ``key_bits`` and
    ``value_bits``: the mean width of keys and of values (None for rank reduction); ``kv_bytes_per_token``:
    true bytes per token of the whole KV cache at the config's ``context_tokens`` (codes, metadata, full-precision
    tokens). ``scores`` holds a :class:`ConditionScore` per evaluation (see :attr:`CompareResults.evaluations`);
    ``ppl``, ``kl``, ``window_nll`` are those of the primary one. ``bits [2, L, H]`` is kept for the allocators
    whose widths vary (layerwise, ratequant, mismatched).
    """

    method: str
    label: str
    design: str | None
    budget: float | None
    avg_bits: float
    key_bits: float | None
    value_bits: float | None
    kv_bytes_per_token: float
    scores: dict[str, ConditionScore]
    primary: str
    details: dict = field(default_factory=dict)
    bits: np.ndarray | None = None

    def score(self, evaluation: str | None = None) -> ConditionScore:
        return self.scores[self.primary if evaluation is None else evaluation]

    @property
    def ppl(self) -> float:
        return self.score().ppl

    @property
    def kl(self) -> float:
        return self.score().kl

    @property
    def window_nll(self) -> tuple[float, ...]:
        return self.score().window_nll

    @property
    def keys_wider(self) -> bool | None:
        """For a key/value split: True when keys get more bits than values."""
        return None if self.key_bits is None or self.value_bits is None else self.key_bits > self.value_bits

    def to_dict(self) -> dict:
        d = {
            "method": self.method,
            "label": self.label,
            "design": self.design,
            "budget": self.budget,
            "avg_bits": self.avg_bits,
            "key_bits": self.key_bits,
            "value_bits": self.value_bits,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "ppl": self.ppl,
            "kl": self.kl,
            "scores": {name: s.to_dict() for name, s in self.scores.items()},
            "details": self.details,
        }
        if self.bits is not None:
            d["bits"] = _bits_to_json(self.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict, primary: str) -> MethodResult:
        try:
            return cls(
                method=d["method"],
                label=d["label"],
                design=d["design"],
                budget=d["budget"],
                avg_bits=float(d["avg_bits"]),
                key_bits=d["key_bits"],
                value_bits=d["value_bits"],
                kv_bytes_per_token=float(d["kv_bytes_per_token"]),
                scores={name: ConditionScore.from_dict(s) for name, s in d["scores"].items()},
                primary=primary,
                details=dict(d.get("details", {})),
                bits=_bits_from_json(d["bits"]) if "bits" in d else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RateQuantError(f"compare results: malformed method record ({exc})") from exc


@dataclass(frozen=True, eq=False)
class DesignResult:
    """A quantizer design's fitted distortion model on the shared calibration statistics.

    ``measured`` ``[2, L, H, nb]`` is the distortion table at ``fit.bitset``; ``min_bits`` the lowest informative
    width of any key and any value; ``floors`` ``[2, L, H]`` every component's own; ``seconds`` the time to measure
    and fit.
    """

    name: str
    quantizer: dict
    fit: DistortionFit
    measured: np.ndarray
    mismatch_source: str | None
    seconds: dict
    min_bits: tuple[int, int] | None = None
    floors: np.ndarray | None = None

    def component_floors(self) -> np.ndarray:
        """Every component's lowest informative width ``[2, L, H]`` (from ``min_bits`` where none were kept)."""
        if self.floors is not None:
            return np.asarray(self.floors)
        low = self.min_bits or (min(self.fit.bitset),) * 2
        return np.broadcast_to(np.asarray(low)[:, None, None], self.fit.shape)

    @property
    def beta_key(self) -> float:
        return self.fit.beta_key

    @property
    def beta_value(self) -> float:
        return self.fit.beta_value

    @property
    def r2(self) -> float:
        return self.fit.r2_overall

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "quantizer": self.quantizer,
            "beta_key": self.beta_key,
            "beta_value": self.beta_value,
            "r2": self.r2,
            "r2_worst": float(self.fit.r2.min()),
            "worst_residual": self.fit.worst_residual,
            "mismatch_source": self.mismatch_source,
            "seconds": self.seconds,
            "fit": self.fit.to_dict(),
            "measured": {kind: self.measured[k].tolist() for k, kind in enumerate(KINDS)},
            "min_bits": None if self.min_bits is None else list(self.min_bits),
            "floors": None
            if self.floors is None
            else {k: np.asarray(self.floors)[i].tolist() for i, k in enumerate(KINDS)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> DesignResult:
        try:
            return cls(
                name=d["name"],
                quantizer=d["quantizer"],
                fit=DistortionFit.from_dict(d["fit"]),
                measured=np.array([d["measured"][kind] for kind in KINDS], dtype=np.float64),
                mismatch_source=d["mismatch_source"],
                seconds=dict(d["seconds"]),
                min_bits=None if d.get("min_bits") is None else tuple(d["min_bits"]),
                floors=None if d.get("floors") is None else np.array([d["floors"][k] for k in KINDS], dtype=np.int64),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RateQuantError(f"compare results: malformed design record ({exc})") from exc


@dataclass(frozen=True, eq=False)
class CompareResults(JsonDocument):
    """Everything one comparison measured; :meth:`to_dict` is the report's JSON (``results.json``).

    ``evaluations`` describes every evaluation the methods were scored on (``{name: {corpus, windows...}}``),
    ``primary`` names the headline one.
    """

    DOCUMENT = "compare results"
    FORMAT_VERSIONS = (2, FORMAT_VERSION)  # version 2 differs only in its config's, which the config upgrades

    config: CompareConfig
    model: dict
    corpus: dict
    evaluations: dict[str, dict]
    primary: str
    designs: dict[str, DesignResult]
    methods: tuple[MethodResult, ...]
    skipped: tuple[dict, ...]
    rank: dict
    timings: dict
    environment: dict
    extra: dict = field(default_factory=dict)

    @property
    def evaluation(self) -> dict:
        """The primary evaluation's description."""
        return self.evaluations[self.primary]

    @property
    def full_precision(self) -> MethodResult:
        return next(m for m in self.methods if m.method == FULL_PRECISION)

    def select(
        self, *, method: str | None = None, design: str | None = "any", budget: float | None = None
    ) -> list[MethodResult]:
        """Records matching ``method``, ``design`` (``"any"``: every design; None: design-independent) and
        ``budget``."""
        out = []
        for m in self.methods:
            if method is not None and m.method != method:
                continue
            if design != "any" and m.design != design:
                continue
            if budget is not None and (m.budget is None or abs(m.budget - budget) > 1e-9):
                continue
            out.append(m)
        return out

    def no_choice(self, design: str, budget: float) -> bool:
        """True when the budget leaves an allocator nothing to choose: it is the mean of the design's per-component
        floors (each component's narrowest informative width), so the only allocation that fits is every component
        at its floor (at 2 bits for most designs: RateQuant, layer-wise and uniform 2-bit are then the same
        allocation; for the ``uniform`` design, whose 2-bit keys are uninformative, at 2.5 bits K3V2). A tie there
        is by construction, not a result."""
        found = self.select(method="ratequant", design=design, budget=budget)
        if not found or found[0].bits is None:
            return False
        bits = np.asarray(found[0].bits)
        floors = self.designs[design].component_floors()
        return float(budget) == float(floors.mean()) and bool((bits == floors).all())

    def best_fixed(
        self, design: str, budget: float, evaluation: str | None = None, metric: str = "kl"
    ) -> MethodResult | None:
        """The fixed scheme (uniform or a key/value split) of ``design`` at ``budget`` with the lowest ``metric``."""
        fixed = [m for m in self.select(design=design, budget=budget) if m.method in FIXED_METHODS]
        return min(fixed, key=lambda m: getattr(m.score(evaluation), metric)) if fixed else None

    def auto_against_all(self, budget: float, evaluation: str | None = None) -> dict | None:
        """The ``auto`` plan at ``budget`` against the best of every method of every design that takes no more true
        bytes (an oracle choice on the evaluation itself): both KLs with their standard errors over tokens, and
        whether auto's KL is within one standard error (the best's) of the best."""
        found = self.select(method="auto", budget=budget)
        if not found:
            return None
        auto = found[0]
        limit = auto.kv_bytes_per_token * (1 + 1e-9)
        rivals = [
            m
            for m in self.methods
            if m.method not in (FULL_PRECISION, "auto") and m.design is not None and m.kv_bytes_per_token <= limit
        ]
        best = min(rivals, key=lambda m: m.score(evaluation).kl, default=None)
        if best is None:
            return None
        a, b = auto.score(evaluation), best.score(evaluation)
        return {
            "budget": budget,
            "auto": auto.label,
            "auto_kl": a.kl,
            "auto_kl_se": a.kl_se,
            "auto_bytes": auto.kv_bytes_per_token,
            "best": f"{best.design} {best.label}",
            "best_kl": b.kl,
            "best_kl_se": b.kl_se,
            "within_one_se": a.kl - b.kl <= b.kl_se,
            "compared": len(rivals),
        }

    def recovered(self, evaluation: str | None = None, metric: str = "kl") -> list[dict]:
        """Share of the best fixed scheme's damage each allocator recovers, on ``metric`` (``"kl"`` or ``"ppl"``).

        The best fixed scheme is the one with the lowest ``metric`` on the evaluation itself (an oracle choice
        that favours it). ``share = (D_best_fixed - D_method) / D_best_fixed`` with damage ``D`` = KL, or
        ``PPL - PPL_full`` (1: all the damage removed; 0: no better; negative: worse). ``delta`` is the paired
        per-window difference of the metric's per-token quantity (KL, or NLL = log PPL) best fixed minus method
        (positive: the method wins) and ``se`` its standard error over windows (None with one window).
        ``no_choice`` marks the cells where the budget left no allocation to choose (:meth:`no_choice`).
        """
        fp = self.full_precision.score(evaluation)
        rows = []
        for design in self.config.designs:
            for budget in self.config.budgets:
                best = self.best_fixed(design, budget, evaluation, metric)
                if best is None:
                    continue
                forced = self.no_choice(design, budget)
                b = best.score(evaluation)
                for m in self.select(design=design, budget=budget):
                    if m.method not in ALLOCATED_METHODS:
                        continue
                    s = m.score(evaluation)
                    if metric == "kl":
                        damage, value = b.kl, s.kl
                        diff = np.asarray(b.window_kl) - np.asarray(s.window_kl)
                    else:
                        damage, value = b.ppl - fp.ppl, s.ppl - fp.ppl
                        diff = np.asarray(b.window_nll) - np.asarray(s.window_nll)
                    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else None
                    rows.append(
                        {
                            "design": design,
                            "budget": budget,
                            "method": m.method,
                            "label": m.label,
                            "metric": metric,
                            "value": getattr(s, metric),
                            "best_fixed": best.label,
                            "best_fixed_value": getattr(b, metric),
                            "full_precision_ppl": fp.ppl,
                            "share": (damage - value) / damage if damage > 0 else None,
                            "delta": float(diff.mean()),
                            "se": se,
                            "no_choice": forced,
                        }
                    )
        return rows

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "compare",
            "config": self.config.to_dict(),
            "model": self.model,
            "corpus": self.corpus,
            "evaluations": self.evaluations,
            "primary": self.primary,
            "full_precision": self.full_precision.to_dict(),
            "designs": {name: d.to_dict() for name, d in self.designs.items()},
            "results": [m.to_dict() for m in self.methods],
            "recovered": {"kl": self.recovered(metric="kl"), "ppl": self.recovered(metric="ppl")},
            "skipped": list(self.skipped),
            "rank": self.rank,
            "timings": self.timings,
            "environment": self.environment,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: object) -> CompareResults:
        d = cls.check_format(d)
        if d.get("kind") != "compare":
            raise RateQuantError("not a ratequant compare results file (kind is not 'compare')")
        try:
            primary = d["primary"]
            return cls(
                config=CompareConfig.from_dict(d["config"]),
                model=d["model"],
                corpus=d["corpus"],
                evaluations=d["evaluations"],
                primary=primary,
                designs={name: DesignResult.from_dict(v) for name, v in d["designs"].items()},
                methods=tuple(MethodResult.from_dict(m, primary) for m in d["results"]),
                skipped=tuple(d["skipped"]),
                rank=d["rank"],
                timings=d["timings"],
                environment=d["environment"],
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise RateQuantError(f"compare results: malformed file ({exc})") from exc


__all__ = ["CompareResults", "DesignResult", "MethodResult"]
