"""Findings of a comparison in plain language, stated as measured; where RateQuant does not win, they say so.

The headline metric is the KL divergence from full precision (the less noisy measure of damage, as llama.cpp's
maintainers judge KV cache types); perplexity is reported beside it.
"""

from __future__ import annotations

import numpy as np

from ratequant.lab.config import RANK_METHODS, budget_text
from ratequant.lab.report.tables import fit_ratios, fmt_kl, fmt_metric, fmt_ppl, fmt_share
from ratequant.lab.results import CompareResults

WHAT = {"kl": "KL divergence", "ppl": "perplexity"}


def low_width_note(results: CompareResults, design: str, budget: float) -> str:
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
        text += (
            f", a width where the fitted curve under-predicts the measured calibration distortion by "
            f"{ratio:.1f}x on average"
        )
    return text + "."


def versus_best_fixed(results: CompareResults, metric: str, evaluation: str | None = None) -> list[str]:
    """RateQuant against the best fixed scheme on ``metric``: wins, clear wins, losses, shares recovered."""
    out = []
    rq = [r for r in results.recovered(evaluation, metric) if r["method"] == "ratequant"]
    forced = [r for r in rq if r["no_choice"]]
    rq = [r for r in rq if not r["no_choice"]]
    if forced:
        cells = ", ".join(f"{r['design']} at {budget_text(r['budget'])} bits" for r in forced)
        out.append(
            f"No allocator has a choice in {len(forced)} cell(s) ({cells}): the budget is the mean of the narrowest "
            "informative key and value widths, so every component sits at its kind's narrowest width and the "
            "allocators return that fixed scheme itself. They are left out of the counts below."
        )
    if not rq:
        return out
    n = len(results.full_precision.score(evaluation).window_nll)
    wins = [r for r in rq if r["value"] < r["best_fixed_value"]]
    clear = [r for r in wins if r["se"] is not None and r["delta"] > 2 * r["se"]]
    out.append(
        f"RateQuant has a lower {WHAT[metric]} than the best fixed scheme (uniform or key/value split, whichever is "
        f"best on the evaluation windows) in {len(wins)} of {len(rq)} (design, budget) cells"
        + (f"; in {len(clear)} of them by more than two standard errors over the {n} windows." if n > 1 else ".")
    )
    for r in rq:
        if r["value"] >= r["best_fixed_value"]:
            out.append(
                f"**RateQuant does not beat the best fixed scheme for {r['design']} at "
                f"{budget_text(r['budget'])} bits** ({WHAT[metric]}): {fmt_metric(metric, r['value'])} against "
                f"{fmt_metric(metric, r['best_fixed_value'])} "
                f"for {r['best_fixed']}." + low_width_note(results, r["design"], r["budget"])
            )
    shares = [r["share"] for r in rq if r["share"] is not None]
    if shares:
        out.append(
            f"Share of the best fixed scheme's {WHAT[metric]} damage that RateQuant recovers: median "
            f"{fmt_share(float(np.median(shares)))}, from {fmt_share(min(shares))} to {fmt_share(max(shares))}."
        )
    return out


def search_findings(results: CompareResults, evaluation: str | None = None) -> list[str]:
    """``RateQuant + KL search`` against the best fixed scheme and RateQuant alone, on KL."""
    rows = [r for r in results.recovered(evaluation, "kl") if not r["no_choice"]]
    alone = {(r["design"], r["budget"]): r for r in rows if r["method"] == "ratequant"}
    pairs = [(r, alone[r["design"], r["budget"]]) for r in rows if r["method"] == "ratequant-search"]
    pairs = [(r, q) for r, q in pairs if r["share"] is not None and q["share"] is not None]
    if not pairs:
        return []
    wins = sum(r["value"] < r["best_fixed_value"] for r, _ in pairs)
    ties = sum(r["value"] == r["best_fixed_value"] for r, _ in pairs)
    kept = sum(r["value"] != q["value"] for r, q in pairs)
    cal = results.config.calibration
    cells = "; ".join(
        f"{r['design']} {budget_text(r['budget'])} bits {fmt_share(r['share'])} (RateQuant {fmt_share(q['share'])})"
        for r, q in pairs
    )
    return [
        f"RateQuant + KL search (RateQuant's widths, or the same-size fixed split, refined on the KL of "
        f"{cal.search_tokens} calibration tokens with {cal.search_proposals} proposals) beats "
        f"the best fixed scheme in {wins} of {len(pairs)} cells and ties it in {ties} (it becomes that split); its "
        f"plan differs from RateQuant's in {kept}. Share of the best fixed scheme's KL damage recovered: {cells}."
    ]


