"""Figures (:mod:`ratequant.lab.report.plots`): titles draw names as they are."""

from __future__ import annotations

from tests.test_plan import TINY_BITS


def test_figure_titles_draw_names_as_they_are(tmp_path):
    """Dollar signs in a name are not matplotlib mathtext (which refuses what it cannot parse)."""
    from ratequant.lab.report.plots import bits_heatmap

    path = bits_heatmap(TINY_BITS, tmp_path / "bits.png", title="model $\\frac$ a$b$ \x1b[2J\nnext")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
