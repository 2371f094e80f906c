"""The plans ``calibrate`` would hand a user, as methods of a comparison: each design's default plan and ``auto``.

* ``default`` -- per design and budget, the candidate (RateQuant's allocation or a fixed key/value split of the
  budget) with the least KL on held-out calibration text (:mod:`ratequant.calibration.candidates`), exactly as
  ``ratequant calibrate`` chooses it;
* ``auto`` -- per budget, the best candidate of every design at the true bytes the reference design takes at the
  budget (``ratequant calibrate --quantizer auto``); its ``design`` is the design it chose.

The candidates are built by the pipeline's own steps (:func:`ratequant.calibration.pipeline.allocate_design`,
:func:`ratequant.calibration.pipeline.candidates_of`) on the comparison's fitted curves, and scored once each on the
same held-out windows; the choice uses no evaluation text.
"""

from __future__ import annotations

from dataclasses import replace

from ratequant.allocation import Budget
from ratequant.calibration import (
    AUTO_REFERENCE,
    CalibrationSettings,
    DesignFit,
    allocate_design,
    candidates_of,
    equal_bytes_budget,
)
from ratequant.calibration.candidates import (
    Candidate,
    Choice,
    choose_candidate,
    held_out_windows,
)
from ratequant.calibration.search import window_kl
from ratequant.errors import BudgetError
from ratequant.inputs.models import LoadedModel
from ratequant.lab.config import CompareConfig, budget_text
from ratequant.lab.methods import Method, Skipped, condition_for
from ratequant.progress import Stages
from ratequant.quantizers import get_quantizer
from ratequant.spec import StoragePolicy

CHOSEN_METHODS = ("default", "auto")


def chosen_methods(
    config: CompareConfig,
    loaded: LoadedModel,
    corpus,
    fitted: dict[str, DesignFit],
    sinks: dict[str, int],
    skipped: list[Skipped],
    say: Stages,
) -> tuple[list[Method], dict]:
    """The ``default`` plan of every design and the ``auto`` plan at every budget, with every candidate's held-out
    KL ``{budget: {"default": {design: {name: kl}}, "auto": {name: kl}}}`` for the report."""
    most_sinks = max(sinks.values(), default=0)
    held_out = replace(config.calibration, sink_tokens=most_sinks)  # the choice window's rule, with the sinks chosen
    windows = held_out_windows(
        loaded.tokenizer, corpus, held_out.capture_tokens, held_out.choice_window_tokens(), held_out.choice_windows
    )
    count = windows.ids.shape[0]
    say(f"plan choice: candidates scored on up to {windows.summary()} of held-out calibration text")
    kl = window_kl(loaded.model, windows)
    seen: dict[tuple, float] = {}

    def scored(spec, window: int) -> float:  # a candidate met twice (kivi's under auto) is scored once a window
        key = (spec.quantizer.name, spec.sink_tokens, spec.bits.tobytes(), window)
        if key not in seen:
            seen[key] = kl(spec, window)
        return seen[key]

    def settings_for(design: str, budget: Budget) -> CalibrationSettings:
        return config.calibration_settings(design, budget, sinks[design])

    def method(kind: str, choice: Choice, budget: float) -> Method:
        best = choice.best
        label = f"{'default plan' if kind == 'default' else 'auto'} ({best.name})"
        alloc = best.allocation
        return Method(
            kind,
            label,
            best.policy.quantizer.name,
            budget,
            alloc.avg_bits,
            float(alloc.bits[0].mean()),
            float(alloc.bits[1].mean()),
            float(alloc.bytes_per_token),
            condition_for(best.spec, config, label),
            {
                "chosen": best.name,
                "held_out_kl": choice.kl or {best.name: scored(best.spec, 0)},
                "held_out_windows": choice.windows or {best.name: 1},
                "quantizer": best.policy.quantizer.to_config(),
                "residual": best.policy.residual_length,
                "sink_tokens": best.policy.sink_tokens,
                "context_tokens": config.context_tokens,
            },
            alloc.bits,
        )

    methods, info = [], {}
    if not (config.scores("default") or config.scores("auto")):
        return methods, info
    for value in config.budgets:
        budget = Budget.avg_bits(value)
        record: dict = {"default": {}}
        by_design: dict[str, tuple] = {}  # design -> (settings, policy, calibration) at the budget
        for design in config.designs:
            settings = settings_for(design, budget)
            policy = StoragePolicy(get_quantizer(design), config.calibration.residual_length, sinks[design])
            try:
                calibrated = allocate_design(loaded, settings, policy, fitted[design])
            except BudgetError as exc:
                skipped.append(Skipped("default", "default plan", design, value, str(exc)))
                continue
            candidates = candidates_of(settings, calibrated, budget, qualified=False)
            choice = choose_candidate(scored, candidates, count)
            record["default"][design] = choice.kl or {choice.best.name: scored(choice.best.spec, 0)}
            if config.scores("default"):
                methods.append(method("default", choice, value))
            by_design[design] = (settings, policy, calibrated)
        if AUTO_REFERENCE in by_design and len(config.designs) > 1 and config.scores("auto"):
            settings, _, reference = by_design[AUTO_REFERENCE]
            equal = equal_bytes_budget(settings, loaded.geometry, reference.cost_model)
            pool: list[Candidate] = []
            for design, (settings, policy, _) in by_design.items():
                try:
                    calibrated = allocate_design(loaded, settings, policy, fitted[design], budget=equal)
                except BudgetError as exc:
                    say(f"auto at {budget_text(value)} bits: {design} left out ({exc})")
                    continue
                pool += candidates_of(settings, calibrated, equal, qualified=True)
            choice = choose_candidate(scored, pool, count)
            record["auto"] = {"bytes_per_token": equal.value, "held_out_kl": choice.kl}
            methods.append(method("auto", choice, value))
            best = choice.best.name
            say(f"auto at {budget_text(value)} bits: {best} (held-out KL {choice.kl.get(best, 0.0):.4f})")
        info[budget_text(value)] = record
    return methods, info


__all__ = ["CHOSEN_METHODS", "chosen_methods"]
