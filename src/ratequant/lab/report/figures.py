"""The figures of a comparison report, drawn from the typed results with :mod:`ratequant.lab.report.plots`."""

from __future__ import annotations

from pathlib import Path

from ratequant.lab.config import FIXED_METHODS, RANK_METHODS, budget_text
from ratequant.lab.report.plots import bits_heatmap_grid, distortion_curves, method_panels
from ratequant.lab.report.tables import METHOD_NAMES, row_key
from ratequant.lab.results import CompareResults

METRIC_LABELS = {"kl": "KL divergence from full precision (nats per token)", "ppl": "perplexity"}


def _against_bits(results: CompareResults, metric: str, path: Path) -> None:
    """One panel per design: ``metric`` of every method against the budget (rank reduction in every panel)."""
    rank_series = {}
    for method in RANK_METHODS:
        ms = results.select(method=method, design=None)
        if ms:
            rank_series[METHOD_NAMES[method]] = ([m.budget for m in ms], [getattr(m, metric) for m in ms])
    panels = {}
    for design in results.config.designs:
        series: dict[str, tuple[list, list]] = {}
        for m in results.select(design=design):
            key = "mismatched (other design's curves)" if m.method == "mismatched" else row_key(m, results)
            xs, ys = series.setdefault(key, ([], []))
            xs.append(m.budget)
            ys.append(getattr(m, metric))
        panels[design] = {**series, **rank_series}
    reference = results.full_precision.ppl if metric == "ppl" else None
    method_panels(
        panels,
        path,
        xlabel="average code bits (budget)",
        ylabel=METRIC_LABELS[metric],
        reference=reference,
        title=f"{results.model['name']}: {METRIC_LABELS[metric].split(' (')[0]} against bits",
    )


def _against_bytes(results: CompareResults, path: Path) -> None:
    """Quantization against rank reduction at matched storage: KL against true bytes per token."""
    series = {}
    best = {}
    for b in results.config.budgets:
        fixed = [m for m in results.select(budget=b) if m.method in FIXED_METHODS]
        if fixed:
            best[b] = min(fixed, key=lambda m: m.kl)
    if best:
        series["best fixed quantization (any design)"] = (
            [m.kv_bytes_per_token for m in best.values()],
            [m.kl for m in best.values()],
        )
    for design in results.config.designs:
        ms = results.select(method="ratequant", design=design)
        if ms:
            series[f"RateQuant, {design}"] = ([m.kv_bytes_per_token for m in ms], [m.kl for m in ms])
    for method in RANK_METHODS:
        ms = results.select(method=method, design=None)
        if ms:
            series[METHOD_NAMES[method]] = ([m.kv_bytes_per_token for m in ms], [m.kl for m in ms])
    method_panels(
        {"at matched storage": series},
        path,
        xlabel="true KV bytes per token",
        ylabel=METRIC_LABELS["kl"],
        title=f"{results.model['name']}: quantization against rank reduction",
        dashed=("best fixed quantization (any design)",),
    )


def draw_figures(results: CompareResults, folder: Path) -> list[str]:
    """Draw every figure into ``folder``; returns the file names written."""
    cfg = results.config
    written = []
    for metric in ("kl", "ppl"):
        _against_bits(results, metric, folder / f"{metric}_vs_bits.png")
        written.append(f"{metric}_vs_bits.png")
    _against_bytes(results, folder / "quant_vs_rank.png")
    written.append("quant_vs_rank.png")
    for name, d in results.designs.items():
        path = f"curves_{name}.png"
        distortion_curves(
            d.measured,
            d.fit.alpha,
            (d.beta_key, d.beta_value),
            d.fit.bitset,
            folder / path,
            title=f"{name}: measured distortion ({cfg.calibration.metric}) and fitted alpha * beta^-b",
        )
        written.append(path)
    for b in cfg.budgets:
        rows = {}
        for design in cfg.designs:
            for method in ("ratequant", "mismatched"):
                for m in results.select(method=method, design=design, budget=b):
                    if m.bits is not None:
                        tag = "RateQuant" if method == "ratequant" else f"with {m.details['curves']['design']} curves"
                        rows[f"{design} {tag}"] = m.bits
        if rows:
            path = f"bits_{budget_text(b)}.png"
            bits_heatmap_grid(rows, folder / path, title=f"bits per layer and kv head at {budget_text(b)} average bits")
            written.append(path)
    return written


__all__ = ["draw_figures"]
