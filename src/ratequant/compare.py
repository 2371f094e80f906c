"""``ratequant compare``: the experiments of the three source papers, on any model and corpus.

At every budget (average code bits) and for every quantizer design, the same evaluation windows are scored
under each way of spending the bits, against the full-precision model:

* ``uniform`` -- one width for every component (only when the budget is a width in the bit set);
* ``kv-split`` -- one width for keys and one for values, every ``K{k}V{v}`` with ``k != v``,
  ``|k - v| <= split_max_gap`` and ``(k + v) / 2 == budget`` (K4V2 and K2V4 at 3 bits, K3V2 and K2V3 at
  2.5; "Quantize What Counts", arXiv:2502.15075);
* ``layerwise`` -- one width per layer, allocated on the design's curves (KVTuner-style);
* ``ratequant`` -- a width per component, the exact integer optimum of the design's own fitted curves
  D(b) = alpha * beta^-b (RateQuant, arXiv:2605.06675);
* ``mismatched`` -- the same allocator on *another* design's curves, stored with this design: the
  paper's distortion-model-mismatch failure mode. The other design is the one whose fitted
  ``(beta_key, beta_value)`` lie farthest from this design's (recorded as ``mismatch_source``);

and, per budget (design-independent), rank reduction ("Quantization dominates rank reduction for KV-cache
compression"): ``rank`` keeps ``r = floor(budget * head_dim / 16)`` PCA coefficients per token at 16 bits
(the paper's matching: ``r * 16 == budget * head_dim`` code bits), and ``rank+quant`` keeps the largest
``r`` whose coefficients, quantized by ``hybrid_design`` at ``hybrid_bits`` *including its per-token
metadata*, fit the same ``budget * head_dim`` bits.

Every method reports perplexity, the mean per-token KL(p_full || p_method) in nats, average code bits per
element, and true KV bytes per token (codes + scales/zeros + the full-precision residual buffer, amortised
over ``context_tokens``; :class:`ratequant.allocation.CostModel`). The calibration statistics are captured
once and shared by every design; the rank bases come from the same calibration split.

``run_compare(loaded, corpus, config)`` is the library call; :mod:`ratequant.report` writes the report.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ratequant import __version__
from ratequant.allocation import ALLOCATORS, Allocation, Budget, CostModel
from ratequant.data import Corpus, token_windows
from ratequant.distortion import DEFAULT_METRIC, METRICS
from ratequant.errors import BudgetError, RateQuantError
from ratequant.fitting import DistortionFit, check_bitset, finite_real
from ratequant.geometry import KINDS, Geometry
from ratequant.jsonio import read_json, write_json
from ratequant.models import LoadedModel

FORMAT_VERSION = 1
DEFAULT_DESIGNS = ("kivi", "quarot", "turbo", "uniform")
DEFAULT_BUDGETS = (2.0, 2.5, 3.0, 4.0)
PRESETS = ("default", "quick")
QUICK_SIZES = dict(budgets=(2.5, 3.0), seq_len=256, windows=4, calibration_seq_len=512, calibration_sequences=2)
"""What ``--quick`` (and ``make demo``) runs: 2 budgets, 4 evaluation windows of 256 tokens, 2 calibration
sequences of 512 tokens, every design. A few minutes on a 2-core CPU for the default model."""

QUANTIZED_METHODS = ("uniform", "kv-split", "layerwise", "ratequant", "mismatched")
RANK_METHODS = ("rank", "rank+quant")
FIXED_METHODS = ("uniform", "kv-split")
ALLOCATED_METHODS = ("layerwise", "ratequant", "mismatched")
FULL_PRECISION = "full-precision"


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise RateQuantError(f"compare config: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def budget_text(budget: float) -> str:
    """``2.5`` -> ``"2.5"``, ``3.0`` -> ``"3"`` (as budgets appear in labels, file names and JSON keys)."""
    return f"{budget:g}"


@dataclass(frozen=True)
class CompareConfig:
    """Everything that decides a comparison besides the device; saved beside the results (``config.json``).

    ``model``/``corpus`` are the specs the command line loads (``"default"``, a path, a hub id, ...);
    :func:`run_compare` itself uses the model and corpus it is given and records their names and hashes.
    ``seq_len``/``windows`` size the evaluation (non-overlapping windows of the evaluation split);
    ``calibration_seq_len``/``calibration_sequences`` the calibration capture. ``residual`` is the
    full-precision residual window the simulated cache keeps (0: quantize every whole chunk, as the papers'
    figures do); ``context_tokens`` the context at which true bytes per token are stated.
    """

    model: str = "default"
    corpus: str = "default"
    dtype: str | None = None
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    designs: tuple[str, ...] = DEFAULT_DESIGNS
    metric: str = DEFAULT_METRIC
    seq_len: int = 512
    windows: int = 8
    calibration_seq_len: int = 512
    calibration_sequences: int = 4
    residual: int = 0
    context_tokens: int = 4096
    bitset: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    split_max_gap: int = 2
    hybrid_design: str = "uniform"
    hybrid_bits: int = 4
    preset: str = "default"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        from ratequant.quantizers import available

        if self.format_version != FORMAT_VERSION:
            raise RateQuantError(
                f"compare config format_version {self.format_version!r} is not supported (this ratequant reads "
                f"version {FORMAT_VERSION}); re-create the configuration with this version"
            )
        for name in ("model", "corpus"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RateQuantError(f"compare config: {name} must be a non-empty string")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise RateQuantError(f"compare config: dtype must be null, float32, float16 or bfloat16, got {self.dtype!r}")
        object.__setattr__(self, "bitset", check_bitset(tuple(self.bitset), name="compare bitset", min_len=2))
        budgets = tuple(self.budgets)
        if not budgets or not all(finite_real(b) for b in budgets):
            raise RateQuantError(f"compare config: budgets must be a non-empty list of numbers, got {self.budgets!r}")
        budgets = tuple(sorted({float(b) for b in budgets}))
        lo, hi = self.bitset[0], self.bitset[-1]
        bad = [b for b in budgets if not lo <= b <= hi]
        if bad:
            raise RateQuantError(
                f"compare config: budget(s) {', '.join(map(budget_text, bad))} lie outside the widths {lo}..{hi}"
            )
        object.__setattr__(self, "budgets", budgets)
        designs = tuple(self.designs)
        known = available()
        if not designs or len(set(designs)) != len(designs):
            raise RateQuantError(f"compare config: designs must be a non-empty list without repeats, got {self.designs!r}")
        for d in (*designs, self.hybrid_design):
            if d not in known:
                raise RateQuantError(f"compare config: unknown quantizer design {d!r}; choose from {', '.join(known)}")
        object.__setattr__(self, "designs", designs)
        if self.metric not in METRICS:
            raise RateQuantError(f"compare config: unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        for name, low in (("seq_len", 2), ("windows", 1), ("calibration_seq_len", 2), ("calibration_sequences", 1),
                          ("residual", 0), ("context_tokens", 1), ("split_max_gap", 1), ("hybrid_bits", 1)):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name), low))
        if self.hybrid_bits > 8:
            raise RateQuantError(f"compare config: hybrid_bits must be 1..8, got {self.hybrid_bits}")
        if self.context_tokens <= self.residual:
            raise RateQuantError(
                f"compare config: context_tokens ({self.context_tokens}) must exceed the residual window ({self.residual})"
            )
        if self.preset not in PRESETS:
            raise RateQuantError(f"compare config: preset must be one of {PRESETS}, got {self.preset!r}")

    @classmethod
    def quick(cls, **overrides) -> CompareConfig:
        """The ``--quick`` sizes (:data:`QUICK_SIZES`), with ``overrides`` on top."""
        return cls(**{**QUICK_SIZES, "preset": "quick", **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"], d["designs"], d["bitset"] = list(self.budgets), list(self.designs), list(self.bitset)
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> CompareConfig:
        if not isinstance(d, dict):
            raise RateQuantError(f"compare config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RateQuantError(f"compare config has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        if "format_version" not in d:
            raise RateQuantError("compare config has no format_version; it was not written by ratequant compare")
        kwargs = dict(d)
        for name in ("budgets", "designs", "bitset"):
            if name in kwargs:
                if not isinstance(kwargs[name], list):
                    raise RateQuantError(f"compare config: {name} must be a list")
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def to_json(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return write_json(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> CompareConfig:
        return cls.from_dict(read_json(path, what="compare config"))

    def command(self, out_dir: str | Path) -> str:
        """The ``ratequant compare`` command line that makes this configuration (options that differ from its
        preset only); ``--config`` with the saved ``config.json`` repeats any configuration exactly."""
        base = CompareConfig.quick() if self.preset == "quick" else CompareConfig()
        parts = ["ratequant compare"]
        if self.preset == "quick":
            parts.append("--quick")
        for name, flag in (("model", "--model"), ("corpus", "--corpus"), ("dtype", "--dtype")):
            if getattr(self, name) != getattr(base, name):
                parts.append(f"{flag} {_quote(str(getattr(self, name)))}")
        if self.budgets != base.budgets:
            parts.append("--budgets " + ",".join(map(budget_text, self.budgets)))
        if self.designs != base.designs:
            parts.append("--designs " + ",".join(self.designs))
        for name in ("metric", "seq_len", "windows", "calibration_sequences", "calibration_seq_len", "residual"):
            if getattr(self, name) != getattr(base, name):
                parts.append(f"--{name.replace('_', '-')} {getattr(self, name)}")
        parts.append(f"--out {_quote(Path(out_dir).as_posix())}")
        return " ".join(parts)

    def kv_splits(self, budget: float) -> list[tuple[int, int]]:
        """Every ``(key_bits, value_bits)`` with ``k != v``, ``|k - v| <= split_max_gap``, mean ``budget``,
        widths in the bit set; keys-wider first."""
        total = 2 * budget
        if not float(total).is_integer():
            return []
        pairs = [(k, int(total) - k) for k in self.bitset]
        pairs = [(k, v) for k, v in pairs if v in self.bitset and k != v and abs(k - v) <= self.split_max_gap]
        return sorted(pairs, key=lambda kv: (kv[0] < kv[1], abs(kv[0] - kv[1])))


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------
def _bits_to_json(bits: np.ndarray) -> dict:
    return {kind: np.asarray(bits[k]).astype(int).tolist() for k, kind in enumerate(KINDS)}


def _bits_from_json(d: dict) -> np.ndarray:
    if not isinstance(d, dict) or set(d) != set(KINDS):
        raise RateQuantError("compare results: bits must be an object with 'key' and 'value'")
    return np.array([d[kind] for kind in KINDS], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class MethodResult:
    """One evaluated condition: a method at a budget with a design (``design``/``budget`` None where they do
    not apply: full precision; rank methods have no design).

    ``ppl``: perplexity; ``kl``: mean per-token KL(p_full || p_method) in nats; ``avg_bits``: stored code
    bits per element of the original head (metadata excluded); ``kv_bytes_per_token``: true bytes per token
    of the whole KV cache at ``context_tokens`` (codes, metadata, residual buffer). ``window_nll`` is the mean
    next-token NLL of each evaluation window (for paired comparisons). ``bits`` ``[2, L, H]`` is kept for the
    allocators whose widths vary (layerwise, ratequant, mismatched).
    """

    method: str
    label: str
    design: str | None
    budget: float | None
    ppl: float
    kl: float
    avg_bits: float
    kv_bytes_per_token: float
    window_nll: tuple[float, ...]
    seconds: float
    details: dict = field(default_factory=dict)
    bits: np.ndarray | None = None

    def to_dict(self) -> dict:
        d = {
            "method": self.method, "label": self.label, "design": self.design, "budget": self.budget,
            "ppl": self.ppl, "kl": self.kl, "avg_bits": self.avg_bits, "kv_bytes_per_token": self.kv_bytes_per_token,
            "window_nll": list(self.window_nll), "seconds": self.seconds, "details": self.details,
        }
        if self.bits is not None:
            d["bits"] = _bits_to_json(self.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MethodResult:
        try:
            return cls(
                method=d["method"], label=d["label"], design=d["design"], budget=d["budget"], ppl=float(d["ppl"]),
                kl=float(d["kl"]), avg_bits=float(d["avg_bits"]), kv_bytes_per_token=float(d["kv_bytes_per_token"]),
                window_nll=tuple(float(x) for x in d["window_nll"]), seconds=float(d["seconds"]),
                details=dict(d.get("details", {})), bits=_bits_from_json(d["bits"]) if "bits" in d else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RateQuantError(f"compare results: malformed method record ({exc})") from exc


@dataclass(frozen=True, eq=False)
class DesignResult:
    """A quantizer design's fitted distortion model on the shared calibration statistics.

    ``measured`` ``[2, L, H, nb]`` is the distortion table at ``fit.bitset``; ``r2`` the pooled R^2 in log
    space, ``r2_worst`` the lowest per-component R^2; ``seconds`` the time to measure and fit.
    """

    name: str
    quantizer: dict
    fit: DistortionFit
    measured: np.ndarray
    mismatch_source: str | None
    seconds: dict

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
            "name": self.name, "quantizer": self.quantizer, "beta_key": self.beta_key, "beta_value": self.beta_value,
            "r2": self.r2, "r2_worst": float(self.fit.r2.min()), "worst_residual": self.fit.worst_residual,
            "mismatch_source": self.mismatch_source, "seconds": self.seconds, "fit": self.fit.to_dict(),
            "measured": {kind: self.measured[k].tolist() for k, kind in enumerate(KINDS)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> DesignResult:
        try:
            return cls(name=d["name"], quantizer=d["quantizer"], fit=DistortionFit.from_dict(d["fit"]),
                       measured=np.array([d["measured"][kind] for kind in KINDS], dtype=np.float64),
                       mismatch_source=d["mismatch_source"], seconds=dict(d["seconds"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RateQuantError(f"compare results: malformed design record ({exc})") from exc


@dataclass(frozen=True, eq=False)
class CompareResults:
    """Everything one comparison measured; :meth:`to_dict` is the report's JSON (``results.json``)."""

    config: CompareConfig
    model: dict
    corpus: dict
    evaluation: dict
    designs: dict[str, DesignResult]
    methods: tuple[MethodResult, ...]
    skipped: tuple[dict, ...]
    rank: dict
    timings: dict
    environment: dict

    @property
    def full_precision(self) -> MethodResult:
        return next(m for m in self.methods if m.method == FULL_PRECISION)

    def select(self, *, method: str | None = None, design: str | None = "any", budget: float | None = None) -> list[MethodResult]:
        """Records matching ``method``, ``design`` (``"any"``: every design; None: design-independent) and ``budget``."""
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

    def best_fixed(self, design: str, budget: float) -> MethodResult | None:
        """The lowest-perplexity fixed scheme (uniform or a key/value split) of ``design`` at ``budget``."""
        fixed = [m for m in self.select(design=design, budget=budget) if m.method in FIXED_METHODS]
        return min(fixed, key=lambda m: m.ppl) if fixed else None

    def recovered(self) -> list[dict]:
        """Share of the quantization damage each allocator recovers relative to the best fixed scheme.

        ``share = (PPL_best_fixed - PPL_method) / (PPL_best_fixed - PPL_full)`` (1: all the damage of the best
        fixed scheme removed; 0: no better; negative: worse); ``kl_share`` likewise on KL. ``delta_log_ppl``
        is ``log PPL_best_fixed - log PPL_method`` (positive: the method wins) and ``se`` its standard error
        over the evaluation windows (paired; None with one window).
        """
        fp = self.full_precision
        rows = []
        for design in self.config.designs:
            for budget in self.config.budgets:
                best = self.best_fixed(design, budget)
                if best is None:
                    continue
                for m in self.select(design=design, budget=budget):
                    if m.method not in ALLOCATED_METHODS:
                        continue
                    damage, kl_damage = best.ppl - fp.ppl, best.kl - fp.kl
                    diff = np.asarray(best.window_nll) - np.asarray(m.window_nll)
                    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else None
                    rows.append({
                        "design": design, "budget": budget, "method": m.method, "label": m.label, "ppl": m.ppl,
                        "best_fixed": best.label, "best_fixed_ppl": best.ppl, "full_precision_ppl": fp.ppl,
                        "share": (best.ppl - m.ppl) / damage if damage > 0 else None,
                        "kl_share": (best.kl - m.kl) / kl_damage if kl_damage > 0 else None,
                        "delta_log_ppl": float(diff.mean()), "se": se,
                    })
        return rows

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "compare",
            "config": self.config.to_dict(),
            "model": self.model,
            "corpus": self.corpus,
            "evaluation": self.evaluation,
            "full_precision": self.full_precision.to_dict(),
            "designs": {name: d.to_dict() for name, d in self.designs.items()},
            "results": [m.to_dict() for m in self.methods],
            "recovered": self.recovered(),
            "skipped": list(self.skipped),
            "rank": self.rank,
            "timings": self.timings,
            "environment": self.environment,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CompareResults:
        if not isinstance(d, dict) or d.get("kind") != "compare":
            raise RateQuantError("not a ratequant compare results file (kind is not 'compare')")
        if d.get("format_version") != FORMAT_VERSION:
            raise RateQuantError(
                f"compare results format_version {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        try:
            return cls(
                config=CompareConfig.from_dict(d["config"]), model=d["model"], corpus=d["corpus"],
                evaluation=d["evaluation"],
                designs={name: DesignResult.from_dict(v) for name, v in d["designs"].items()},
                methods=tuple(MethodResult.from_dict(m) for m in d["results"]), skipped=tuple(d["skipped"]),
                rank=d["rank"], timings=d["timings"], environment=d["environment"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise RateQuantError(f"compare results: malformed file ({exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> CompareResults:
        return cls.from_dict(read_json(path, what="compare results"))


# ---------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------
class Progress:
    """One line per stage on standard error, prefixed with the time since the run started."""

    def __init__(self, enabled: bool, start: float | None = None):
        self.enabled = enabled
        self.start = time.perf_counter() if start is None else start

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class _Condition:
    """A condition to evaluate, before it is evaluated."""

    method: str
    label: str
    design: str | None
    budget: float | None
    avg_bits: float
    kv_bytes_per_token: float
    factory: object
    details: dict
    bits: np.ndarray | None = None


def pick_mismatch_sources(fits: dict[str, DistortionFit]) -> dict[str, str | None]:
    """For each design, the other design whose ``(beta_key, beta_value)`` is farthest (Euclidean) from its own."""
    out: dict[str, str | None] = {}
    for name, fit in fits.items():
        others = [(math.hypot(fit.beta_key - o.beta_key, fit.beta_value - o.beta_value), other)
                  for other, o in fits.items() if other != name]
        out[name] = max(others)[1] if others else None
    return out


def hybrid_rank(budget_bits_per_token: float, quantizer, coefficient_bits: int, head_dim: int) -> int:
    """Largest ``r <= head_dim`` whose ``r`` coefficients at ``coefficient_bits``, quantized by ``quantizer``
    *with its per-token metadata*, fit ``budget_bits_per_token`` bits (both kinds must fit)."""
    for r in range(head_dim, 0, -1):
        cost = max(quantizer.bits_per_token(r, coefficient_bits, kind) for kind in KINDS)
        if cost <= budget_bits_per_token + 1e-9:
            return r
    return 0


def _quantized_conditions(config: CompareConfig, loaded: LoadedModel, design: str, fit: DistortionFit,
                          fits: dict[str, DistortionFit], source: str | None, skipped: list) -> list[_Condition]:
    from ratequant.quantizers import get_quantizer
    from ratequant.simulate import simulated_quantization

    geometry, model = loaded.geometry, loaded.model
    quantizer = get_quantizer(design)
    cost = CostModel.from_quantizer(quantizer, geometry, residual_length=config.residual,
                                    context_tokens=config.context_tokens, kv_dtype_bytes=loaded.dtype.itemsize,
                                    bitset=config.bitset)
    options = dict(bitset=config.bitset, cost_model=cost)
    # allocators choose among the informative widths of the design whose curves they use
    # (ratequant.pipeline.informative_widths); fixed schemes are evaluated at the widths they name
    allocated = dict(options, bitset=tuple(b for b in config.bitset if b in fit.bitset))
    conditions = []

    def add(method: str, label: str, budget: float, make) -> None:
        start = time.perf_counter()
        try:
            alloc: Allocation = make()
        except BudgetError as exc:
            skipped.append({"method": method, "label": label, "design": design, "budget": budget, "reason": str(exc)})
            return
        bits = alloc.bits

        def factory(bits=bits):
            return simulated_quantization(model, bits, quantizer, config.residual)

        details = {"allocation_seconds": time.perf_counter() - start, "quantizer": quantizer.to_config(),
                   "residual": config.residual, "context_tokens": config.context_tokens,
                   "predicted_distortion": alloc.predicted_distortion}
        if "split" in alloc.details:
            details["split"] = alloc.details["split"]
        if method == "mismatched":
            details["source_design"] = source
        keep = bits if method in ALLOCATED_METHODS else None
        conditions.append(_Condition(method, label, design, budget, alloc.avg_bits, float(alloc.bytes_per_token),
                                     factory, details, keep))

    for budget_value in config.budgets:
        budget = Budget.avg_bits(budget_value)
        if float(budget_value).is_integer() and int(budget_value) in config.bitset:
            add("uniform", f"uniform {budget_text(budget_value)}", budget_value,
                lambda: ALLOCATORS["uniform"](fit, budget, geometry, **options))
        else:
            skipped.append({"method": "uniform", "label": "uniform", "design": design, "budget": budget_value,
                            "reason": f"{budget_text(budget_value)} is not a width in {list(config.bitset)}"})
        for k, v in config.kv_splits(budget_value):
            add("kv-split", f"K{k}V{v}", budget_value,
                lambda k=k, v=v: ALLOCATORS["kv-split"](fit, budget, geometry, key_bits=k, value_bits=v, **options))
        add("layerwise", "layerwise", budget_value, lambda: ALLOCATORS["layerwise"](fit, budget, geometry, **allocated))
        add("ratequant", "RateQuant", budget_value, lambda: ALLOCATORS["ratequant"](fit, budget, geometry, **allocated))
        if source is None:
            skipped.append({"method": "mismatched", "label": "mismatched", "design": design, "budget": budget_value,
                            "reason": "needs a second design whose curves to use"})
        else:
            add("mismatched", f"mismatched ({source} curves)", budget_value,
                lambda: ALLOCATORS["mismatched"](fits[source], budget, geometry, source_design=source,
                                                 **dict(options, bitset=fits[source].bitset)))
    return conditions


def _rank_conditions(config: CompareConfig, loaded: LoadedModel, bases) -> tuple[list[_Condition], dict]:
    from ratequant.quantizers import get_quantizer
    from ratequant.rank import rank_for_bits, simulated_rank_reduction

    g: Geometry = loaded.geometry
    model, d, n = loaded.model, g.head_dim, g.num_components
    hybrid = get_quantizer(config.hybrid_design)
    conditions, info = [], {}

    def basis_bytes(r: int) -> int:
        return n * (d + d * r) * 2  # mean + r directions per component, float16: a per-model constant

    for budget in config.budgets:
        bits_per_token = budget * d
        r = rank_for_bits(bits_per_token, coefficient_bits=16)
        r_h = hybrid_rank(bits_per_token, hybrid, config.hybrid_bits, d)
        hb = config.hybrid_bits

        def quantize(c, hb=hb):
            return hybrid.fake_quantize(c, hb, "value")

        conditions.append(_Condition(
            "rank", f"rank {r} (16-bit)", None, budget, r * 16 / d, n * r * 2.0,
            lambda r=r: simulated_rank_reduction(model, bases, r),
            {"rank": r, "coefficient_bits": 16, "basis_bytes": basis_bytes(r)},
        ))
        hybrid_bytes = sum(hybrid.bits_per_token(r_h, hb, kind) for kind in KINDS) / 8 * (n // 2) if r_h else 0.0
        conditions.append(_Condition(
            "rank+quant", f"rank {r_h} + {config.hybrid_design} {hb}-bit", None, budget, r_h * hb / d, hybrid_bytes,
            lambda r_h=r_h: simulated_rank_reduction(model, bases, r_h, quantize=quantize if r_h else None),
            {"rank": r_h, "coefficient_bits": hb, "coefficient_design": config.hybrid_design,
             "basis_bytes": basis_bytes(r_h)},
        ))
        info[budget_text(budget)] = {"rank": r, "hybrid_rank": r_h, "bits_per_token_per_component": bits_per_token}
    return conditions, info


def run_compare(loaded: LoadedModel, corpus: Corpus, config: CompareConfig, progress: bool | Progress = True) -> CompareResults:
    """Run every method of ``config`` on ``loaded`` and ``corpus``; see the module docstring.

    Calibration statistics (keys, values and loss gradients on ``calibration_sequences`` windows of the
    calibration split) are captured once; each design's distortion table is measured and fitted on them.
    Every condition is then scored on the same ``windows`` evaluation windows against one full-precision
    reference pass per window (:func:`ratequant.evaluation.divergence.evaluate_conditions`).
    """
    from ratequant.evaluation.divergence import evaluate_conditions
    from ratequant.pipeline import collect_statistics, fit_design
    from ratequant.quantizers import get_quantizer
    from ratequant.rank import RankBases

    if not isinstance(config, CompareConfig):
        raise RateQuantError(f"config must be a CompareConfig, got {type(config).__name__}")
    say = progress if isinstance(progress, Progress) else Progress(bool(progress))
    progress = say.enabled
    started = time.perf_counter()
    g = loaded.geometry
    say(f"compare: {loaded.name} on {corpus.name}; designs {', '.join(config.designs)}; budgets "
        f"{', '.join(map(budget_text, config.budgets))} bits; {config.windows} evaluation windows of {config.seq_len} tokens")
    windows = token_windows(loaded.tokenizer, corpus.evaluation, config.seq_len, config.windows)
    if windows.shape[0] < config.windows:
        say(f"  the evaluation split holds only {windows.shape[0]} windows of {config.seq_len} tokens; using them all")

    timings: dict = {}
    t = time.perf_counter()
    stats = collect_statistics(loaded, corpus, seq_len=config.calibration_seq_len,
                               sequences=config.calibration_sequences, gradients=config.metric == "fisher",
                               queries=config.metric == "attention")
    timings["capture"] = time.perf_counter() - t
    say(f"calibration capture: {stats.keys.shape[1]} sequence(s), {stats.token_count} tokens, metric {config.metric} "
        f"({timings['capture']:.1f} s)")

    fits, tables, seconds = {}, {}, {}
    for design in config.designs:
        table, fit, phases = fit_design(stats, get_quantizer(design), metric=config.metric, bitset=config.bitset)
        fits[design], tables[design], seconds[design] = fit, table, phases
        say(f"{design}: distortion measured and fitted ({sum(phases.values()):.1f} s): beta key {fit.beta_key:.2f}, "
            f"value {fit.beta_value:.2f}, R^2 {fit.r2_overall:.3f}")
    sources = pick_mismatch_sources(fits)

    t = time.perf_counter()
    bases = RankBases.fit(stats.keys, stats.values, stats.attention_mask)
    timings["rank_bases"] = time.perf_counter() - t
    calibration_tokens = int(stats.token_count)
    del stats

    t = time.perf_counter()
    skipped: list[dict] = []
    conditions: list[_Condition] = []
    for design in config.designs:
        conditions += _quantized_conditions(config, loaded, design, fits[design], fits, sources[design], skipped)
    rank_conditions, rank_info = _rank_conditions(config, loaded, bases)
    conditions += rank_conditions
    timings["allocation"] = time.perf_counter() - t
    say(f"allocations: {len(conditions)} conditions ({timings['allocation']:.1f} s); rank bases "
        f"({timings['rank_bases']:.1f} s); {len(skipped)} skipped")
    timings["calibration"] = {
        "capture": timings["capture"],
        "per_design": {d: sum(seconds[d].values()) for d in config.designs},
        "rank_bases": timings["rank_bases"],
    }

    keys = [f"{i}:{c.label}" for i, c in enumerate(conditions)]
    factories = dict(zip(keys, (c.factory for c in conditions)))
    n_windows = windows.shape[0]
    nll = {k: [] for k in [FULL_PRECISION, *keys]}
    kl_sum = dict.fromkeys(nll, 0.0)
    secs = dict.fromkeys(nll, 0.0)
    t = time.perf_counter()
    for i in range(n_windows):
        scores = evaluate_conditions(loaded.model, windows[i:i + 1], factories, progress=progress)
        for k, r in scores.items():
            nll[k].append(r.nll / r.tokens)
            kl_sum[k] += r.kl * r.tokens
            secs[k] += r.seconds
        elapsed = time.perf_counter() - t
        say(f"evaluation: window {i + 1}/{n_windows} ({len(keys) + 1} passes; ETA {elapsed / (i + 1) * (n_windows - i - 1):.0f} s); "
            f"full precision PPL so far {math.exp(np.mean(nll[FULL_PRECISION])):.3f}")
    timings["evaluation"] = time.perf_counter() - t
    tokens = n_windows * (windows.shape[1] - 1)

    def record(key: str, c: _Condition) -> MethodResult:
        return MethodResult(method=c.method, label=c.label, design=c.design, budget=c.budget,
                            ppl=math.exp(float(np.mean(nll[key]))), kl=kl_sum[key] / tokens, avg_bits=c.avg_bits,
                            kv_bytes_per_token=c.kv_bytes_per_token, window_nll=tuple(nll[key]), seconds=secs[key],
                            details=c.details, bits=c.bits)

    itemsize = loaded.dtype.itemsize
    fp = _Condition(FULL_PRECISION, "full precision", None, None, 8.0 * itemsize,
                    float(g.num_components * g.head_dim * itemsize), None,
                    {"dtype": str(loaded.dtype).removeprefix("torch."),
                     "fp16_kv_bytes_per_token": g.num_components * g.head_dim * 2})
    methods = (record(FULL_PRECISION, fp), *(record(k, c) for k, c in zip(keys, conditions)))
    timings["total"] = time.perf_counter() - started

    designs = {
        name: DesignResult(name=name, quantizer=get_quantizer(name).to_config(), fit=fits[name],
                           measured=np.asarray(tables[name].values[..., [tables[name].bitset.index(b) for b in fits[name].bitset]],
                                               dtype=np.float64),
                           mismatch_source=sources[name], seconds=seconds[name])
        for name in config.designs
    }
    results = CompareResults(
        config=config,
        model=loaded.describe(),
        corpus=corpus.describe(),
        evaluation={"split": "evaluation", "seq_len": int(windows.shape[1]), "windows": int(n_windows),
                    "tokens": int(tokens), "calibration_tokens": calibration_tokens},
        designs=designs,
        methods=methods,
        skipped=tuple(skipped),
        rank={"per_budget": rank_info, "hybrid_design": config.hybrid_design, "hybrid_bits": config.hybrid_bits,
              "matching": "r * 16 <= budget * head_dim bits per token and component (rank); the hybrid's coefficients "
                          "plus its per-token metadata fit the same bits (rank+quant); bases are a per-model constant"},
        timings=timings,
        environment={"ratequant_version": __version__, "torch_version": torch.__version__,
                     "threads": torch.get_num_threads(), "device": str(loaded.device)},
    )
    say(f"done in {timings['total']:.0f} s (evaluation {timings['evaluation']:.0f} s)")
    return results


__all__ = [
    "CompareConfig",
    "CompareResults",
    "DEFAULT_BUDGETS",
    "DEFAULT_DESIGNS",
    "DesignResult",
    "FORMAT_VERSION",
    "MethodResult",
    "QUICK_SIZES",
    "hybrid_rank",
    "pick_mismatch_sources",
    "run_compare",
]