def study_findings(results: CompareResults) -> list[str]:
    """What the side studies say: sinks, the weight-norm peer, the measured-damage headroom."""
    out = []
    study = results.extra.get("sink_study")
    if study and len(study["sink_tokens"]) > 1:
        counts = study["sink_tokens"]
        for bos in ("no", "yes"):
            rows = [r for r in study["rows"] if r["bos"] == bos and r["sink_tokens"] is not None]
            base = {(r["budget"], r["label"]): r["kl"] for r in rows if r["sink_tokens"] == counts[0]}
            for c in counts[1:]:
                changes = [
                    (r["kl"] - base[(r["budget"], r["label"])]) / base[(r["budget"], r["label"])]
                    for r in rows
                    if r["sink_tokens"] == c and base.get((r["budget"], r["label"]))
                ]
                if changes:
                    out.append(
                        f"Keeping {c} sink token(s) at full precision (windows {'with' if bos == 'yes' else 'without'} "
                        f"BOS, {study['design']}) changes the KL by a median {fmt_share(float(np.median(changes)))} "
                        f"(from {fmt_share(min(changes))} to {fmt_share(max(changes))}) against {counts[0]} sinks."
                    )
    norms = results.extra.get("weight_norms")
    if norms:
        ratio = np.asarray(norms["spectral_key"]) / np.maximum(np.asarray(norms["spectral_value"]), 1e-30)
        text = (
            f'Weight norms ("Quantize What Counts", Theorem 1): ‖W_K‖₂ exceeds ‖W_V‖₂ in {int((ratio > 1).sum())} of '
            f"{ratio.size} layers (ratio from {ratio.min():.2f} to {ratio.max():.2f})."
        )
        pairs = [
            (r, q)
            for r in results.recovered(None, "kl")
            if r["method"] == "norms"
            for q in results.recovered(None, "kl")
            if q["method"] == "ratequant"
            and (q["design"], q["budget"]) == (r["design"], r["budget"])
            and not r["no_choice"]
        ]
        if pairs:
            better = sum(q["value"] < r["value"] for r, q in pairs)
            worse = sum(q["value"] > r["value"] for r, q in pairs)
            text += (
                f" Allocating layer-wise K/V widths from them (a fixed 4^-b error, as spectral-kv / kvq do) has a "
                f"lower KL than RateQuant in {worse} of {len(pairs)} cells and the same in "
                f"{len(pairs) - better - worse}; RateQuant's fitted curves win in {better}."
            )
        out.append(text)
    for design, info in results.extra.get("headroom", {}).items():
        rows = {(r["budget"], r["method"]): r for r in results.recovered(None, "kl") if r["design"] == design}
        cells = []
        for budget in results.config.budgets:
            m, q = rows.get((budget, "measured")), rows.get((budget, "ratequant"))
            if m and q and not q["no_choice"] and m["share"] is not None and q["share"] is not None:
                cells.append(
                    f"{budget_text(budget)} bits: {fmt_share(m['share'])} against RateQuant's {fmt_share(q['share'])}"
                )
        if cells:
            out.append(
                f"Headroom ({design}): allocating on every component's measured damage (the optimum if damages "
                f"add up and the calibration window's damage is the evaluation's) recovers of the best fixed "
                f"scheme's KL damage: " + "; ".join(cells) + "."
            )
        damage, proxy = np.asarray(info["damage"]["values"]), np.asarray(info["proxy"])
        if damage.shape == proxy.shape and damage.shape[-1]:
            from ratequant.measure.distortion import spearman

            rho = [spearman(proxy[..., j].ravel(), damage[..., j].ravel()) for j in range(damage.shape[-1])]
            widths = info["damage"]["bitset"]
            out.append(
                "The Fisher proxy ranks components like their measured damage with Spearman "
                + ", ".join(f"{r:.2f} at {b} bits" for r, b in zip(rho, widths))
                + f" ({design}; measured in {info['damage']['seconds']:.0f} s)."
            )
    return out


