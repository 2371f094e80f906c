"""The report of ``ratequant compare``: tables, findings, figures and markdown, written into one folder.

:mod:`~ratequant.lab.report.tables` and :mod:`~ratequant.lab.report.findings` format the typed results of
:mod:`ratequant.lab`; :mod:`~ratequant.lab.report.figures` draws them with :mod:`~ratequant.lab.report.plots`;
:mod:`~ratequant.lab.report.markdown` assembles ``report.md`` and ``summary.md``; :mod:`~ratequant.lab.report.writer`
writes the folder atomically. ``python -m ratequant.lab.report results.json`` redraws a report from its numbers.
"""

from ratequant.lab.report.findings import findings
from ratequant.lab.report.writer import ReportFiles, check_output, rebuild_report, repeat_command, write_report

__all__ = ["ReportFiles", "check_output", "findings", "rebuild_report", "repeat_command", "write_report"]
