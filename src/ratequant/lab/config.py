"""The configuration of ``ratequant compare``: every budget, design and evaluation setting of one run.

:class:`CompareConfig` is a versioned dataclass saved beside the results (``config.json``), so that
``ratequant compare --config config.json`` repeats a run exactly; :meth:`CompareConfig.command` gives the
shorter command line that made it.

One module of this size because it is one versioned dataclass, its validation and its presets.
"""

from __future__ import annotations

import shlex
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from ratequant.allocation import Budget
from ratequant.calibration.settings import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_SEQUENCES,
    CalibrationSettings,
)
from ratequant.errors import RateQuantError
from ratequant.evaluation.protocol import BOS_CHOICES, DEFAULT_SCORING, DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from ratequant.evaluation.tasks import TASKS
from ratequant.jsonio import JsonDocument
from ratequant.spec import DEFAULT_CONTEXT_TOKENS, DEFAULT_RESIDUAL_LENGTH, MAX_SINK_TOKENS
from ratequant.validation import check_bitset, check_choice, check_int, finite_real

FORMAT_VERSION = 3
DEFAULT_DESIGNS = ("kivi", "quarot", "turbo", "uniform")
DEFAULT_BUDGETS = (2.0, 2.5, 3.0, 4.0)
PRESETS = ("default", "quick", "full")
CALIBRATION_OPTIONS = {
    "metric": "metric",
    "calibration_seq_len": "seq_len",
    "calibration_sequences": "sequences",
    "residual": "residual_length",
    "sink_tokens": "sink_tokens",
    "search_proposals": "search_proposals",
    "search_tokens": "search_tokens",
}
"""``ratequant compare``'s calibration options (``--residual``, ...) and the :class:`CalibrationSettings` field each
sets."""
CALIBRATION_UNFLAGGED = ("bitset", "choice_tokens")
"""Calibration settings a comparison keeps that no option of ``ratequant compare`` sets (only ``--config``)."""
CALIBRATION_FIELDS = (*CALIBRATION_OPTIONS.values(), *CALIBRATION_UNFLAGGED)
"""The calibration settings a comparison keeps (``calibration`` in ``config.json``); it sets the design and the
budget per method (:meth:`CompareConfig.calibration_settings`) and leaves every other field at its default."""
PAPER_STORAGE = dict(residual_length=0, sink_tokens=0)
"""A comparison's storage unless told otherwise: every whole chunk quantized, no sinks, as the papers' figures."""
QUICK_SIZES = dict(
    budgets=(2.5, 3.0),
    seq_len=512,
    windows=3,
    calibration=dict(seq_len=DEFAULT_CALIBRATION_SEQ_LEN, sequences=2),
)
"""What ``--quick`` (and ``make demo``) runs: 2 budgets, 3 evaluation windows of 512 tokens (the second half of
each scored), 2 calibration sequences of 512 tokens, every design. About four minutes on the project's 2-core CPU
for the default model (4 min 32 s on a quiet day, 8 min on a slow one, 2026-12); the report
gives the standard errors that say how much of a difference is noise."""
FULL_SIZES = dict(
    budgets=(2.0, 2.5, 3.0),
    seq_len=2048,
    windows=2,
    calibration=dict(
        seq_len=DEFAULT_CALIBRATION_SEQ_LEN,
        sequences=DEFAULT_CALIBRATION_SEQUENCES,
        residual_length=DEFAULT_RESIDUAL_LENGTH,
        sink_tokens="auto",
    ),
    eval_corpora=("fortunes",),
    side_windows=1,
    long_context_tokens=DEFAULT_CONTEXT_TOKENS,
    peers=("norms",),
    headroom_designs=("kivi", "quarot", "turbo"),
    headroom_tokens=128,
    headroom_max_bits=4,
    sink_study=(0, 1, 4),
    long_context_budgets=(2.0, 2.5),
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
    "eval_corpora",
    "long_context_depths",
    "long_context_budgets",
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
    "long_context_tokens",
    "long_context_trials",
    "side_windows",
    "search_proposals",
    "search_tokens",
)
"""Options the command line sets with ``--name value``: fields, or calibration options (:data:`CALIBRATION_OPTIONS`;
see :meth:`CompareConfig.command`)."""
LIST_FLAGS = ("peers", "headroom_designs", "sink_study", "long_context_depths", "long_context_tasks")
"""List fields the command line sets with ``--flag a,b,...``."""
EXPERIMENT_FIELDS = ("budgets", "designs", *SCALAR_FLAGS, "eval_corpora", *LIST_FLAGS)
"""Every option ``ratequant compare`` sets (refused beside ``--config``)."""
_FLAG_NAMES = {
    "eval_corpora": "--eval-corpus",
    "headroom_designs": "--headroom",
    "search_proposals": "--search",
    "long_context_tokens": "--long-context",
}
RENAMED_IN_V3 = {
    "passkey_context": "long_context_tokens",
    "passkey_depths": "long_context_depths",
    "passkey_trials": "long_context_trials",
    "passkey_budgets": "long_context_budgets",
}
"""Fields of format version 2 that version 3 names after the long-context study (which runs more than the passkey)."""


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
    ``seq_len``/``windows`` size the evaluation (non-overlapping windows of the evaluation split, starting with BOS
    as ``bos`` says: ``"auto"`` follows the tokenizer); both whole-window and second-half scores are computed,
    ``scoring`` names the headline one. ``calibration`` holds the calibration settings every method shares
    (:data:`CALIBRATION_FIELDS`: the capture's size, the metric, the widths, the residual window the cache keeps and
    the sinks, the search and the choice window; by default the papers' storage, :data:`PAPER_STORAGE`);
    ``calibration.sink_tokens="auto"`` chooses the sinks of every design from the calibration data. ``mode``
    evaluates with simulated quantization or through the real cache (``streaming``, prefilled ``prefill_chunk``
    tokens at a time; default the quantization chunk); ``context_tokens`` is the context at which true bytes per
    token are stated. ``eval_corpora`` are further corpora whose evaluation split every method is also scored on
    (calibration stays on ``corpus``). ``peers`` adds peer baselines (``"norms"``: layer-wise K/V widths from the
    weight norms, as spectral-kv / ``kvq``). For the designs of ``headroom_designs`` two diagnostics run: the
    allocation on every component's *measured* damage (``headroom_tokens`` calibration tokens, widths up to
    ``headroom_max_bits``, :mod:`ratequant.measure.headroom`) and RateQuant with a beta per component.
    ``long_context_tokens`` (None: off) runs the retrieval tasks ``long_context_tasks`` (passkey and the RULER-style
    tasks of :data:`ratequant.evaluation.tasks.TASKS`) at that many tokens through the real cache,
    ``long_context_depths`` x ``long_context_trials`` prompts each, for full precision and, at each of
    ``long_context_budgets``, the best fixed scheme, RateQuant and the default plan of ``focus_design``
    (:mod:`ratequant.lab.long_context`); ``sink_study`` re-scores the fixed schemes and RateQuant of
    ``focus_design`` with each of these sink counts, with and without BOS.
    ``side_windows`` (None: ``windows``) is how many windows the side evaluations use: the ``eval_corpora`` and the
    sink study (the headline evaluation always uses ``windows``). ``calibration.search_proposals`` > 0 adds
    ``ratequant-search`` to every design and budget: RateQuant's widths refined by that many one-bit moves on the KL
    they cause on ``calibration.search_tokens`` tokens of calibration text, kept only if they also help on a second
    window (:func:`ratequant.calibration.pipeline.refine_allocation`; slow: a simulated forward pass per move).
    ``methods`` (None: all) limits the methods scored to those named (e.g. ``["uniform", "kv-split", "ratequant",
    "default", "auto"]``), for long runs on large models. ``calibration.choice_tokens`` is the length of the
    held-out calibration window on which the ``default`` and ``auto`` plans are chosen (None: as ``calibrate``
    chooses, :func:`ratequant.calibration.candidates.choice_tokens_for`).
    """

    DOCUMENT = "compare config"
    FORMAT_VERSIONS = (2, FORMAT_VERSION)

    model: str = "default"
    corpus: str = "default"
    dtype: str | None = None
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    designs: tuple[str, ...] = DEFAULT_DESIGNS
    seq_len: int = DEFAULT_SEQ_LEN
    windows: int = DEFAULT_WINDOWS
    bos: str = "auto"
    scoring: str = DEFAULT_SCORING
    calibration: CalibrationSettings = field(default_factory=lambda: CalibrationSettings(**PAPER_STORAGE))
    mode: str = "simulated"
    prefill_chunk: int | None = None
    eval_corpora: tuple[str, ...] = ()
    long_context_tokens: int | None = None
    long_context_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    long_context_trials: int = 2
    long_context_budgets: tuple[float, ...] = (2.0, 2.5, 4.0)
    long_context_tasks: tuple[str, ...] = ("passkey",)
    focus_design: str = "kivi"
    peers: tuple[str, ...] = ()
    headroom_designs: tuple[str, ...] = ()
    headroom_tokens: int = 512
    headroom_max_bits: int = 5
    sink_study: tuple[int, ...] = ()
    side_windows: int | None = None
    methods: tuple[str, ...] | None = None
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
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
        if not isinstance(self.calibration, CalibrationSettings):
            raise RateQuantError(
                f"compare config: calibration must be CalibrationSettings, got {type(self.calibration).__name__}"
            )
        check_bitset(self.calibration.bitset, name="compare bitset", min_len=2)
        budgets = tuple(self.budgets)
        if not budgets or not all(finite_real(b) for b in budgets):
            raise RateQuantError(f"compare config: budgets must be a non-empty list of numbers, got {self.budgets!r}")
        budgets = tuple(sorted({float(b) for b in budgets}))
        lo, hi = self.calibration.bitset[0], self.calibration.bitset[-1]
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
        self._check_calibration()
        for name, low in (
            ("seq_len", 2),
            ("windows", 1),
            ("context_tokens", 1),
            ("split_max_gap", 1),
            ("hybrid_bits", 1),
            ("long_context_trials", 1),
            ("headroom_tokens", 2),
            ("headroom_max_bits", 1),
        ):
            object.__setattr__(self, name, check_int(getattr(self, name), f"compare config: {name}", lo=low))
        for name in ("prefill_chunk", "long_context_tokens", "side_windows"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), f"compare config: {name}", lo=1, hi=1 << 20)
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
        depths = tuple(self.long_context_depths)
        if not depths or not all(finite_real(d) and 0 <= d <= 1 for d in depths):
            raise RateQuantError(
                f"compare config: long_context_depths must be numbers in [0, 1], got {self.long_context_depths!r}"
            )
        object.__setattr__(self, "long_context_depths", tuple(float(d) for d in depths))
        pk = tuple(self.long_context_budgets)
        if not all(finite_real(b) for b in pk):
            raise RateQuantError(
                f"compare config: long_context_budgets must be numbers, got {self.long_context_budgets!r}"
            )
        object.__setattr__(self, "long_context_budgets", tuple(sorted({float(b) for b in pk})))
        missing = [b for b in self.long_context_budgets if b not in self.budgets]
        if self.long_context_tokens is not None and missing:
            raise RateQuantError(
                f"compare config: long-context budgets {', '.join(map(budget_text, missing))} are not among the "
                f"budgets {', '.join(map(budget_text, self.budgets))}; add them to the budgets or drop them from "
                "long_context_budgets"
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
        if self.context_tokens <= self.calibration.residual_length:
            raise RateQuantError(
                f"compare config: context_tokens ({self.context_tokens}) must exceed the residual window "
                f"({self.calibration.residual_length})"
            )
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

    def _check_calibration(self) -> None:
        """Refuse calibration settings a comparison does not use; then hold them for the first design and budget
        (every design's are validated here, :meth:`calibration_settings` gives them per method)."""
        stray = [
            f.name
            for f in fields(CalibrationSettings)
            if f.name not in (*CALIBRATION_FIELDS, "quantizer", "budget")
            and getattr(self.calibration, f.name) != (f.default_factory() if f.default is MISSING else f.default)
        ]
        if stray:
            raise RateQuantError(
                f"compare config: a comparison sets calibration's {', '.join(stray)} itself (or not at all); leave "
                "them at their defaults"
            )
        budget = Budget.avg_bits(self.budgets[0])
        for design in self.designs[1:]:
            self.calibration_settings(design, budget)
        object.__setattr__(self, "calibration", self.calibration_settings(self.designs[0], budget))

    @classmethod
    def of_preset(cls, name: str = "default", **overrides) -> CompareConfig:
        """The sizes of preset ``name`` (:data:`QUICK_SIZES`, :data:`FULL_SIZES`; ``"default"``: the field
        defaults), with ``overrides`` (fields) on top."""
        sizes = {"quick": QUICK_SIZES, "full": FULL_SIZES}.get(name, {})
        calibration = CalibrationSettings(**{**PAPER_STORAGE, **sizes.get("calibration", {})})
        return cls(**{**sizes, "calibration": calibration, "preset": name, **overrides})

    @classmethod
    def quick(cls, **overrides) -> CompareConfig:
        """The ``--quick`` sizes (:data:`QUICK_SIZES`), with ``overrides`` on top."""
        return cls.of_preset("quick", **overrides)

    @classmethod
    def full(cls, **overrides) -> CompareConfig:
        """The ``--full`` sizes (:data:`FULL_SIZES`), with ``overrides`` on top."""
        return cls.of_preset("full", **overrides)

    @classmethod
    def from_options(cls, preset: str = "default", **options) -> CompareConfig:
        """What the command line's ``options`` describe: ``preset``'s configuration with the fields and the
        calibration settings they name on top (by option name, :data:`CALIBRATION_OPTIONS`, or for
        :data:`CALIBRATION_UNFLAGGED` by field name)."""
        base = cls.of_preset(preset)
        calibration, fields_ = split_calibration(options)
        return replace(base, calibration=replace(base.calibration, **calibration), **fields_)

    def option(self, name: str) -> object:
        """The value of ``name``: a field, a calibration option (``"residual"``) or an unflagged calibration setting
        (``"bitset"``)."""
        if name in CALIBRATION_OPTIONS:
            return getattr(self.calibration, CALIBRATION_OPTIONS[name])
        return getattr(self.calibration if name in CALIBRATION_UNFLAGGED else self, name)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in LIST_FIELDS:
            d[name] = None if getattr(self, name) is None else list(getattr(self, name))
        d["calibration"] = {name: getattr(self.calibration, name) for name in CALIBRATION_FIELDS}
        d["calibration"]["bitset"] = list(self.calibration.bitset)
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: object) -> CompareConfig:
        d = cls.check_format(d)
        kwargs = dict(d) if d["format_version"] == FORMAT_VERSION else upgraded_from_v2(d)
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise RateQuantError(f"compare config has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        for name in LIST_FIELDS:
            if name in kwargs and not (name == "methods" and kwargs[name] is None):
                if not isinstance(kwargs[name], list):
                    raise RateQuantError(f"compare config: {name} must be a list")
                kwargs[name] = tuple(kwargs[name])
        calibration = kwargs.get("calibration", {})
        if not isinstance(calibration, dict) or set(calibration) - set(CALIBRATION_FIELDS):
            raise RateQuantError(
                f"compare config: calibration must be an object with fields among {', '.join(CALIBRATION_FIELDS)}"
            )
        if isinstance(calibration.get("bitset"), list):
            calibration = {**calibration, "bitset": tuple(calibration["bitset"])}
        try:
            kwargs["calibration"] = CalibrationSettings(**{**PAPER_STORAGE, **calibration})
        except RateQuantError as exc:
            raise RateQuantError(f"compare config: calibration: {exc}") from None
        return cls(**kwargs)

    def command(self, out_dir: str | Path) -> str:
        """The ``ratequant compare`` command line that makes this configuration (options that differ from its
        preset only), or where no options can (a field without one, or one turned off that its preset turns
        on), the ``--config`` line that repeats it from the ``config.json`` saved in ``out_dir``."""
        base = CompareConfig.of_preset(self.preset)
        out = Path(out_dir).as_posix()
        flagged = {"model", "corpus", "dtype", "budgets", "designs", "eval_corpora", *SCALAR_FLAGS, *LIST_FLAGS}
        names = [f.name for f in fields(self) if f.name != "calibration"]
        names += [*CALIBRATION_OPTIONS, *CALIBRATION_UNFLAGGED]
        differs = [name for name in names if self.option(name) != base.option(name)]
        if any(name not in flagged or self.option(name) in (None, ()) for name in differs):
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
                parts.append(f"{flag_of(name)} {self.option(name)}")
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
        """The :class:`~ratequant.calibration.CalibrationSettings` that ``calibrate`` uses for ``design`` at
        ``budget`` under this comparison (``sink_tokens``: the count chosen for the design, default the config's)."""
        sinks = self.calibration.sink_tokens if sink_tokens is None else sink_tokens
        return replace(self.calibration, quantizer=design, budget=budget, sink_tokens=sinks)

    def scores(self, method: str) -> bool:
        """Whether ``method`` is scored (every method unless ``methods`` names some)."""
        return self.methods is None or method in self.methods

    def kv_splits(self, budget: float) -> list[tuple[int, int]]:
        """Every ``(key_bits, value_bits)`` with ``k != v``, ``|k - v| <= split_max_gap``, mean ``budget``,
        widths in the bit set; keys-wider first."""
        total = 2 * budget
        if not float(total).is_integer():
            return []
        bitset = self.calibration.bitset
        pairs = [(k, int(total) - k) for k in bitset]
        pairs = [(k, v) for k, v in pairs if v in bitset and k != v and abs(k - v) <= self.split_max_gap]
        return sorted(pairs, key=lambda kv: (kv[0] < kv[1], abs(kv[0] - kv[1])))


def split_calibration(options: dict) -> tuple[dict, dict]:
    """``options`` as ``(calibration settings, the other fields)``: a calibration setting named by its option
    (:data:`CALIBRATION_OPTIONS`, ``"residual"``) or, unflagged, by its field (``"bitset"``)."""
    names = {**CALIBRATION_OPTIONS, **{name: name for name in CALIBRATION_UNFLAGGED}}
    calibration = {names[k]: v for k, v in options.items() if k in names}
    return calibration, {k: v for k, v in options.items() if k not in names}


def upgraded_from_v2(d: dict) -> dict:
    """A version-2 config (flat calibration fields, ``passkey_*`` names) as version 3's fields."""
    calibration, rest = split_calibration({k: v for k, v in d.items() if k != "format_version"})
    return {**{RENAMED_IN_V3.get(k, k): v for k, v in rest.items()}, "calibration": calibration}


__all__ = [
    "ALLOCATED_METHODS",
    "CALIBRATION_FIELDS",
    "CALIBRATION_OPTIONS",
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