def choice_findings(results: CompareResults, evaluation: str | None = None) -> list[str]:
    """The plans ``calibrate`` hands a user: each design's default plan against the best fixed scheme (chosen on
    the evaluation itself), and ``auto`` against the best method of any design at no more bytes, on KL."""
    out = []
    rows = [r for r in results.recovered(evaluation, "kl") if r["method"] == "default"]
    if rows:
        worse = []
        for r in rows:
            (fixed,) = [m for m in results.select(design=r["design"], budget=r["budget"]) if m.label == r["best_fixed"]]
            if r["value"] - r["best_fixed_value"] > fixed.score(evaluation).kl_se:
                worse.append(r)
        shares = [r["share"] for r in rows if r["share"] is not None and not r["no_choice"]]
        text = (
            f"The default plan (RateQuant's allocation or a fixed split of the budget, whichever has the least KL on "
            f"held-out calibration text) is worse than the best fixed scheme by more than one standard error in "
            f"{len(worse)} of {len(rows)} (design, budget) cells"
        )
        text += (
            ": "
            + "; ".join(
                f"{r['design']} at {budget_text(r['budget'])} bits ({r['label']}: "
                f"{fmt_kl(r['value'])} against {fmt_kl(r['best_fixed_value'])} for {r['best_fixed']})"
                for r in worse
            )
            + "."
            if worse
            else "."
        )
        if shares:
            text += (
                f" Share of the best fixed scheme's KL damage it recovers: median {fmt_share(float(np.median(shares)))}"
                f", from {fmt_share(min(shares))} to {fmt_share(max(shares))}; by cell: "
                + "; ".join(
                    f"{r['design']} {budget_text(r['budget'])} bits {fmt_share(r['share'])}"
                    for r in rows
                    if r["share"] is not None and not r["no_choice"]
                )
                + "."
            )
        out.append(text)
    for budget in results.config.budgets:
        check = results.auto_against_all(budget, evaluation)
        if check is None:
            continue
        verdict = "within one standard error of" if check["within_one_se"] else "**more than one standard error above**"
        out.append(
            f"auto at {budget_text(budget)} bits chose {check['auto'].removeprefix('auto (').removesuffix(')')}: KL "
            f"{fmt_kl(check['auto_kl'])} ± {fmt_kl(check['auto_kl_se'])}, {verdict} the best of the "
            f"{check['compared']} methods of every design at no more bytes ({check['best']}, "
            f"{fmt_kl(check['best_kl'])} ± {fmt_kl(check['best_kl_se'])})."
        )
    return out


