"""Fixtures the command-line tests share: two small text corpora written once per test module."""

from __future__ import annotations

import pytest


def write_corpus(tmp_path_factory, paragraph: str):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(paragraph.format(i=i) * 4 for i in range(60)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 paragraphs of plain prose."""
    return write_corpus(tmp_path_factory, "the quick brown fox {i} jumps over the lazy dog, paragraph {i}.")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """60 paragraphs of prose with a line of Python in each."""
    return write_corpus(tmp_path_factory, "the quick brown fox {i} jumps over the lazy dog. def f(x): return x + {i}")
