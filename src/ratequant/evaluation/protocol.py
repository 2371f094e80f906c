"""How text becomes scored tokens: windows, the BOS token, and which predictions count.

The protocol follows the field's tools so that our numbers can be compared with theirs:

* **BOS.** When the tokenizer adds a BOS token (Gemma, Llama-2/3, Mistral, ...), every window starts with it,
  as llama.cpp's ``llama-perplexity`` makes the first token of each chunk BOS and lm-eval prefixes rolling
  windows with it; models park their attention sink on it. A tokenizer that adds none (SmolLM2, GPT-2) gets
  none. Here a window is ``[BOS] + seq_len - 1`` consecutive text tokens (no text token is overwritten);
  without BOS it is ``seq_len`` text tokens. Windows never overlap.
* **Scoring.** ``"all"`` scores every prediction of the window (tokens 1..seq_len-1); ``"second-half"``
  scores only tokens ``seq_len // 2 .. seq_len - 1``, as llama.cpp's perplexity tool does, so every scored
  token has at least half a window of context (the part a KV cache stores).

:func:`make_windows` returns :class:`Windows`, whose :meth:`Windows.describe` is recorded in every result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ratequant.errors import RateQuantError
from ratequant.validation import check_choice, check_int

BOS_CHOICES = ("auto", "yes", "no")
SCORING = ("all", "second-half")
DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 8
DEFAULT_SCORING = "second-half"
"""The evaluation every command defaults to (``eval``, ``compare``): windows of :data:`DEFAULT_SEQ_LEN` tokens,
:data:`DEFAULT_WINDOWS` of them, the second half of each scored as llama.cpp's perplexity tool does (every scored
token has a long context, and reads quantized history past the residual window)."""
MAX_TEXT_FACTOR = 8
"""Characters of text read per token needed (generous; English averages about 4)."""


def bos_token_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before an encoded text, or None when it adds none (the one BOS rule)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    starts_extra = len(special) > len(plain) and special[1 : 1 + len(plain)] == plain
    return int(special[0]) if starts_extra else None


@dataclass(frozen=True)
class WindowProtocol:
    """``seq_len`` tokens per window, at most ``windows`` of them; ``bos`` ``"auto"`` (as the tokenizer
    does), ``"yes"`` or ``"no"``; ``scoring`` ``"all"`` or ``"second-half"``."""

    seq_len: int = 512
    windows: int = 8
    bos: str = "auto"
    scoring: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_len", check_int(self.seq_len, "window length (tokens)", lo=2, hi=1 << 20))
        object.__setattr__(self, "windows", check_int(self.windows, "number of windows", lo=1, hi=1 << 20))
        check_choice(self.bos, "bos", BOS_CHOICES)
        check_choice(self.scoring, "scoring", SCORING)

    @property
    def first_target(self) -> int:
        """Position of the first scored token in a window (1: every prediction)."""
        return 1 if self.scoring == "all" else self.seq_len // 2


@dataclass(frozen=True, eq=False)
class Windows:
    """Token windows ``ids [n, seq_len]`` made by ``protocol``; ``bos_token_id`` is the BOS that starts each
    window (None: none); predictions of tokens ``first_target .. seq_len - 1`` are scored."""

    ids: torch.Tensor
    protocol: WindowProtocol
    bos_token_id: int | None

    @property
    def count(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    @property
    def first_target(self) -> int:
        return self.protocol.first_target

    @property
    def scored_per_window(self) -> int:
        return self.seq_len - self.first_target

    def with_scoring(self, scoring: str) -> Windows:
        """The same windows scored by ``scoring``."""
        p = self.protocol
        return Windows(self.ids, WindowProtocol(p.seq_len, p.windows, p.bos, scoring), self.bos_token_id)

    def describe(self) -> dict:
        """What a result must record about its windows."""
        return {
            "seq_len": self.seq_len,
            "windows": self.count,
            "bos": self.bos_token_id is not None,
            "bos_token_id": self.bos_token_id,
            "scoring": self.protocol.scoring,
            "first_scored_token": self.first_target,
            "scored_tokens": self.count * self.scored_per_window,
        }

    def summary(self) -> str:
        bos = f"BOS {self.bos_token_id} first" if self.bos_token_id is not None else "no BOS"
        scored = "every token scored" if self.protocol.scoring == "all" else "second half scored"
        scored_tokens = self.count * self.scored_per_window
        windows = "1 window" if self.count == 1 else f"{self.count} windows"
        return f"{windows} of {self.seq_len} tokens ({bos}; {scored}: {scored_tokens} tokens)"


def make_windows(tokenizer, text: str, protocol: WindowProtocol) -> Windows:
    """Cut ``text`` into :class:`Windows` by ``protocol`` (the first ones; the tail that fills no window is
    dropped). Only as much text as the windows need is tokenized. Raises :class:`RateQuantError` when not even
    one window fits."""
    bos = bos_token_id(tokenizer) if protocol.bos == "auto" else None
    if protocol.bos == "yes":
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise RateQuantError("bos='yes' but the tokenizer has no BOS token; use bos='auto' or 'no'")
    body = protocol.seq_len - (bos is not None)
    if body < 1:
        raise RateQuantError(
            f"a window of {protocol.seq_len} tokens has no room for text after BOS; use a longer window"
        )
    ids = encode_prefix(tokenizer, text, body * protocol.windows)
    count = min(ids.numel() // body, protocol.windows)
    if count == 0:
        raise RateQuantError(
            f"the text has {ids.numel()} tokens, fewer than one window of {protocol.seq_len}; "
            "use a shorter --seq-len or a longer corpus"
        )
    windows = ids[: count * body].view(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return Windows(windows.contiguous(), protocol, bos)


def encode_prefix(tokenizer, text: str, needed_tokens: int) -> torch.Tensor:
    """Token ids (no special tokens) of the start of ``text``, at least ``needed_tokens`` of them when the text
    has that many: a growing prefix is encoded, and tokens near its cut are left out (they may merge with
    the next characters)."""
    size = max(MAX_TEXT_FACTOR * needed_tokens, 4096)
    while True:
        prefix = text[:size]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if len(prefix) == len(text):
            return torch.tensor(ids, dtype=torch.long)
        if len(ids) >= needed_tokens + 64:
            return torch.tensor(ids[: len(ids) - 32], dtype=torch.long)
        size *= 2


__all__ = [
    "BOS_CHOICES",
    "DEFAULT_SCORING",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_WINDOWS",
    "SCORING",
    "WindowProtocol",
    "Windows",
    "bos_token_id",
    "encode_prefix",
    "make_windows",
]
