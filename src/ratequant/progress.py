"""Progress a person can follow: a tqdm bar on a terminal, plain timestamped lines otherwise (logs, CI).

:func:`progress_bar` is what every long loop uses (calibration capture, evaluation windows, compare, passkey);
:class:`Stages` prints one line per stage of a long command. Both write to standard error.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ratequant.validation import inert

PLAIN_EVERY_S = 15.0
"""Without a terminal, a progress line at most this often (and at the end)."""


class _PlainBar:
    """The tqdm calls we use (``update``, ``set_postfix_str``), written as occasional plain lines."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.start, self.last, self.note = 0, time.perf_counter(), time.perf_counter(), ""
        self.printed = False  # the last line is written only after earlier ones: quick work stays quiet

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PLAIN_EVERY_S or (self.printed and self.done >= self.total):
            self.last, self.printed = now, True
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            note = f"; {self.note}" if self.note else ""
            line = f"{self.desc}: {self.done}/{self.total} {self.unit} ({elapsed:.0f} s, about {eta:.0f} s left{note})"
            print(
                inert(line),
                file=sys.stderr,
                flush=True,
            )

    def set_postfix_str(self, text: str) -> None:
        self.note = text


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def progress_bar(*, total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[object]:
    """A progress reporter with ``update(n)`` and ``set_postfix_str(text)``: tqdm when standard error is a
    terminal, plain lines every :data:`PLAIN_EVERY_S` seconds otherwise, nothing when not ``enabled``."""
    if not enabled:
        yield _Silent()
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=inert(desc), unit=unit, leave=False)
        try:
            yield bar
        finally:
            bar.close()
        return
    yield _PlainBar(total, desc, unit)


def note(message: str) -> None:
    """One line on standard error for something the user should know but that does not stop the work."""
    print(f"ratequant: note: {inert(message)}", file=sys.stderr, flush=True)


def warning(message: str) -> None:
    """One line on standard error for a result the user should not take at face value."""
    print(f"ratequant: warning: {inert(message)}", file=sys.stderr, flush=True)


class Stages:
    """One line per stage on standard error, prefixed with the time since the run started."""

    def __init__(self, enabled: bool = True, start: float | None = None):
        self.enabled = enabled
        self.start = time.perf_counter() if start is None else start

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f} s] {inert(message)}", file=sys.stderr, flush=True)


__all__ = ["PLAIN_EVERY_S", "Stages", "note", "progress_bar", "warning"]
