"""Integrations of ratequant with other tools; each submodule imports its tool only when it is imported.

* :mod:`ratequant.integrations.kvtuner`: plans as KVTuner's per-head width tables and per-layer width tables,
  and back (``ratequant export`` / ``ratequant import``).
* :mod:`ratequant.integrations.lm_eval`: the ``ratequant`` model of EleutherAI's lm-evaluation-harness (run it
  with ``ratequant lm-eval ...``; needs the ``lm-eval`` extra: ``pip install 'ratequant[lm-eval]'``).
"""

from __future__ import annotations

import importlib.util

from ratequant.errors import RateQuantError

LM_EVAL_INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'ratequant[lm-eval]'"


class MissingIntegrationError(RateQuantError, ImportError):
    """An optional tool an integration needs is not installed (an ImportError too, so ``importorskip`` works)."""


def require_lm_eval() -> None:
    """Raise :class:`MissingIntegrationError` (a :class:`RateQuantError`) unless lm-evaluation-harness is installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingIntegrationError(LM_EVAL_INSTALL_HINT)


__all__ = ["LM_EVAL_INSTALL_HINT", "MissingIntegrationError", "require_lm_eval"]
