"""Checks shared by every reader (:mod:`ratequant.validation`): what ratequant prints of the names it reads is inert.
(The command line printing such names: tests/cli/test_calibrate.py.)"""

from __future__ import annotations

HOSTILE_NAME = "m\x1b]0;pwned\x07\x1b[2J\r\nratequant: error: fake\x9b31m\u202eevil\x00"


def test_inert_escapes_control_characters_and_collapses_line_breaks():
    from ratequant.validation import inert

    shown = inert(HOSTILE_NAME)
    assert shown == r"m\x1b]0;pwned\x07\x1b[2J ratequant: error: fake\x9b31m\u202eevil\x00"
    assert shown.isprintable() and inert(shown) == shown  # idempotent
    assert inert("plain name, ünïcödé, 中文 and  two  spaces") == "plain name, ünïcödé, 中文 and  two  spaces"
    assert inert("a\n\n  \r\nb\u2028c\td") == r"a b c\x09d"