def findings(results: CompareResults, evaluation: str | None = None) -> list[str]:
    """Plain-language bullets derived from the numbers of ``evaluation`` (default: the primary one)."""
    out = choice_findings(results, evaluation) + versus_best_fixed(results, "kl", evaluation)
    out += search_findings(results, evaluation)
    shares = [
        r["share"]
        for r in results.recovered(evaluation, "ppl")
        if r["method"] == "ratequant" and r["share"] is not None and not r["no_choice"]
    ]
    if shares:
        out.append(
            f"On perplexity RateQuant recovers a median {fmt_share(float(np.median(shares)))} of the best fixed "
            f"scheme's damage (from {fmt_share(min(shares))} to {fmt_share(max(shares))})."
        )
    cfg = results.config
    recovered = results.recovered(evaluation, "kl")
    by = {(r["design"], r["budget"], r["method"]): r for r in recovered}
    cells = sorted(
        {(r["design"], r["budget"]) for r in recovered if r["method"] == "ratequant" and not r["no_choice"]}, key=str
    )
    pairs = [(by[c + ("ratequant",)], by[c + ("layerwise",)]) for c in cells if c + ("layerwise",) in by]
    if pairs:
        beat = [p for p in pairs if p[0]["value"] < p[1]["value"]]
        text = (
            f"RateQuant (a width per head) has a lower KL than layer-wise allocation (a width per layer) in "
            f"{len(beat)} of {len(pairs)} cells."
        )
        lost = [p for p in pairs if p[0]["value"] >= p[1]["value"]]
        if lost:
            text += (
                " It does not in: "
                + "; ".join(
                    f"{a['design']} at {budget_text(a['budget'])} bits ({fmt_kl(a['value'])} vs {fmt_kl(b['value'])})"
                    for a, b in lost
                )
                + "."
            )
        out.append(text)
    mismatch = [(by[c + ("ratequant",)], by[c + ("mismatched",)]) for c in cells if c + ("mismatched",) in by]
    if mismatch:
        worse = [p for p in mismatch if p[1]["value"] > p[0]["value"]]
        below_fixed = [p for p in mismatch if p[1]["value"] > p[1]["best_fixed_value"]]
        worst = max(mismatch, key=lambda p: p[1]["value"] / max(p[0]["value"], 1e-12))
        out.append(
            f"Distortion-model mismatch (allocating with the curves of the design whose betas differ most): the KL is "
            f"higher than with the design's own curves in {len(worse)} of {len(mismatch)} cells and worse than the "
            f"best fixed scheme in {len(below_fixed)} of {len(mismatch)}; the largest effect is "
            f"{worst[0]['design']} at "
            f"{budget_text(worst[0]['budget'])} bits ({worst[1]['label']}: {fmt_kl(worst[1]['value'])} against "
            f"{fmt_kl(worst[0]['value'])} with its own curves)."
        )
    kv_cells = keys_win = 0
    for design in cfg.designs:
        for b in cfg.budgets:
            splits = results.select(method="kv-split", design=design, budget=b)
            kw = [m.score(evaluation).kl for m in splits if m.keys_wider]
            vw = [m.score(evaluation).kl for m in splits if m.keys_wider is False]
            if kw and vw:
                kv_cells += 1
                keys_win += min(kw) < min(vw)
    if kv_cells:
        gaps = [m.key_bits - m.value_bits for m in results.select(method="ratequant")]
        text = (
            f"Keys wider than values (e.g. K4V2) has a lower KL than the reverse split in {keys_win} of "
            f"{kv_cells} cells."
        )
        if gaps:
            text += (
                f" RateQuant, which is not told which components are keys, gives keys on average "
                f"{np.mean(gaps):+.2f} bits relative to values (mean key width minus mean value width; from "
                f"{min(gaps):+.2f} to {max(gaps):+.2f} across designs and budgets)."
            )
        out.append(text)
    rank_rows = []
    for b in cfg.budgets:
        quant = [m for m in results.select(budget=b) if m.design is not None]
        for method in RANK_METHODS:
            for m in results.select(method=method, design=None, budget=b):
                kl = m.score(evaluation).kl
                rank_rows.append((m, sum(q.score(evaluation).kl < kl for q in quant), len(quant)))
    if rank_rows:
        if all(w == t for _, w, t in rank_rows):
            out.append(
                "At matched storage, rank reduction (16-bit coefficients, and the rank-plus-quantization hybrid) "
                "is worse than every quantized method of every design at every budget."
            )
        else:
            out.append(
                "Rank reduction at matched storage against the quantized methods: "
                + "; ".join(
                    f"{m.label} at {budget_text(m.budget)} bits (KL {fmt_kl(m.score(evaluation).kl)}, PPL "
                    f"{fmt_ppl(m.score(evaluation).ppl)}) is worse than {w} of the {t} quantized methods"
                    for m, w, t in rank_rows
                )
                + "."
            )
    out += study_findings(results)
    betas = [x for d in results.designs.values() for x in (d.beta_key, d.beta_value)]
    if betas:
        r2 = [d.r2 for d in results.designs.values()]
        out.append(
            f"Fitted betas range from {min(betas):.2f} to {max(betas):.2f} (the RateQuant paper reports 3.6 to 5.3 "
            f"across designs); R^2 of the fits in log space from {min(r2):.3f} to {max(r2):.3f}."
        )
    return out


__all__ = ["choice_findings", "findings", "low_width_note", "search_findings", "versus_best_fixed"]
