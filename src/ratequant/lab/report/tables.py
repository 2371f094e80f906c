"""Markdown tables of a comparison: every number comes from the typed results, nothing is parsed from labels.

One module of this size because every table reads the same typed results the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ratequant.lab.config import ALLOCATED_METHODS, FIXED_METHODS, QUANTIZED_METHODS, RANK_METHODS, budget_text
from ratequant.lab.long_context import with_statistics
from ratequant.lab.results import CompareResults, MethodResult
from ratequant.validation import inert

METHOD_NAMES = {
    "uniform": "uniform",
    "kv-split": "K/V split",
    "layerwise": "layerwise",
    "ratequant": "RateQuant",
    "default": "default plan",
    "auto": "auto (any design)",
    "mismatched": "mismatched",
    "ratequant-search": "RateQuant + KL search",
    "norms": "weight norms",
    "ratequant-component": "RateQuant, beta per component",
    "measured": "measured damage",
    "rank": "rank (16-bit)",
    "rank+quant": "rank + quant",
}
METRIC_NAMES = {"kl": "KL", "ppl": "PPL"}


def fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def fmt_kl(x: float) -> str:
    return f"{x:.4f}" if x == 0 or x >= 1e-3 else f"{x:.1e}"


def fmt_metric(metric: str, x: float) -> str:
    return fmt_ppl(x) if metric == "ppl" else fmt_kl(x)


def fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


_MD_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*_[]|~$"})
_HTML = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def md_text(text: object) -> str:
    """``text`` (a name read from a file or a model) as inert markdown: one line, control characters shown
    (:func:`~ratequant.validation.inert`), markdown specials backslash-escaped and ``& < >`` as HTML entities,
    so it renders as the characters it holds, in running text and in table cells alike."""
    return inert(text).translate(_MD_SPECIALS).translate(_HTML)


def md_code(text: object) -> str:
    """``text`` as an inline code span that holds it literally: fenced by more backticks than it contains in a
    row, padded when it starts or ends with one (CommonMark). Not for table cells (use :func:`md_text`)."""
    text = inert(text)
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_fenced(text: object) -> list[str]:
    """``text`` as the lines of a fenced code block whose fence no line of it can close."""
    lines = [inert(line) for line in str(text).splitlines()] or [""]
    fence = "`" * max(3, max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0) + 1)
    return [fence, *lines, fence]


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or ("l" * len(header))
    marks = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def row_key(m: MethodResult, results: CompareResults) -> str:
    """The table row of a quantized method: key/value splits by direction (keys or values wider), then by gap."""
    if m.method == "kv-split":
        direction = "K>V split" if m.keys_wider else "K<V split"
        same = sorted(
            (
                s
                for s in results.select(method="kv-split", design=m.design, budget=m.budget)
                if s.keys_wider == m.keys_wider
            ),
            key=lambda s: abs(s.key_bits - s.value_bits),
        )
        index = [s.label for s in same].index(m.label)
        return direction if index == 0 else f"{direction} ({index + 1})"
    if m.method == "mismatched":
        return f"mismatched ({m.details['curves']['design']} curves)"
    return METHOD_NAMES.get(m.method, m.method)


def _method_rows(results: CompareResults, design: str) -> list[str]:
    order = []
    for method in QUANTIZED_METHODS:
        for m in results.select(method=method, design=design):
            key = row_key(m, results)
            if key not in order:
                order.append(key)
    return order


def metric_table(results: CompareResults, metric: str = "kl", evaluation: str | None = None) -> str:
    """Rows (design, method), a column per budget; the best quantized cell of each (design, budget) in bold.
    KL cells carry their standard error over tokens."""
    budgets = results.config.budgets

    def value(m: MethodResult) -> float:
        return getattr(m.score(evaluation), metric)

    def cell(m: MethodResult) -> str:
        s = m.score(evaluation)
        return fmt_metric(metric, value(m)) + (f" ± {fmt_kl(s.kl_se)}" if metric == "kl" and s.kl > 0 else "")

    fp = results.full_precision
    rows = [["full precision", "", *[fmt_metric(metric, value(fp))] * len(budgets)]]
    for design in results.config.designs:
        best = {b: min((value(m) for m in results.select(design=design, budget=b)), default=None) for b in budgets}
        for key in _method_rows(results, design):
            cells = []
            for b in budgets:
                found = [m for m in results.select(design=design, budget=b) if row_key(m, results) == key]
                if not found:
                    cells.append("—")
                    continue
                m = found[0]
                text = cell(m)
                if value(m) == best[b]:
                    text = f"**{text}**"
                if m.method == "kv-split":
                    text += f" ({m.label})"
                cells.append(text)
            rows.append([design, key, *cells])
    for method in RANK_METHODS:
        cells = []
        for b in budgets:
            found = results.select(method=method, design=None, budget=b)
            cells.append(f"{cell(found[0])} (r={found[0].details['rank']})" if found else "—")
        rows.append(["PCA", METHOD_NAMES[method], *cells])
    header = ["design", "method", *[f"{budget_text(b)} bits" for b in budgets]]
    return md_table(header, rows, "ll" + "r" * len(budgets))


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
    return md_table(["design", *[f"{b} bit{'s' if b > 1 else ''}" for b in bitset]], rows, "l" + "r" * len(bitset))


def fit_table(results: CompareResults) -> str:
    rows = []
    for name, d in results.designs.items():
        secs = sum(d.seconds.values())
        low = "—" if d.min_bits is None else f"{d.min_bits[0]} / {d.min_bits[1]}"
        rows.append(
            [
                name,
                f"{d.beta_key:.2f}",
                f"{d.beta_value:.2f}",
                f"{d.r2:.3f}",
                f"{float(d.fit.r2.min()):.3f}",
                f"{d.fit.worst_residual:.2f}",
                low,
                d.mismatch_source or "—",
                f"{secs:.1f}",
            ]
        )
    header = [
        "design",
        "beta (keys)",
        "beta (values)",
        "R^2",
        "worst component R^2",
        "worst abs log residual",
        "lowest informative width (K / V)",
        "mismatched uses curves of",
        "measure + fit (s)",
    ]
    return md_table(header, rows, "lrrrrrllr")


def recovered_table(results: CompareResults, metric: str = "kl", evaluation: str | None = None) -> str:
    """Per (design, budget): the best fixed scheme and the share of its damage each allocator recovers."""
    rows = []
    by_cell: dict[tuple, dict] = {}
    recovered = results.recovered(evaluation, metric)
    for r in recovered:
        by_cell.setdefault((r["design"], r["budget"]), {})[r["method"]] = r
    methods = [m for m in ALLOCATED_METHODS if any(r["method"] == m for r in recovered)]
    for (design, budget), cell in by_cell.items():
        first = next(iter(cell.values()))
        cols = [design, budget_text(budget), f"{first['best_fixed']} ({fmt_metric(metric, first['best_fixed_value'])})"]
        for method in methods:
            r = cell.get(method)
            cols.append("—" if r is None else f"{fmt_share(r['share'])} ({fmt_metric(metric, r['value'])})")
        rq = cell.get("ratequant")
        gain = "—" if rq is None else f"{rq['delta']:+.4f}" + (f" ± {rq['se']:.4f}" if rq["se"] is not None else "")
        rows.append([*cols, gain])
    gain = "KL gain" if metric == "kl" else "log PPL gain"
    header = [
        "design",
        "bits",
        f"best fixed ({METRIC_NAMES[metric]})",
        *(METHOD_NAMES[m] for m in methods),
        f"RateQuant: {gain} ± s.e.",
    ]
    return md_table(header, rows, "lrl" + "r" * (len(methods) + 1))


def storage_table(results: CompareResults) -> str:
    fp = results.full_precision
    fp16 = fp.details["fp16_kv_bytes_per_token"]
    rows = []
    for b in results.config.budgets:
        for design in results.config.designs:
            ms = results.select(design=design, budget=b)
            if not ms:
                continue
            nbytes = [m.kv_bytes_per_token for m in ms]
            lo, hi = min(nbytes), max(nbytes)
            text = f"{lo:,.0f}" if abs(hi - lo) < 0.5 else f"{lo:,.0f}–{hi:,.0f}"
            rows.append([budget_text(b), design, text, f"{fp16 / hi:.2f}x"])
        for method in RANK_METHODS:
            for m in results.select(method=method, design=None, budget=b):
                rows.append(
                    [budget_text(b), m.label, f"{m.kv_bytes_per_token:,.0f}", f"{fp16 / m.kv_bytes_per_token:.2f}x"]
                )
    header = ["bits", "design / method", "KV bytes per token", "smaller than float16 by"]
    return md_table(header, rows, "llrr")


def rank_table(results: CompareResults, evaluation: str | None = None) -> str:
    rows = []
    for b in results.config.budgets:
        quant = [m for m in results.select(budget=b) if m.design is not None]
        candidates = []
        fixed = [m for m in quant if m.method in FIXED_METHODS]
        if fixed:
            candidates.append(("best fixed quantization", min(fixed, key=lambda m: m.score(evaluation).kl)))
        rq = [m for m in quant if m.method == "ratequant"]
        if rq:
            candidates.append(("best RateQuant", min(rq, key=lambda m: m.score(evaluation).kl)))
        rows += [
            [
                budget_text(b),
                f"{name}: {m.design} {m.label}",
                f"{m.kv_bytes_per_token:,.0f}",
                fmt_ppl(m.score(evaluation).ppl),
                fmt_kl(m.score(evaluation).kl),
            ]
            for name, m in candidates
        ]
        for method in RANK_METHODS:
            for m in results.select(method=method, design=None, budget=b):
                rows.append(
                    [
                        budget_text(b),
                        m.label,
                        f"{m.kv_bytes_per_token:,.0f}",
                        fmt_ppl(m.score(evaluation).ppl),
                        fmt_kl(m.score(evaluation).kl),
                    ]
                )
    return md_table(["bits", "method", "KV bytes per token", "PPL", "KL"], rows, "llrrr")


def evaluations_table(results: CompareResults) -> str:
    """One row per evaluation (corpus and scoring): its tokens, full precision, and how RateQuant (and its KL
    search, when run) fares against the best fixed scheme there, on KL."""
    present = {r["method"] for r in results.recovered(None, "kl")}
    methods = [m for m in ("ratequant", "ratequant-search") if m in present] or ["ratequant"]
    rows = []
    for name, ev in results.evaluations.items():
        fp = results.full_precision.score(name)
        mark = " (headline)" if name == results.primary else ""
        row = [
            f"{md_text(ev['corpus'])}, {md_text(ev['scoring'])}{mark}",
            f"{ev['scored_tokens']:,}",
            f"{fmt_ppl(fp.ppl)} ± {fmt_ppl(fp.ppl_se)}",
        ]
        for method in methods:
            cells = [r for r in results.recovered(name, "kl") if r["method"] == method and not r["no_choice"]]
            wins = sum(r["value"] < r["best_fixed_value"] for r in cells)
            shares = [r["share"] for r in cells if r["share"] is not None]
            row.append(f"{wins} of {len(cells)}")
            row.append(
                f"{fmt_share(float(np.median(shares)))} ({fmt_share(min(shares))} to {fmt_share(max(shares))})"
                if shares
                else "—"
            )
        rows.append(row)
    header = ["evaluation", "scored tokens", "full-precision PPL"]
    for method in methods:
        header += [f"{METHOD_NAMES[method]} beats best fixed (KL)", "KL damage recovered: median (range)"]
    return md_table(header, rows, "lrr" + "rr" * len(methods))


def long_context_of(results: CompareResults) -> dict | None:
    """The long-context study of ``results`` (:mod:`ratequant.lab.long_context`), or None when it was not run;
    results saved before it existed held one passkey study, read here as a study of that one task."""
    if "long_context" in results.extra:
        return results.extra["long_context"]
    passkey = results.extra.get("passkey")
    if not passkey:
        return None
    conditions = {label: {"roles": [], "method": r.get("method")} for label, r in passkey["results"].items()}
    task = {**passkey, "results": with_statistics(passkey["results"])}
    return {"settings": passkey["settings"], "conditions": conditions, "tasks": {"passkey": task}}


def long_context_table(study: dict, task: str) -> str:
    """One task of the long-context study: per condition the roles it plays, accuracy with its 95% Wilson
    interval, the mean answer log-probability, and its paired change from full precision on the same prompts."""
    results = study["tasks"][task]["results"]
    rows = []
    for label, r in results.items():
        roles = ", ".join(study["conditions"].get(label, {}).get("roles", []))
        if "error" in r:  # a peer's cache that refused the task's prompts
            rows.append([md_text(label), md_text(roles), "failed", "—", md_text(r["error"]), "0"])
            continue
        low, high, change = r["accuracy_low"], r["accuracy_high"], r["logprob_change"]
        right = sum(t["correct"] for t in r["trials_detail"])
        shift = "—" if label == "full precision" else f"{change['mean']:+.3f} ± {change['se']:.3f}"
        accuracy = f"{right / r['trials']:.0%} ({low:.0%}–{high:.0%})"
        rows.append([md_text(label), md_text(roles), accuracy, f"{r['mean_logprob']:.3f}", shift, str(r["trials"])])
    header = ["condition", "role", "accuracy (95% CI)", "answer log-prob (nats)", "change from full precision (± SE)"]
    return md_table([*header, "prompts"], rows, "llrrrr")


def norms_table(results: CompareResults) -> str:
    """Per layer: spectral and Frobenius norms of W_K and W_V, their ratio, and the mean key and value widths
    RateQuant gives that layer at the lowest budget (first design)."""
    norms = results.extra.get("weight_norms")
    if not norms:
        return ""
    design, budget = results.config.designs[0], results.config.budgets[0]
    rq = results.select(method="ratequant", design=design, budget=budget)
    bits = rq[0].bits if rq and rq[0].bits is not None else None
    rows = []
    for layer, (sk, sv, fk, fv) in enumerate(
        zip(norms["spectral_key"], norms["spectral_value"], norms["frobenius_key"], norms["frobenius_value"])
    ):
        widths = "—" if bits is None else f"{bits[0, layer].mean():.2f} / {bits[1, layer].mean():.2f}"
        rows.append(
            [str(layer), f"{sk:.2f}", f"{sv:.2f}", f"{sk / max(sv, 1e-30):.2f}", f"{fk:.2f}", f"{fv:.2f}", widths]
        )
    header = [
        "layer",
        "‖W_K‖₂",
        "‖W_V‖₂",
        "ratio",
        "‖W_K‖_F",
        "‖W_V‖_F",
        f"RateQuant K / V bits ({design}, {budget_text(budget)})",
    ]
    return md_table(header, rows, "lrrrrrr")


def sink_study_table(results: CompareResults) -> str:
    """KL (± s.e.) of the focus design's schemes with each sink count, with and without BOS."""
    study = results.extra.get("sink_study")
    if not study:
        return ""
    counts = study["sink_tokens"]
    cells: dict[tuple, dict] = {}
    for r in study["rows"]:
        if r["sink_tokens"] is not None:
            cells.setdefault((r["bos"], r["budget"], r["label"]), {})[r["sink_tokens"]] = r
    rows = []
    for (bos, budget, label), by_count in cells.items():
        base = by_count.get(counts[0])
        out = [bos, budget_text(budget), label]
        for c in counts:
            r = by_count[c]
            change = "" if base is None or c == counts[0] else f" ({(r['kl'] - base['kl']) / base['kl']:+.0%})"
            out.append(f"{fmt_kl(r['kl'])} ± {fmt_kl(r['kl_se'])}{change}")
        rows.append(out)
    return md_table(
        ["BOS", "bits", "method", *[f"{c} sink token(s)" for c in counts]], rows, "llll" + "r" * (len(counts) - 1)
    )


