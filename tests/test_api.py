"""The public API: a light ``import ratequant``, one list of names, and the README's library example."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import ratequant

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_ratequant_is_light():
    code = (
        "import sys, ratequant; print(ratequant.__version__); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == ratequant.__version__ and out[1] == "[]"


def test_every_public_name_resolves():
    from ratequant import api

    assert ratequant.__all__ == ["__version__", *api.__all__] and dir(ratequant) == sorted(ratequant.__all__)
    assert len(set(api.__all__)) == len(api.__all__)
    for name in api.__all__:
        assert getattr(ratequant, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        ratequant.no_such_name  # noqa: B018


def readme_example() -> str:
    """The README's library example (the Python block under "The same steps as library calls")."""
    text = README.read_text()
    start = text.index("The same steps as library calls")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_example_uses_only_the_top_level_api():
    code = readme_example()
    assert "import ratequant as rq" in code
    assert not re.search(r"from ratequant\.", code), "the README example should need the top-level API only"
