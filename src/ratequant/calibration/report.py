"""The report of a finished calibration, as ``ratequant calibrate`` prints it."""

from __future__ import annotations

import numpy as np

from ratequant.calibration.pipeline import CalibrationRun
from ratequant.calibration.settings import CalibrationSettings
from ratequant.inputs.models import LoadedModel
from ratequant.validation import inert


def describe_run(run: CalibrationRun, settings: CalibrationSettings, loaded: LoadedModel) -> list[str]:
    """What ``ratequant calibrate`` prints of a finished run: the plan's model, design and budget, the floors, every
    candidate's held-out KL and the choice, the KL search, the fit, the widths, the memory, the sinks and the time
    of each phase (every name :func:`~ratequant.validation.inert`)."""
    lines: list[str] = []
    plan = run.plan
    lines.append(
        f"plan for {inert(loaded.name)} with {plan.quantizer['name']}, allocator {plan.allocator}, budget "
        f"{settings.budget.describe()}"
    )
    lines.append(
        f"  fitted on {plan.calibration['tokens']} calibration tokens, metric {settings.metric}"
        + (f", curves of {settings.curves_from}" if settings.curves_from else "")
    )
    for line in floor_lines(run.curves.component_min_bits(), settings.bitset[0]):
        lines.append(f"  {line}")
    c = plan.calibration
    if run.candidates:
        windows = run.candidate_windows
        scored = ", ".join(
            f"{name} {kl:.4f}" + (f" ({windows[name]} windows)" if windows[name] > 1 else "")
            for name, kl in sorted(run.candidates.items(), key=lambda kv: kv[1])
        )
        lines.append(
            f"  candidates by mean KL on held-out calibration windows of {c['choice_tokens']} tokens (second halves "
            f"scored; close ones on more windows): {scored}"
        )
        lines.append(
            f"  chosen: {run.chosen}"
            + (f" (requested budget {c['requested_budget']})" if "requested_budget" in c else "")
        )
    if "search_kl" in c:
        starts = ", ".join(
            f"{k.removeprefix('search_kl_')} {v:.4f}"
            for k, v in c.items()
            if k.startswith("search_kl_") and k != "search_kl_start"
        )
        lines.append(
            f"  KL search on {c['search_tokens']} calibration tokens (starts: {starts}): from {c['search_start']} "
            f"{c['search_kl_start']:.4f} to {c['search_kl']:.4f} ({c['search_moves_kept']} of "
            f"{c['search_proposals']} moves kept, {c['phases']['search']:.0f} s)"
        )
        if "search_kept" in c:
            verdict = "kept" if c["search_kept"] else f"dropped: the plan is {c['search_start']}"
            lines.append(
                f"  on a held-out window: {c['search_held_out_kl_start']:.4f} -> {c['search_held_out_kl']:.4f}, "
                f"the moves {verdict}"
            )
    lines.append(f"  {plan.fit_line()}")
    lines += [f"  {line}" for line in plan.width_lines()]
    lines.append(f"  average code bits {plan.avg_bits:.4f}")
    if plan.bytes_per_token:
        dtype = str(loaded.dtype).removeprefix("torch.")
        lines.append(
            f"  memory: {loaded.geometry.against_full_precision(plan.bytes_per_token, dtype, loaded.dtype.itemsize)} "
            f"at {plan.stated_context_tokens:,} tokens of context, codes, scales and zeros, the {plan.residual_length} "
            "newest tokens (the residual window) and the sinks at full precision included"
        )
    chosen = " (chosen from the calibration data)" if settings.sink_tokens == "auto" else ""
    lines.append(f"  sink tokens kept at full precision: {plan.sink_tokens}{chosen}")
    lines.append(
        "  time "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in run.phases.items())
        + f"; total {sum(run.phases.values()):.2f} s"
    )
    return lines


def floor_lines(floors: np.ndarray, narrowest: int, shown: int = 4) -> list[str]:
    """What the per-component floors ``[2, L, H]`` leave out, a line per kind that has any above ``narrowest``."""
    lines = []
    for k, kind in enumerate(("keys", "values")):
        high = np.argwhere(floors[k] > narrowest)
        if not len(high):
            continue
        named = ", ".join(f"layer {layer} kv-head {head} at {floors[k, layer, head]}" for layer, head in high[:shown])
        more = f" and {len(high) - shown} more" if len(high) > shown else ""
        lines.append(
            f"{kind}: {len(high)} of {floors[k].size} components start above {narrowest} bits ({named}{more}): "
            "narrower widths reconstruct them worse than their mean (--keep-all-widths to allow them)"
        )
    return lines


__all__ = ["describe_run", "floor_lines"]