HEADROOM_ROWS = ("ratequant", "ratequant-search", "ratequant-component", "measured")


def headroom_table(results: CompareResults) -> str:
    """Per headroom design and budget: KL of the best fixed scheme, RateQuant, its KL-searched refinement, the
    per-component-beta fit and the allocation on measured damage, with the share of the best fixed scheme's KL
    damage each recovers."""
    designs = list(results.extra.get("headroom", {}))
    if not designs:
        return ""
    rows = []
    for r in results.recovered(None, "kl"):
        if r["design"] not in designs or r["method"] not in HEADROOM_ROWS:
            continue
        rows.append(
            [
                r["design"],
                budget_text(r["budget"]),
                METHOD_NAMES[r["method"]],
                fmt_kl(r["value"]),
                f"{r['best_fixed']} ({fmt_kl(r['best_fixed_value'])})",
                fmt_share(r["share"]),
            ]
        )
    return md_table(["design", "bits", "allocation", "KL", "best fixed (KL)", "damage recovered"], rows, "lrlrlr")


__all__ = [
    "METHOD_NAMES",
    "headroom_table",
    "norms_table",
    "sink_study_table",
    "evaluations_table",
    "long_context_of",
    "long_context_table",
    "fit_ratio_table",
    "fit_ratios",
    "fit_table",
    "fmt_kl",
    "fmt_metric",
    "fmt_ppl",
    "fmt_share",
    "md_table",
    "metric_table",
    "rank_table",
    "recovered_table",
    "row_key",
    "storage_table",
]
