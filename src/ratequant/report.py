"""The report of ``ratequant compare``: markdown, PNG plots and the JSON of every number, in one folder.

:func:`write_report` writes, from a :class:`~ratequant.compare.CompareResults`:

* ``results.json`` -- every number (per method, design and budget: ``ppl``, ``kl``, ``avg_bits``,
  ``kv_bytes_per_token``; per design: ``beta_key``, ``beta_value``, ``r2``; timings, skipped methods and why);
* ``config.json`` -- the configuration, to repeat the run with ``ratequant compare --config``;
* ``report.md`` -- tables, findings stated as measured, and the plots;
* ``summary.md`` -- a shorter "Results" section for a README (tables, findings, main plots, the command);
* ``ppl_vs_bits.png``, ``quant_vs_rank.png``, ``curves_<design>.png``, ``bits_<budget>.png``.

Everything is derived from the results alone, so :func:`rebuild_report` (``python -m ratequant.report
results.json``) redraws a report from a saved ``results.json``. Files are written to a temporary folder
first and then moved into place, so a failure leaves no half-written report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ratequant.compare import (
    ALLOCATED_METHODS,
    FIXED_METHODS,
    CompareResults,
    MethodResult,
    budget_text,
)
from ratequant.errors import RateQuantError
from ratequant.jsonio import read_json, write_json

CORE_FILES = ("results.json", "config.json", "report.md", "summary.md")
METHOD_NAMES = {
    "uniform": "uniform",
    "kv-split": "K/V split",
    "layerwise": "layerwise",
    "ratequant": "RateQuant",
    "mismatched": "mismatched",
    "rank": "rank (16-bit)",
    "rank+quant": "rank + quant",
}


@dataclass(frozen=True)
class ReportFiles:
    """Where the report went: the folder and every file written (relative names)."""

    folder: Path
    files: tuple[str, ...]

    @property
    def report(self) -> Path:
        return self.folder / "report.md"

    @property
    def results(self) -> Path:
        return self.folder / "results.json"


def repeat_command(out_dir: str | Path) -> str:
    """The one command that repeats a run whose report is in ``out_dir``."""
    out = Path(out_dir).as_posix()
    return f"ratequant compare --config {out}/config.json --out {out} --force"


def check_output(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse (before any work) to replace an existing report unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RateQuantError(f"{out} exists and is not a folder; pass a folder for --out")
    existing = [name for name in CORE_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise RateQuantError(f"{out} already holds a report ({', '.join(existing)}); pass --force to overwrite it")


# ---------------------------------------------------------------------------------------------------------
# Table building
# ---------------------------------------------------------------------------------------------------------
def _row_key(m: MethodResult, results: CompareResults) -> str:
    """The table row of a quantized method: splits by direction (keys or values wider) and rank in gap."""
    if m.method == "kv-split":
        k, v = (int(x) for x in m.label[1:].split("V"))
        direction = "K>V split" if k > v else "K<V split"
        same = sorted((s for s in results.select(method="kv-split", design=m.design, budget=m.budget)
                       if (int(s.label[1:].split("V")[0]) > int(s.label.split("V")[1])) == (k > v)),
                      key=lambda s: abs(int(s.label[1:].split("V")[0]) - int(s.label.split("V")[1])))
        index = [s.label for s in same].index(m.label)
        return direction if index == 0 else f"{direction} ({index + 1})"
    if m.method == "mismatched":
        return f"mismatched ({m.details.get('source_design')} curves)"
    return METHOD_NAMES.get(m.method, m.method)


def _method_rows(results: CompareResults, design: str) -> list[str]:
    order = []
    for method in ("uniform", "kv-split", "layerwise", "ratequant", "mismatched"):
        for m in results.select(method=method, design=design):
            key = _row_key(m, results)
            if key not in order:
                order.append(key)
    return order


def _fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def _fmt_kl(x: float) -> str:
    return f"{x:.4f}" if x == 0 or x >= 1e-3 else f"{x:.1e}"


def _fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or ("l" * len(header))
    marks = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_table(results: CompareResults, metric: str = "ppl") -> str:
    """Rows (design, method), a column per budget; the best quantized cell of each (design, budget) in bold."""
    budgets = results.config.budgets
    fmt = _fmt_ppl if metric == "ppl" else _fmt_kl
    fp = results.full_precision
    rows = [["full precision", "", *[fmt(getattr(fp, metric))] * len(budgets)]]
    for design in results.config.designs:
        best = {}
        for b in budgets:
            cands = [m for m in results.select(design=design, budget=b)]
            best[b] = min((getattr(m, metric) for m in cands), default=None)
        for key in _method_rows(results, design):
            cells = []
            for b in budgets:
                found = [m for m in results.select(design=design, budget=b) if _row_key(m, results) == key]
                if not found:
                    cells.append("—")
                    continue
                m = found[0]
                text = fmt(getattr(m, metric))
                if getattr(m, metric) == best[b]:
                    text = f"**{text}**"
                if m.method == "kv-split":
                    text += f" ({m.label})"
                cells.append(text)
            rows.append([design, key, *cells])
    for method in ("rank", "rank+quant"):
        cells = []
        for b in budgets:
            found = results.select(method=method, design=None, budget=b)
            cells.append(f"{fmt(getattr(found[0], metric))} (r={found[0].details['rank']})" if found else "—")
        rows.append(["PCA", METHOD_NAMES[method], *cells])
    header = ["design", "method", *[f"{budget_text(b)} bits" for b in budgets]]
    return _md_table(header, rows, "ll" + "r" * len(budgets))


def fit_ratios(results: CompareResults, design: str) -> np.ndarray:
    """Measured over fitted calibration distortion per width ``[nb]`` (geometric mean over components of
    both kinds): above 1 where the fitted curve under-predicts the damage, e.g. at the lowest width."""
    d = results.designs[design]
    predicted = d.fit.predicted_table()
    ok = (d.measured > 0) & (predicted > 0)
    logs = np.where(ok, np.log(np.where(ok, d.measured, 1.0) / np.where(ok, predicted, 1.0)), np.nan)
    return np.exp(np.nanmean(logs.reshape(-1, logs.shape[-1]), axis=0))


def fit_ratio_table(results: CompareResults) -> str:
    """Per design and width: how far the fitted curve is from the measured calibration distortion."""
    bitset = sorted({b for d in results.designs.values() for b in d.fit.bitset})  # designs may fit different widths
    rows = []
    for name, d in results.designs.items():
        ratio = dict(zip(d.fit.bitset, fit_ratios(results, name)))
        rows.append([name, *[f"{ratio[b]:.2f}" if b in ratio else "—" for b in bitset]])
    return _md_table(["design", *[f"{b} bit{'s' if b > 1 else ''}" for b in bitset]], rows, "l" + "r" * len(bitset))


def _low_width_note(results: CompareResults, design: str, budget: float) -> str:
    """Why an allocation may go wrong: how many components sit at its lowest width, and how far the fit is
    from the measured distortion there (calibration data only)."""
    found = results.select(method="ratequant", design=design, budget=budget)
    if not found or found[0].bits is None:
        return ""
    bits = found[0].bits
    low = int(bits.min())
    bitset = list(results.designs[design].fit.bitset)
    ratio = fit_ratios(results, design)[bitset.index(low)] if low in bitset else float("nan")
    count = int((bits == low).sum())
    text = f" Its allocation puts {count} of {bits.size} components at {low} bit{'s' if low > 1 else ''}"
    if ratio > 1.2:
        text += (f", a width where the fitted curve under-predicts the measured calibration distortion by "
                 f"{ratio:.1f}x on average")
    return text + "."


def fit_table(results: CompareResults) -> str:
    rows = []
    for name, d in results.designs.items():
        secs = sum(d.seconds.values())
        rows.append([name, f"{d.beta_key:.2f}", f"{d.beta_value:.2f}", f"{d.r2:.3f}", f"{float(d.fit.r2.min()):.3f}",
                     f"{d.fit.worst_residual:.2f}", d.mismatch_source or "—", f"{secs:.1f}"])
    header = ["design", "beta (keys)", "beta (values)", "R^2", "worst component R^2", "worst abs log residual",
              "mismatched uses curves of", "measure + fit (s)"]
    return _md_table(header, rows, "lrrrrrlr")


def recovered_table(results: CompareResults) -> str:
    rows = []
    by_cell: dict[tuple, dict] = {}
    for r in results.recovered():
        by_cell.setdefault((r["design"], r["budget"]), {})[r["method"]] = r
    for (design, budget), cell in by_cell.items():
        first = next(iter(cell.values()))
        cols = [design, f"{budget_text(budget)}", f"{first['best_fixed']} ({_fmt_ppl(first['best_fixed_ppl'])})"]
        for method in ALLOCATED_METHODS:
            r = cell.get(method)
            cols.append("—" if r is None else f"{_fmt_share(r['share'])} ({_fmt_ppl(r['ppl'])})")
        rq = cell.get("ratequant")
        cols.append("—" if rq is None else (f"{rq['delta_log_ppl']:+.4f}" + (f" ± {rq['se']:.4f}" if rq["se"] is not None else "")))
        rows.append(cols)
    header = ["design", "bits", "best fixed (PPL)", "layerwise", "RateQuant", "mismatched",
              "RateQuant: log PPL gain ± s.e."]
    return _md_table(header, rows, "lrlrrrr")


def storage_table(results: CompareResults) -> str:
    fp = results.full_precision
    rows = []
    for b in results.config.budgets:
        for design in results.config.designs:
            ms = results.select(design=design, budget=b)
            if not ms:
                continue
            nbytes = [m.kv_bytes_per_token for m in ms]
            lo, hi = min(nbytes), max(nbytes)
            text = f"{lo:,.0f}" if abs(hi - lo) < 0.5 else f"{lo:,.0f}–{hi:,.0f}"
            rows.append([budget_text(b), design, text, f"{fp.details['fp16_kv_bytes_per_token'] / hi:.2f}x"])
        for method in ("rank", "rank+quant"):
            for m in results.select(method=method, design=None, budget=b):
                rows.append([budget_text(b), m.label, f"{m.kv_bytes_per_token:,.0f}",
                             f"{fp.details['fp16_kv_bytes_per_token'] / m.kv_bytes_per_token:.2f}x"])
    header = ["bits", "design / method", "KV bytes per token", "smaller than float16 by"]
    return _md_table(header, rows, "llrr")


def rank_table(results: CompareResults) -> str:
    rows = []
    for b in results.config.budgets:
        quant = [m for m in results.select(budget=b) if m.design is not None]
        candidates = []
        fixed = [m for m in quant if m.method in FIXED_METHODS]
        if fixed:
            candidates.append(("best fixed quantization", min(fixed, key=lambda m: m.ppl)))
        rq = [m for m in quant if m.method == "ratequant"]
        if rq:
            candidates.append(("best RateQuant", min(rq, key=lambda m: m.ppl)))
        for name, m in candidates:
            rows.append([budget_text(b), f"{name}: {m.design} {m.label}", f"{m.kv_bytes_per_token:,.0f}",
                         _fmt_ppl(m.ppl), _fmt_kl(m.kl)])
        for method in ("rank", "rank+quant"):
            for m in results.select(method=method, design=None, budget=b):
                rows.append([budget_text(b), m.label, f"{m.kv_bytes_per_token:,.0f}", _fmt_ppl(m.ppl), _fmt_kl(m.kl)])
    return _md_table(["bits", "method", "KV bytes per token", "PPL", "KL"], rows, "llrrr")


# ---------------------------------------------------------------------------------------------------------
def _informative(results) -> str:
    return "; ".join(f"{name} {d.fit.bitset[0]}..{d.fit.bitset[-1]}" for name, d in results.designs.items())


# Findings, stated as measured
# ---------------------------------------------------------------------------------------------------------
def findings(results: CompareResults) -> list[str]:
    """Plain-language bullets derived from the numbers; where RateQuant does not win, they say so."""
    out = []
    cfg = results.config
    recovered = results.recovered()
    rq = [r for r in recovered if r["method"] == "ratequant"]
    n = results.evaluation["windows"]
    if rq:
        wins = [r for r in rq if r["ppl"] < r["best_fixed_ppl"]]
        clear = [r for r in wins if r["se"] is not None and r["delta_log_ppl"] > 2 * r["se"]]
        losses = [r for r in rq if r["ppl"] >= r["best_fixed_ppl"]]
        out.append(
            f"RateQuant has a lower perplexity than the best fixed scheme (uniform or key/value split, whichever is "
            f"best on the evaluation windows) in {len(wins)} of {len(rq)} (design, budget) cells"
            + (f"; in {len(clear)} of them by more than two standard errors over the {n} windows." if n > 1 else ".")
        )
        for r in losses:
            out.append(
                f"**RateQuant does not beat the best fixed scheme for {r['design']} at {budget_text(r['budget'])} bits**: "
                f"PPL {_fmt_ppl(r['ppl'])} against {_fmt_ppl(r['best_fixed_ppl'])} for {r['best_fixed']}."
                + _low_width_note(results, r["design"], r["budget"])
            )
        shares = [r["share"] for r in rq if r["share"] is not None]
        if shares:
            out.append(
                f"Share of the best fixed scheme's perplexity damage that RateQuant recovers: median "
                f"{_fmt_share(float(np.median(shares)))}, from {_fmt_share(min(shares))} to {_fmt_share(max(shares))}."
            )
    lw = {(r["design"], r["budget"]): r for r in recovered if r["method"] == "layerwise"}
    if rq and lw:
        pairs = [(r, lw[(r["design"], r["budget"])]) for r in rq if (r["design"], r["budget"]) in lw]
        beat = [p for p in pairs if p[0]["ppl"] < p[1]["ppl"]]
        text = f"RateQuant (a width per head) beats layer-wise allocation (a width per layer) in {len(beat)} of {len(pairs)} cells."
        lost = [p for p in pairs if p[0]["ppl"] >= p[1]["ppl"]]
        if lost:
            text += " It does not in: " + "; ".join(
                f"{a['design']} at {budget_text(a['budget'])} bits ({_fmt_ppl(a['ppl'])} vs {_fmt_ppl(b['ppl'])})" for a, b in lost
            ) + "."
        out.append(text)
    mm = {(r["design"], r["budget"]): r for r in recovered if r["method"] == "mismatched"}
    if rq and mm:
        pairs = [(r, mm[(r["design"], r["budget"])]) for r in rq if (r["design"], r["budget"]) in mm]
        worse = [p for p in pairs if p[1]["ppl"] > p[0]["ppl"]]
        below_fixed = [p for p in pairs if p[1]["ppl"] > p[1]["best_fixed_ppl"]]
        worst = max(pairs, key=lambda p: p[1]["ppl"] / p[0]["ppl"])
        out.append(
            f"Distortion-model mismatch (allocating with the curves of the design whose betas differ most): perplexity "
            f"is higher than with the design's own curves in {len(worse)} of {len(pairs)} cells and worse than the "
            f"best fixed scheme in {len(below_fixed)} of {len(pairs)}; the largest effect is {worst[0]['design']} at "
            f"{budget_text(worst[0]['budget'])} bits ({worst[1]['label']}: {_fmt_ppl(worst[1]['ppl'])} against "
            f"{_fmt_ppl(worst[0]['ppl'])} with its own curves)."
        )
    kv_pairs = 0
    keys_win = 0
    for design in cfg.designs:
        for b in cfg.budgets:
            splits = results.select(method="kv-split", design=design, budget=b)
            kw = [m for m in splits if int(m.label[1:].split("V")[0]) > int(m.label.split("V")[1])]
            vw = [m for m in splits if int(m.label[1:].split("V")[0]) < int(m.label.split("V")[1])]
            if kw and vw:
                kv_pairs += 1
                keys_win += min(m.ppl for m in kw) < min(m.ppl for m in vw)
    if kv_pairs:
        gaps = []
        for m in results.select(method="ratequant"):
            if m.bits is not None:
                gaps.append(float(m.bits[0].mean() - m.bits[1].mean()))
        text = f"Keys wider than values (e.g. K4V2) beats the reverse split in {keys_win} of {kv_pairs} cells."
        if gaps:
            text += (f" RateQuant, which is not told which components are keys, gives keys on average "
                     f"{np.mean(gaps):+.2f} bits relative to values (mean key width minus mean value width; from "
                     f"{min(gaps):+.2f} to {max(gaps):+.2f} across designs and budgets).")
        out.append(text)
    rank_rows = []
    for b in cfg.budgets:
        quant = [m for m in results.select(budget=b) if m.design is not None]
        for method in ("rank", "rank+quant"):
            for m in results.select(method=method, design=None, budget=b):
                worse_than = [q for q in quant if q.ppl < m.ppl]
                rank_rows.append((m, len(worse_than), len(quant)))
    if rank_rows:
        all_worse = all(w == t for _, w, t in rank_rows)
        if all_worse:
            out.append("At matched storage, rank reduction (16-bit coefficients, and the rank-plus-quantization hybrid) "
                       "is worse than every quantized method of every design at every budget.")
        else:
            text = "Rank reduction at matched storage against the quantized methods: " + "; ".join(
                f"{m.label} at {budget_text(m.budget)} bits (PPL {_fmt_ppl(m.ppl)}) is worse than {w} of the {t} quantized "
                f"methods"
                for m, w, t in rank_rows
            ) + "."
            out.append(text)
    betas = [(d.beta_key, d.beta_value) for d in results.designs.values()]
    if betas:
        flat = [x for pair in betas for x in pair]
        r2 = [d.r2 for d in results.designs.values()]
        out.append(f"Fitted betas range from {min(flat):.2f} to {max(flat):.2f} (the RateQuant paper reports 3.6 to 5.3 "
                   f"across designs); R^2 of the fits in log space from {min(r2):.3f} to {max(r2):.3f}.")
    return out


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def _plots(results: CompareResults, folder: Path) -> list[str]:
    from ratequant.evaluation.plots import bits_heatmap_grid, distortion_curves, method_panels

    written = []
    fp = results.full_precision
    cfg = results.config
    rank_series = {}
    for method in ("rank", "rank+quant"):
        ms = results.select(method=method, design=None)
        if ms:
            rank_series[METHOD_NAMES[method]] = ([m.budget for m in ms], [m.ppl for m in ms])
    panels = {}
    for design in cfg.designs:
        series: dict[str, tuple[list, list]] = {}
        for m in results.select(design=design):
            key = _row_key(m, results)
            if m.method == "mismatched":
                key = "mismatched (other design's curves)"
            xs, ys = series.setdefault(key, ([], []))
            xs.append(m.budget)
            ys.append(m.ppl)
        series.update(rank_series)
        panels[design] = series
    method_panels(panels, folder / "ppl_vs_bits.png", xlabel="average code bits (budget)", reference=fp.ppl,
                  title=f"{results.model['name']}: perplexity against bits")
    written.append("ppl_vs_bits.png")

    series = {}
    fixed_best = {}
    for b in cfg.budgets:
        fixed = [m for m in results.select(budget=b) if m.method in FIXED_METHODS]
        if fixed:
            fixed_best[b] = min(fixed, key=lambda m: m.ppl)
    if fixed_best:
        series["best fixed quantization (any design)"] = ([m.kv_bytes_per_token for m in fixed_best.values()],
                                                          [m.ppl for m in fixed_best.values()])
    for design in cfg.designs:
        ms = results.select(method="ratequant", design=design)
        if ms:
            series[f"RateQuant, {design}"] = ([m.kv_bytes_per_token for m in ms], [m.ppl for m in ms])
    for method in ("rank", "rank+quant"):
        ms = results.select(method=method, design=None)
        if ms:
            series[METHOD_NAMES[method]] = ([m.kv_bytes_per_token for m in ms], [m.ppl for m in ms])
    method_panels({"at matched storage": series}, folder / "quant_vs_rank.png", xlabel="true KV bytes per token",
                  reference=fp.ppl, title=f"{results.model['name']}: quantization against rank reduction",
                  dashed=("best fixed quantization (any design)",))
    written.append("quant_vs_rank.png")

    for name, d in results.designs.items():
        path = f"curves_{name}.png"
        distortion_curves(d.measured, d.fit.alpha, (d.beta_key, d.beta_value), d.fit.bitset, folder / path,
                          title=f"{name}: measured distortion ({cfg.metric}) and fitted alpha * beta^-b")
        written.append(path)
    for b in cfg.budgets:
        rows = {}
        for design in cfg.designs:
            for method in ("ratequant", "mismatched"):
                for m in results.select(method=method, design=design, budget=b):
                    if m.bits is not None:
                        tag = "RateQuant" if method == "ratequant" else f"with {m.details.get('source_design')} curves"
                        rows[f"{design} {tag}"] = m.bits
        if rows:
            path = f"bits_{budget_text(b)}.png"
            bits_heatmap_grid(rows, folder / path, title=f"bits per layer and kv head at {budget_text(b)} average bits")
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------
def _setup_lines(results: CompareResults) -> list[str]:
    cfg, m, ev = results.config, results.model, results.evaluation
    fp = results.full_precision
    return [
        f"- Model: `{m['name']}` ({m['num_layers']} layers, {m['num_kv_heads']} KV heads, head dim {m['head_dim']}, "
        f"{m['dtype']}); corpus `{results.corpus['name']}` (sha256 `{results.corpus['sha256'][:12]}…`).",
        f"- Calibration: {cfg.calibration_sequences} sequence(s) of {cfg.calibration_seq_len} tokens of the calibration "
        f"split, metric `{cfg.metric}`, widths {cfg.bitset[0]}..{cfg.bitset[-1]}; the allocators use each design's "
        f"informative widths ({_informative(results)}: a width whose reconstruction of the calibration keys or values "
        f"is worse than their mean is left out). Evaluation: {ev['windows']} "
        f"non-overlapping windows of {ev['seq_len']} tokens ({ev['tokens']} predicted tokens) of the evaluation split.",
        f"- Full precision: PPL {_fmt_ppl(fp.ppl)}. KL is the mean per-token KL(full || method) in nats on the same tokens.",
        f"- Simulated quantization with a full-precision residual window of {cfg.residual} tokens "
        + ("(every whole quantization chunk is quantized, as in the papers' figures; with short evaluation windows a "
           "128-token window would keep a large share of the context at full precision and hide the differences)"
           if cfg.residual == 0 else "")
        + f". True bytes count codes, scales/zeros and the residual buffer at {cfg.context_tokens} tokens of context; "
        f"the model's own dtype ({m['dtype']}) is {fp.kv_bytes_per_token:,.0f} bytes per token, float16 would be "
        f"{fp.details['fp16_kv_bytes_per_token']:,} bytes.",
        f"- Rank reduction: per-component PCA of the calibration keys and values; `rank` keeps r = floor(bits x "
        f"head_dim / 16) coefficients at 16 bits, `rank + quant` the largest r whose {cfg.hybrid_design} "
        f"{cfg.hybrid_bits}-bit coefficients plus per-token metadata fit the same bits; the bases are a per-model "
        f"constant, not counted per token. No residual window.",
    ]


def report_markdown(results: CompareResults, *, image_prefix: str = "", command: str | None = None,
                    repeat: str | None = None, files: Sequence[str] = ()) -> str:
    """The full report (``report.md``)."""
    cfg = results.config
    lines = [f"# ratequant compare: {results.model['name']}", ""]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    if repeat:
        lines += ["Repeat exactly (the configuration is saved beside the results):", "", "```", repeat, "```", ""]
    lines += ["## Setup", "", *_setup_lines(results), "", "## Findings", ""]
    lines += [f"- {f}" for f in findings(results)]
    lines += ["- The best fixed scheme is chosen on the evaluation windows themselves (an oracle choice that favours "
              "the baseline); RateQuant and layerwise are chosen from the calibration split only.", ""]
    lines += ["## Perplexity by method and budget", "",
              "Lower is better; bold: the best of the design at that budget. Splits show which one.", "",
              metric_table(results, "ppl"), "",
              f"![perplexity against bits]({image_prefix}ppl_vs_bits.png)", "",
              "## KL divergence from full precision (nats per token)", "", metric_table(results, "kl"), "",
              "## Damage recovered relative to the best fixed scheme", "",
              "share = (PPL_best_fixed - PPL_method) / (PPL_best_fixed - PPL_full_precision): 100% removes all of the "
              "best fixed scheme's damage, negative is worse than it. The last column is log PPL_best_fixed - log "
              "PPL_RateQuant with its paired standard error over the evaluation windows.", "",
              recovered_table(results), "",
              "## Fitted distortion curves", "",
              "D(b) = alpha * beta^-b, one beta per design and kind; R^2 in log space (pooled within components).", "",
              fit_table(results), "",
              "Measured over fitted distortion on the calibration data, by width (geometric mean over components; "
              "1.00 is a perfect fit, above 1 the curve under-predicts the damage an allocator is trading):", "",
              fit_ratio_table(results), ""]
    lines += [f"![{name} curves]({image_prefix}curves_{name}.png)" for name in results.designs] + [""]
    lines += ["## Bits chosen per layer and head", "",
              "RateQuant's widths with each design's own curves, and with the mismatched curves.", ""]
    lines += [f"![bits at {budget_text(b)}]({image_prefix}bits_{budget_text(b)}.png)" for b in cfg.budgets
              if f"bits_{budget_text(b)}.png" in files or not files] + [""]
    lines += ["## Quantization against rank reduction at matched storage", "", rank_table(results), "",
              f"![quantization against rank reduction]({image_prefix}quant_vs_rank.png)", "",
              "## Storage", "", storage_table(results), ""]
    if results.skipped:
        lines += ["## Methods not run", ""]
        grouped: dict[tuple, list[str]] = {}
        for s in results.skipped:
            grouped.setdefault((s["label"], s["budget"], s["reason"]), []).append(s["design"] or "-")
        lines += [f"- {label} at {budget_text(b)} bits ({', '.join(designs)}): {reason}"
                  for (label, b, reason), designs in grouped.items()]
        lines += [""]
    t = results.timings
    per_design = ", ".join(f"{d} {s:.1f} s" for d, s in t["calibration"]["per_design"].items())
    lines += ["## Time", "",
              f"- Calibration capture (shared by all designs): {t['capture']:.1f} s; distortion measurement and fit: "
              f"{per_design}; rank bases: {t['rank_bases']:.1f} s; allocations: {t['allocation']:.1f} s.",
              f"- Evaluation: {t['evaluation']:.1f} s; total {t['total']:.1f} s (ratequant {results.environment['ratequant_version']}, "
              f"torch {results.environment['torch_version']}, {results.environment['threads']} threads, "
              f"{results.environment['device']}).", ""]
    return "\n".join(lines)


def summary_markdown(results: CompareResults, *, image_prefix: str = "", command: str | None = None,
                     heading: str = "## Results") -> str:
    """A README "Results" section: the command, the setup, the main tables, the findings and the main plots."""
    cfg = results.config
    lines = [heading, ""]
    if command:
        lines += ["Generated by `ratequant compare` with:", "", "```", command, "```", ""]
    lines += [*_setup_lines(results), "", "Perplexity (lower is better; bold: best of the design at that budget):", "",
              metric_table(results, "ppl"), "", "What the numbers say:", ""]
    lines += [f"- {f}" for f in findings(results)]
    lines += ["- The best fixed scheme is picked on the evaluation windows themselves, which favours it.", "",
              "Share of the best fixed scheme's damage recovered (see the report for the definition):", "",
              recovered_table(results), "", "Fitted curves:", "", fit_table(results), "",
              "Measured over fitted calibration distortion by width (1.00: the curve is exact there):", "",
              fit_ratio_table(results), "",
              f"![perplexity against bits]({image_prefix}ppl_vs_bits.png)", "",
              f"![quantization against rank reduction]({image_prefix}quant_vs_rank.png)", ""]
    lowest = budget_text(cfg.budgets[0])
    lines += [f"![bits at {lowest}]({image_prefix}bits_{lowest}.png)", ""]
    first = next(iter(results.designs))
    lines += [f"![{first} curves]({image_prefix}curves_{first}.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def write_report(results: CompareResults, out_dir: str | Path, *, overwrite: bool = False, command: str | None = None,
                 image_prefix: str = "", summary_image_prefix: str | None = None) -> ReportFiles:
    """Write the whole report into ``out_dir`` (see the module docstring); refuses to replace one unless
    ``overwrite``. ``command`` is the command line that made it (recorded); ``summary_image_prefix``
    (default ``image_prefix``) prefixes the image links of ``summary.md``, e.g. the folder relative to a README."""
    out = Path(out_dir)
    check_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    previous = []
    if (out / "results.json").is_file():
        try:
            previous = list(read_json(out / "results.json").get("report", {}).get("files", []))
        except RateQuantError:
            previous = []
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".report-"))
    try:
        files = _plots(results, staging)
        repeat = repeat_command(out)
        names = [*CORE_FILES, *files]
        payload = results.to_dict()
        payload["report"] = {"files": names, "repeat": repeat, "command": command}
        write_json(staging / "results.json", payload)
        results.config.to_json(staging / "config.json")
        (staging / "report.md").write_text(
            report_markdown(results, image_prefix=image_prefix, command=command, repeat=repeat, files=files), encoding="utf-8")
        prefix = image_prefix if summary_image_prefix is None else summary_image_prefix
        (staging / "summary.md").write_text(summary_markdown(results, image_prefix=prefix, command=command),
                                            encoding="utf-8")
        for name in previous:
            if name not in names and "/" not in name and (out / name).is_file():
                (out / name).unlink()
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReportFiles(folder=out, files=tuple(names))


def rebuild_report(results_json: str | Path, out_dir: str | Path | None = None, *, summary_image_prefix: str | None = None) -> ReportFiles:
    """Redraw the report from a saved ``results.json`` (into its own folder unless ``out_dir``)."""
    data = read_json(results_json, what="compare results")
    results = CompareResults.from_dict(data)
    command = (data.get("report") or {}).get("command")
    out = Path(results_json).parent if out_dir is None else Path(out_dir)
    return write_report(results, out, overwrite=True, command=command, summary_image_prefix=summary_image_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ratequant.report", description="Rebuild a compare report from its results.json.")
    parser.add_argument("results", help="results.json written by ratequant compare")
    parser.add_argument("--out", help="folder for the report (default: the folder of results.json)")
    parser.add_argument("--summary-image-prefix", help="prefix of image links in summary.md, e.g. the folder relative to a README")
    args = parser.parse_args(argv)
    try:
        files = rebuild_report(args.results, args.out, summary_image_prefix=args.summary_image_prefix)
    except RateQuantError as exc:
        print(f"ratequant: error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {files.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
