"""The configuration of ``ratequant compare``: every budget, design and evaluation setting of one run.

:class:`CompareConfig` is a versioned dataclass saved beside the results (``config.json``), so that
``ratequant compare --config config.json`` repeats a run exactly; :meth:`CompareConfig.command` gives the
shorter command line that made it.

One module of this size because it is one versioned dataclass, its validation and its presets.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ratequant.allocation import Budget
from ratequant.allocation.cost import DEFAULT_WIDTHS
from ratequant.calibration.settings import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_SEQUENCES,
    DEFAULT_SEARCH_TOKENS,
    CalibrationSettings,
)
from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import BOS_CHOICES, DEFAULT_SCORING, DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from ratequant.evaluation.tasks import TASKS
from ratequant.jsonio import JsonDocument
from ratequant.measure.distortion import DEFAULT_METRIC, METRICS
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, DEFAULT_RESIDUAL_LENGTH, MAX_SINK_TOKENS
from ratequant.validation import check_bitset, check_choice, check_int, finite_real

FORMAT_VERSION = 2
DEFAULT_DESIGNS = ("kivi", "quarot", "turbo", "uniform")
DEFAULT_BUDGETS = (2.0, 2.5, 3.0, 4.0)
PRESETS = ("default", "quick", "full")
QUICK_SIZES = dict(
    budgets=(2.5, 3.0), seq_len=512, windows=3, calibration_seq_len=DEFAULT_CALIBRATION_SEQ_LEN, calibration_sequences=2
)
"""What ``--quick`` (and ``make demo``) runs: 2 budgets, 3 evaluation windows of 512 tokens (the second half of
each scored), 2 calibration sequences of 512 tokens, every design. About four minutes on the project's 2-core CPU
for the default model (4 min 32 s on a quiet day, 8 min on a slow one, 2026-12); the report
gives the standard errors that say how much of a difference is noise."""
FULL_SIZES = dict(
    budgets=(2.0, 2.5, 3.0),
    seq_len=2048,
    windows=2,
    calibration_seq_len=DEFAULT_CALIBRATION_SEQ_LEN,
    calibration_sequences=DEFAULT_CALIBRATION_SEQUENCES,
    residual=DEFAULT_RESIDUAL_LENGTH,
    sink_tokens="auto",
    eval_corpora=("fortunes",),
    side_windows=1,
    passkey_context=DEFAULT_CONTEXT_TOKENS,
    peers=("norms",),
    headroom_designs=("kivi", "quarot", "turbo"),
    headroom_tokens=128,
    headroom_max_bits=4,
    sink_study=(0, 1, 4),
    passkey_budgets=(2.0, 2.5),
)
"""What ``--full`` (and ``make results``) runs: ``docs/results.md``. Two 2048-token windows with the cache's
real 128-token residual window and sink tokens, budgets 2, 2.5 and 3 bits, the second corpus and the sink
study on one window, the measured-damage headroom of three designs (128 tokens), passkey retrieval at 4096
tokens for full precision, uniform 2-bit and RateQuant 2.5-bit. On the project's 2-core CPU: the headroom takes
3.5 to 8 min per design, then 93 methods are scored on 186 main, 93 second-corpus and 44 sink-study passes of a
2048-token window (9-18 s each, depending on the machine's day): 1 h 10 min (measured for the README's run) to
2 h 15 min in all.
``--windows``/``--side-windows``/``--budgets`` raise the evidence at a proportional cost."""
SCORINGS = ("all", "second-half")
MODES = ("simulated", "streaming")


LIST_FIELDS = (
    "budgets",
    "methods",
    "designs",
    "bitset",
    "eval_corpora",
    "passkey_depths",
    "passkey_budgets",
    "long_context_tasks",
    "peers",
    "headroom_designs",
    "sink_study",
)
PEERS = ("norms", "hqq")
"""``norms``: layer-wise K/V widths from the weight norms; ``hqq``: transformers' ``QuantizedCache`` with the HQQ
backend at 2 bits in the long-context study (needs the ``hqq`` package: ``pip install -e '.[bench]'``)."""
SCALAR_FLAGS = (
    "metric",
    "seq_len",
    "windows",
    "bos",
    "scoring",
    "calibration_sequences",
    "calibration_seq_len",
    "residual",
    "sink_tokens",
    "mode",
    "prefill_chunk",
    "passkey_context",
    "passkey_trials",
    "side_windows",
    "search_proposals",
    "search_tokens",
)
"""Fields the command line sets with ``--name value`` (see :meth:`CompareConfig.command`)."""
LIST_FLAGS = ("peers", "headroom_designs", "sink_study", "passkey_depths", "long_context_tasks")
"""List fields the command line sets with ``--flag a,b,...``."""
EXPERIMENT_FIELDS = ("budgets", "designs", *SCALAR_FLAGS, "eval_corpora", *LIST_FLAGS)
"""Every field ``ratequant compare`` sets from an option (refused beside ``--config``)."""
_FLAG_NAMES = {"eval_corpora": "--eval-corpus", "headroom_designs": "--headroom", "search_proposals": "--search"}


FULL_PRECISION = "full-precision"
FIXED_METHODS = ("uniform", "kv-split")
ALLOCATED_METHODS = (
    "layerwise",
    "ratequant",
    "default",
    "auto",
    "mismatched",
    "ratequant-search",
    "norms",
    "ratequant-component",
    "measured",
)
"""Methods that choose widths from curves (or refine them, or choose among candidates: ``default`` and ``auto``,
:mod:`ratequant.lab.choice`); the last four run when asked for."""
QUANTIZED_METHODS = (*FIXED_METHODS, *ALLOCATED_METHODS)
RANK_METHODS = ("rank", "rank+quant")
METHODS = (*QUANTIZED_METHODS, *RANK_METHODS)
"""Every method a comparison can score (:attr:`CompareConfig.methods` picks among them)."""


def flag_of(field: str) -> str:
    """The command-line option of a config field: ``"seq_len"`` -> ``"--seq-len"``."""
    return _FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def budget_text(budget: float) -> str:
    """``2.5`` -> ``"2.5"``, ``3.0`` -> ``"3"`` (as budgets appear in labels, file names and JSON keys)."""
    return f"{budget:g}"


@dataclass(frozen=True)
class CompareConfig(JsonDocument):
    """Everything that decides a comparison besides the device; saved beside the results (``config.json``).

    ``model``/``corpus`` are the specs the command line loads (``"default"``, a path, a hub id, ...);
    :func:`run_compare` itself uses the model and corpus it is given and records their names and hashes.
    ``seq_len``/``windows`` size the evaluation (non-overlapping windows of the evaluation split, starting with
    BOS as ``bos`` says: ``"auto"`` follows the tokenizer); both whole-window and second-half scores are
    computed, ``scoring`` names the headline one. ``calibration_seq_len``/``calibration_sequences`` size the
    calibration capture. ``residual`` is the full-precision residual window the cache keeps (0: quantize every
    whole chunk, as the papers' figures do) and ``sink_tokens`` the first tokens it keeps at full precision;
    ``mode`` evaluates with simulated quantization or through the real cache (``streaming``, prefilled
    ``prefill_chunk`` tokens at a time; default the quantization chunk); ``context_tokens`` is the context at
    which true bytes per token are stated. ``sink_tokens="auto"`` chooses the sinks of every design from the
    calibration data. ``eval_corpora`` are further corpora whose evaluation split every method is also scored
    on (calibration stays on ``corpus``). ``peers`` adds peer baselines (``"norms"``: layer-wise K/V widths from
    the weight norms, as spectral-kv / ``kvq``). For the designs of ``headroom_designs`` two diagnostics run: the
    allocation on every component's *measured* damage (``headroom_tokens`` calibration tokens, widths up to
    ``headroom_max_bits``, :mod:`ratequant.measure.headroom`) and RateQuant with a beta per component.
    ``passkey_context`` (None: off) runs the retrieval tasks ``long_context_tasks`` (passkey and the RULER-style
    tasks of :data:`ratequant.evaluation.tasks.TASKS`) at that many tokens through the real cache, ``passkey_depths``
    x ``passkey_trials`` prompts each, for full precision and, at each of ``passkey_budgets``, the best fixed
    scheme, RateQuant and the default plan of ``focus_design`` (:mod:`ratequant.lab.long_context`);
    ``sink_study`` re-scores the fixed schemes and RateQuant of ``focus_design`` with each of these sink counts,
    with and without BOS.
    ``side_windows`` (None: ``windows``) is how many windows the side evaluations use: the ``eval_corpora`` and
    the sink study (the headline evaluation always uses ``windows``). ``search_proposals`` > 0 adds
    ``ratequant-search`` to every design and budget: RateQuant's widths refined by that many one-bit moves on
    the KL they cause on ``search_tokens`` tokens of calibration text, kept only if they also help on a second
    window (:func:`ratequant.calibration.pipeline.refine_allocation`; slow: a simulated forward pass per move).
    ``methods`` (None: all) limits the methods scored to those named (e.g. ``["uniform", "kv-split", "ratequant",
    "default", "auto"]``), for long runs on large models. ``choice_tokens`` is the length of the held-out
    calibration window on which the ``default`` and ``auto`` plans are chosen (None: as ``calibrate`` chooses,
    :func:`ratequant.calibration.candidates.choice_tokens_for`).
    """

    DOCUMENT = "compare config"
    FORMAT_VERSIONS = (FORMAT_VERSION,)

    model: str = "default"
    corpus: str = "default"
    dtype: str | None = None
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    designs: tuple[str, ...] = DEFAULT_DESIGNS
    metric: str = DEFAULT_METRIC
    seq_len: int = DEFAULT_SEQ_LEN
    windows: int = DEFAULT_WINDOWS
    bos: str = "auto"
    scoring: str = DEFAULT_SCORING
    calibration_seq_len: int = DEFAULT_CALIBRATION_SEQ_LEN
    calibration_sequences: int = DEFAULT_CALIBRATION_SEQUENCES
    residual: int = 0
    sink_tokens: int | str = 0
    mode: str = "simulated"
    prefill_chunk: int | None = None
    eval_corpora: tuple[str, ...] = ()
    passkey_context: int | None = None
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_trials: int = 2
    passkey_budgets: tuple[float, ...] = (2.0, 2.5, 4.0)
    long_context_tasks: tuple[str, ...] = ("passkey",)
    focus_design: str = "kivi"
    peers: tuple[str, ...] = ()
    headroom_designs: tuple[str, ...] = ()
    headroom_tokens: int = 512
    headroom_max_bits: int = 5
    sink_study: tuple[int, ...] = ()
    side_windows: int | None = None
    search_proposals: int = 0
    search_tokens: int = DEFAULT_SEARCH_TOKENS
    choice_tokens: int | None = None
    methods: tuple[str, ...] | None = None
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    bitset: tuple[int, ...] = DEFAULT_WIDTHS
    split_max_gap: int = 2
    hybrid_design: str = "uniform"
    hybrid_bits: int = 4
    preset: str = "default"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        from ratequant.quantizers import available

        self.check_version(self.format_version)
        for name in ("model", "corpus"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RateQuantError(f"compare config: {name} must be a non-empty string")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise RateQuantError(
                f"compare config: dtype must be null, float32, float16 or bfloat16, got {self.dtype!r}"
            )
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
        if not all(isinstance(d, str) for d in designs):
            raise RateQuantError(f"compare config: designs must be a list of design names, got {self.designs!r}")
        if not designs or len(set(designs)) != len(designs):
            raise RateQuantError(
                f"compare config: designs must be a non-empty list without repeats, got {self.designs!r}"
            )
        for d in (*designs, self.hybrid_design, self.focus_design, *self.headroom_designs):
            if not isinstance(d, str) or d not in known:
                raise RateQuantError(f"compare config: unknown quantizer design {d!r}; choose from {', '.join(known)}")
        object.__setattr__(self, "designs", designs)
        if self.metric not in METRICS:
            raise RateQuantError(f"compare config: unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        for name, low in (
            ("seq_len", 2),
            ("windows", 1),
            ("calibration_seq_len", 2),
            ("calibration_sequences", 1),
            ("residual", 0),
            ("context_tokens", 1),
            ("split_max_gap", 1),
            ("hybrid_bits", 1),
            ("passkey_trials", 1),
            ("headroom_tokens", 2),
            ("headroom_max_bits", 1),
            ("search_proposals", 0),
            ("search_tokens", 2),
        ):
            object.__setattr__(self, name, check_int(getattr(self, name), f"compare config: {name}", lo=low))
        for name in ("prefill_chunk", "passkey_context", "side_windows", "choice_tokens"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), f"compare config: {name}", lo=1, hi=1 << 20)
        if self.sink_tokens != "auto":
            sinks = check_int(
                self.sink_tokens, "compare config: sink_tokens ('auto' or a count)", lo=0, hi=MAX_SINK_TOKENS
            )
            object.__setattr__(self, "sink_tokens", sinks)
        object.__setattr__(self, "peers", tuple(self.peers))
        if any(p not in PEERS for p in self.peers):
            raise RateQuantError(f"compare config: peers must be among {', '.join(PEERS)}, got {self.peers!r}")
        study = tuple(self.sink_study)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SINK_TOKENS for v in study):
            raise RateQuantError(f"compare config: sink_study must be sink-token counts, got {self.sink_study!r}")
        object.__setattr__(self, "sink_study", tuple(sorted(set(study))))
        object.__setattr__(self, "headroom_designs", tuple(self.headroom_designs))
        check_choice(self.bos, "compare config: bos", BOS_CHOICES, error=RateQuantError)
        check_choice(self.scoring, "compare config: scoring", SCORINGS)
        check_choice(self.mode, "compare config: mode", MODES)
        corpora = tuple(self.eval_corpora)
        if not all(isinstance(c, str) and c for c in corpora) or len(set(corpora)) != len(corpora):
            raise RateQuantError(
                f"compare config: eval_corpora must be distinct corpus names, got {self.eval_corpora!r}"
            )
        object.__setattr__(self, "eval_corpora", corpora)
        depths = tuple(self.passkey_depths)
        if not depths or not all(finite_real(d) and 0 <= d <= 1 for d in depths):
            raise RateQuantError(
                f"compare config: passkey_depths must be numbers in [0, 1], got {self.passkey_depths!r}"
            )
        object.__setattr__(self, "passkey_depths", tuple(float(d) for d in depths))
        pk = tuple(self.passkey_budgets)
        if not all(finite_real(b) for b in pk):
            raise RateQuantError(f"compare config: passkey_budgets must be numbers, got {self.passkey_budgets!r}")
        object.__setattr__(self, "passkey_budgets", tuple(sorted({float(b) for b in pk})))
        missing = [b for b in self.passkey_budgets if b not in self.budgets]
        if self.passkey_context is not None and missing:
            raise RateQuantError(
                f"compare config: passkey budgets {', '.join(map(budget_text, missing))} are not among the budgets "
                f"{', '.join(map(budget_text, self.budgets))}; add them to the budgets or drop them from the passkey"
            )
        tasks = tuple(self.long_context_tasks)
        retrieval = [t for t in TASKS.names() if t != "perplexity"]
        if not tasks or len(set(tasks)) != len(tasks) or any(t not in retrieval for t in tasks):
            raise RateQuantError(
                f"compare config: long_context_tasks must be distinct names among {', '.join(retrieval)}, "
                f"got {self.long_context_tasks!r}"
            )
        object.__setattr__(self, "long_context_tasks", tasks)
        if self.hybrid_bits > 8:
            raise RateQuantError(f"compare config: hybrid_bits must be 1..8, got {self.hybrid_bits}")
        if self.context_tokens <= self.residual:
            raise RateQuantError(
                f"compare config: context_tokens ({self.context_tokens}) must exceed the residual window "
                f"({self.residual})"
            )
        if self.search_proposals:
            from ratequant.calibration import check_search_text

            check_search_text(self.search_tokens, self.residual, self.sink_tokens)
        if self.methods is not None:
            chosen = tuple(self.methods)
            unknown = [m for m in chosen if m not in METHODS]
            if not chosen or unknown:
                raise RateQuantError(
                    f"compare config: methods must be a non-empty list of {', '.join(METHODS)}, got {self.methods!r}"
                )
            object.__setattr__(self, "methods", chosen)
        if self.preset not in PRESETS:
            raise RateQuantError(f"compare config: preset must be one of {PRESETS}, got {self.preset!r}")

    @classmethod
    def quick(cls, **overrides) -> CompareConfig:
        """The ``--quick`` sizes (:data:`QUICK_SIZES`), with ``overrides`` on top."""
        return cls(**{**QUICK_SIZES, "preset": "quick", **overrides})

    @classmethod
    def full(cls, **overrides) -> CompareConfig:
        """The ``--full`` sizes (:data:`FULL_SIZES`), with ``overrides`` on top."""
        return cls(**{**FULL_SIZES, "preset": "full", **overrides})

    @classmethod
    def preset_base(cls, preset: str) -> CompareConfig:
        return {"quick": cls.quick, "full": cls.full}.get(preset, cls)()

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in LIST_FIELDS:
            d[name] = None if getattr(self, name) is None else list(getattr(self, name))
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: object) -> CompareConfig:
        d = cls.check_format(d)
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RateQuantError(f"compare config has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        kwargs = dict(d)
        for name in LIST_FIELDS:
            if name in kwargs and not (name == "methods" and kwargs[name] is None):
                if not isinstance(kwargs[name], list):
                    raise RateQuantError(f"compare config: {name} must be a list")
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def command(self, out_dir: str | Path) -> str:
        """The ``ratequant compare`` command line that makes this configuration (options that differ from its
        preset only), or where no options can (a field without one, or one turned off that its preset turns
        on), the ``--config`` line that repeats it from the ``config.json`` saved in ``out_dir``."""
        base = CompareConfig.preset_base(self.preset)
        out = Path(out_dir).as_posix()
        flagged = {"model", "corpus", "dtype", "budgets", "designs", "eval_corpora", *SCALAR_FLAGS, *LIST_FLAGS}
        differs = [f.name for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)]
        if any(name not in flagged or getattr(self, name) in (None, ()) for name in differs):
            return f"ratequant compare --config {out}/config.json --out {out}"
        parts = ["ratequant compare"]
        if self.preset != "default":
            parts.append(f"--{self.preset}")
        for name, flag in (("model", "--model"), ("corpus", "--corpus"), ("dtype", "--dtype")):
            if name in differs:
                parts.append(f"{flag} {shlex.quote(str(getattr(self, name)))}")
        if "budgets" in differs:
            parts.append("--budgets " + ",".join(map(budget_text, self.budgets)))
        if "designs" in differs:
            parts.append("--designs " + ",".join(self.designs))
        for name in SCALAR_FLAGS:
            if name in differs:
                parts.append(f"{flag_of(name)} {getattr(self, name)}")
        for corpus in self.eval_corpora if "eval_corpora" in differs else ():
            parts.append(f"--eval-corpus {shlex.quote(corpus)}")
        for name in LIST_FLAGS:
            if name in differs:
                parts.append(f"{flag_of(name)} {','.join(map(str, getattr(self, name)))}")
        parts.append(f"--out {shlex.quote(out)}")
        return " ".join(parts)

    def calibration_settings(
        self, design: str, budget: Budget, sink_tokens: int | str | None = None
    ) -> CalibrationSettings:
        """The :class:`~ratequant.calibration.CalibrationSettings` that ``calibrate`` would use for ``design`` at
        ``budget`` under this comparison (``sink_tokens``: the count chosen for the design, default the config's):
        the one place where compare's names (``residual``, ``calibration_seq_len``, ...) become calibration's."""
        return CalibrationSettings(
            quantizer=design,
            budget=budget,
            metric=self.metric,
            bitset=self.bitset,
            seq_len=self.calibration_seq_len,
            sequences=self.calibration_sequences,
            residual_length=self.residual,
            sink_tokens=self.sink_tokens if sink_tokens is None else sink_tokens,
            search_tokens=self.search_tokens,
            choice_tokens=self.choice_tokens,
        )

    def scores(self, method: str) -> bool:
        """Whether ``method`` is scored (every method unless ``methods`` names some)."""
        return self.methods is None or method in self.methods

    def kv_splits(self, budget: float) -> list[tuple[int, int]]:
        """Every ``(key_bits, value_bits)`` with ``k != v``, ``|k - v| <= split_max_gap``, mean ``budget``,
        widths in the bit set; keys-wider first."""
        total = 2 * budget
        if not float(total).is_integer():
            return []
        pairs = [(k, int(total) - k) for k in self.bitset]
        pairs = [(k, v) for k, v in pairs if v in self.bitset and k != v and abs(k - v) <= self.split_max_gap]
        return sorted(pairs, key=lambda kv: (kv[0] < kv[1], abs(kv[0] - kv[1])))


__all__ = [
    "ALLOCATED_METHODS",
    "FIXED_METHODS",
    "FULL_PRECISION",
    "METHODS",
    "QUANTIZED_METHODS",
    "RANK_METHODS",
    "DEFAULT_BUDGETS",
    "DEFAULT_DESIGNS",
    "FORMAT_VERSION",
    "EXPERIMENT_FIELDS",
    "PRESETS",
    "QUICK_SIZES",
    "CompareConfig",
    "budget_text",
    "flag_of",
]
