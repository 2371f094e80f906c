"""``python -m ratequant.lab.report results.json``: redraw a compare report from its saved numbers."""

from __future__ import annotations

import argparse
import sys

from ratequant.errors import RateQuantError
from ratequant.lab.report.writer import rebuild_report
from ratequant.validation import inert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ratequant.lab.report", description="Rebuild a compare report from its results.json."
    )
    parser.add_argument("results", help="results.json written by ratequant compare")
    parser.add_argument("--out", help="folder for the report (default: the folder of results.json)")
    parser.add_argument(
        "--summary-image-prefix", help="prefix of image links in summary.md, e.g. the folder relative to a README"
    )
    args = parser.parse_args(argv)
    try:
        files = rebuild_report(args.results, args.out, summary_image_prefix=args.summary_image_prefix)
    except RateQuantError as exc:
        print(f"ratequant: error: {inert(exc)}", file=sys.stderr)
        return 2
    print(inert(f"report written to {files.report}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
