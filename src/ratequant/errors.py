"""Exceptions a user can act on.

Every error that reaches a user derives from :class:`RateQuantError`; the command-line tool prints its
message on one line and exits with status 2. The message says what is wrong and what to do.
"""


class RateQuantError(ValueError):
    """Base class: bad input, an unreachable budget, a plan that does not fit a model, ..."""


class UnsupportedModelError(RateQuantError):
    """The model's attention is not one this tool can quantize (linear attention, MLA, ...)."""


class PlanError(RateQuantError):
    """A plan file is malformed, from a newer format, or does not match the model or quantizer."""


class BudgetError(RateQuantError):
    """A bit or byte budget that the allowed bit widths cannot reach."""
