"""What the command-line tests assert about a run: its exit status and one-line errors."""

from __future__ import annotations

from ratequant.cli import main


def run(capsys, argv):
    """``(exit status, stdout, stderr)`` of ``ratequant argv``, whether it returns or exits."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def assert_usage_error(capsys, argv, fragment):
    code, _, err = run(capsys, argv)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ratequant {argv[0]}: error:") or last.startswith("ratequant: error:"), err
    assert fragment in last, err


def assert_one_line_error(capsys, argv, fragment):
    code, out, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("ratequant: error: "), err
    assert fragment in lines[0], err
    return lines[0]
