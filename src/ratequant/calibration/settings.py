"""The settings of ``calibrate``: every calibration default and limit, validated on construction.

:class:`CalibrationSettings` is what ``ratequant calibrate``'s options, the API's ``calibrate`` and ``compare``'s
calibration build; :mod:`ratequant.calibration.pipeline` runs its stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ratequant.allocation import DEFAULT_WIDTHS, Budget, check_reachable
from ratequant.allocation.strategies import STRATEGIES
from ratequant.calibration.candidates import CHOICE_WINDOWS, choice_tokens_for
from ratequant.calibration.search import check_search_tokens
from ratequant.errors import RateQuantError
from ratequant.measure.distortion import DEFAULT_METRIC, METRICS
from ratequant.quantizers import Quantizer, available, get_quantizer
from ratequant.spec import DEFAULT_RESIDUAL_LENGTH, MAX_SINK_TOKENS, StoragePolicy
from ratequant.validation import check_bitset, check_int

DEFAULT_CALIBRATION_SEQ_LEN = 512
"""Tokens per calibration sequence."""
DEFAULT_CALIBRATION_SEQUENCES = 4
"""Calibration sequences captured (each one forward and backward pass)."""
DEFAULT_SEARCH_TOKENS = 1024
"""Tokens of calibration text the KL search scores its moves on."""
AUTO = "auto"
"""``quantizer="auto"``: calibrate every registered design and keep the best plan at the same true bytes."""
AUTO_REFERENCE = "kivi"
"""The design whose true bytes at an average-bits budget are every design's budget under ``"auto"``."""
CAPTURE_BATCH_SIZE = 1
"""Calibration windows per forward/backward pass: one keeps the backward's activations small."""
SINK_CANDIDATES = (0, 1, 2, 4, 8, 16)
"""The sink-token counts ``sink_tokens="auto"`` chooses from."""
SINK_REFERENCE_BITS = 2
SINK_GAIN = 4.0


def check_search_text(tokens: int, residual_length: int, sink_tokens: int | str) -> int:
    """:func:`ratequant.calibration.search.check_search_tokens` before the sinks are chosen: ``"auto"`` counts as the
    most it can choose."""
    return check_search_tokens(tokens, residual_length, max(SINK_CANDIDATES) if sink_tokens == "auto" else sink_tokens)


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that decides a plan besides the model and corpus (validated on construction).

    ``strategy`` names the allocation strategy (:data:`ratequant.allocation.STRATEGIES`); ``curves_from`` the
    design whose distortion curves it allocates with (default: the quantizer's own; another one reproduces
    the paper's distortion-model mismatch).
    """

    quantizer: str = "kivi"
    quantizer_params: dict = field(default_factory=dict)
    budget: Budget = field(default_factory=lambda: Budget.avg_bits(4.0))
    metric: str = DEFAULT_METRIC
    strategy: str = "ratequant"
    curves_from: str | None = None
    bitset: tuple[int, ...] = DEFAULT_WIDTHS
    b_min: int | None = None
    b_max: int | None = None
    informative_only: bool = True  # drop widths worse than storing the mean (DistortionTable.informative_widths)
    seq_len: int = DEFAULT_CALIBRATION_SEQ_LEN
    sequences: int = DEFAULT_CALIBRATION_SEQUENCES
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    sink_tokens: int | str = "auto"
    search_proposals: int = 0  # > 0: refine the allocation on the KL it causes (ratequant.calibration.search); slow
    search_tokens: int = DEFAULT_SEARCH_TOKENS
    search_seed: int = 0
    choose: bool = True  # keep the candidate (RateQuant, fixed splits) with the least held-out KL
    choice_tokens: int | None = None  # None: ratequant.calibration.candidates.choice_tokens_for
    choice_windows: int = CHOICE_WINDOWS

    def __post_init__(self) -> None:
        METRICS.get(self.metric)
        STRATEGIES.get(self.strategy)
        if self.quantizer == AUTO:
            if self.quantizer_params:
                raise RateQuantError("--quantizer auto tries every design with its defaults; drop the --param options")
            if self.curves_from is not None:
                raise RateQuantError("--curves-from needs one design; pass --quantizer NAME instead of auto")
        if self.choice_tokens is not None:
            check_int(self.choice_tokens, "choice tokens", lo=2, hi=1 << 20)
        check_int(self.choice_windows, "choice windows", lo=1, hi=64)
        if self.sink_tokens != "auto":
            check_int(self.sink_tokens, "sink tokens (a count, or 'auto')", lo=0, hi=MAX_SINK_TOKENS)
        object.__setattr__(self, "bitset", check_bitset(self.bitset))
        check_int(self.seq_len, "seq_len", lo=2)
        check_int(self.sequences, "sequences", lo=1)
        check_int(self.search_proposals, "search proposals", lo=0, hi=1 << 20)
        if self.search_proposals:
            check_search_text(self.search_tokens, self.residual_length, self.sink_tokens)
        else:
            check_int(self.search_tokens, "search tokens", lo=2)
        check_int(self.search_seed, "search seed", lo=0)
        for name in self.designs():  # validates the designs, their parameters, the residual window and the sinks
            self.policy(design=name)
        if self.curves_from is not None:
            get_quantizer(self.curves_from)
        if self.choose or self.quantizer == AUTO:
            self.choice_window_tokens()  # a given length too short for the residual window and sinks fails here
        check_reachable(self.budget, self.bitset, self.b_min, self.b_max)  # before any measurement

    @property
    def capture_tokens(self) -> int:
        """Tokens of the calibration split the capture reads (the held-out text of the choice starts after them)."""
        return self.seq_len * self.sequences

    def choice_window_tokens(self) -> int:
        """Tokens per held-out window of the plan choice (:func:`choice_tokens_for`; ``"auto"`` sinks count as the
        most they can be)."""
        sinks = max(SINK_CANDIDATES) if self.sink_tokens == "auto" else self.sink_tokens
        return choice_tokens_for(self.choice_tokens, self.residual_length, sinks)

    def designs(self) -> tuple[str, ...]:
        """The designs calibration tries: every registered one for ``"auto"`` (the reference design first)."""
        if self.quantizer != AUTO:
            return (self.quantizer,)
        return (AUTO_REFERENCE, *(d for d in available() if d != AUTO_REFERENCE))

    def design(self, name: str | None = None) -> Quantizer:
        """The quantizer design ``name`` (default: the settings' one) with the settings' parameters."""
        name = name or self.designs()[0]
        return get_quantizer(name, **self.quantizer_params)

    def policy(self, sink_tokens: int | None = None, design: str | None = None) -> StoragePolicy:
        """The storage policy of ``design``; ``sink_tokens`` stands in for ``"auto"`` (0 until one is chosen)."""
        chosen = self.sink_tokens if sink_tokens is None else sink_tokens
        return StoragePolicy(self.design(design), self.residual_length, 0 if chosen == "auto" else chosen)


__all__ = [
    "DEFAULT_CALIBRATION_SEQ_LEN",
    "DEFAULT_CALIBRATION_SEQUENCES",
    "DEFAULT_SEARCH_TOKENS",
    "AUTO",
    "AUTO_REFERENCE",
    "CAPTURE_BATCH_SIZE",
    "SINK_CANDIDATES",
    "SINK_REFERENCE_BITS",
    "SINK_GAIN",
    "CalibrationSettings",
    "check_search_text",
]
