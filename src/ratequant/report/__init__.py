"""The report of ``ratequant compare``: tables, findings, figures and markdown, written into one folder.

:mod:`~ratequant.report.tables` and :mod:`~ratequant.report.findings` format the typed results of
:mod:`ratequant.experiments`; :mod:`~ratequant.report.figures` draws them with :mod:`~ratequant.report.plots`;
:mod:`~ratequant.report.markdown` assembles ``report.md`` and ``summary.md``; :mod:`~ratequant.report.writer`
writes the folder atomically. ``python -m ratequant.report results.json`` redraws a report from its numbers.
"""

from ratequant.report.findings import findings
from ratequant.report.writer import ReportFiles, check_output, rebuild_report, repeat_command, write_report

__all__ = ["ReportFiles", "check_output", "findings", "rebuild_report", "repeat_command", "write_report"]
