"""Measuring models: the protocol (windows, BOS, scoring), conditions, and the tasks that score them.

:mod:`~ratequant.evaluation.protocol` cuts text into windows as the field does; :mod:`~ratequant.evaluation.conditions`
runs a window at full precision, under simulated quantization or through the real cache;
:mod:`~ratequant.evaluation.perplexity` scores conditions against full precision (PPL, KL, top-token agreement);
:mod:`~ratequant.evaluation.passkey` and :mod:`~ratequant.evaluation.retrieval` (RULER's needle tasks, their text
made by :mod:`~ratequant.evaluation.needles`) are the retrieval tasks; :mod:`~ratequant.evaluation.tasks` the
registry.
"""

from ratequant.evaluation.conditions import Condition, FullPrecision, Simulated, Streaming, Within
from ratequant.evaluation.perplexity import REFERENCE, ConditionScore, perplexity, score_conditions
from ratequant.evaluation.protocol import WindowProtocol, Windows, make_windows
from ratequant.evaluation.tasks import TASKS, Task, TaskResult, get_task

__all__ = [
    "REFERENCE",
    "TASKS",
    "Condition",
    "ConditionScore",
    "FullPrecision",
    "Simulated",
    "Streaming",
    "Task",
    "TaskResult",
    "WindowProtocol",
    "Windows",
    "Within",
    "get_task",
    "make_windows",
    "perplexity",
    "score_conditions",
]
