"""The markdown of a comparison report: ``report.md`` (everything) and ``summary.md`` (a README section)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ratequant.lab.config import budget_text
from ratequant.lab.report.findings import findings
from ratequant.lab.report.tables import (
    evaluations_table,
    fit_ratio_table,
    fit_table,
    fmt_kl,
    fmt_ppl,
    headroom_table,
    long_context_of,
    long_context_table,
    md_code,
    md_fenced,
    md_text,
    metric_table,
    norms_table,
    rank_table,
    recovered_table,
    sink_study_table,
    storage_table,
)
from ratequant.lab.results import CompareResults

SHARE_TEXT = (
    "share = (D_best_fixed - D_method) / D_best_fixed, with the damage D = KL for the KL table and D = PPL - "
    "PPL_full_precision for the perplexity table: 100% removes all of the best fixed scheme's damage, negative is "
    "worse than it. The last column is the paired per-window difference (best fixed minus RateQuant: KL, or log PPL) "
    "with its standard error over the evaluation windows."
)


def _sinks(results) -> str:
    """``"2 sink tokens"``, or per design when they differ (chosen from the calibration data with ``auto``)."""
    sinks = results.extra.get("sink_tokens") or {}
    chosen = sorted(set(sinks.values()))
    how = " (chosen from the calibration data)" if results.config.calibration.sink_tokens == "auto" else ""
    if len(chosen) <= 1:
        n = chosen[0] if chosen else results.config.calibration.sink_tokens
        return f"{n} sink token{'s' if n != 1 else ''}{how}"
    return "sink tokens " + ", ".join(f"{d} {n}" for d, n in sinks.items()) + how


def _informative(results: CompareResults, shown: int = 4) -> str:
    """Each design's lowest informative widths, with the components whose own floor lies above their kind's."""
    parts = []
    for name, d in results.designs.items():
        floors = d.component_floors()
        low = [int(floors[k].min()) for k in range(2)]
        text = f"{name} {low[0]}..8" if low[0] == low[1] else f"{name} keys {low[0]}..8, values {low[1]}..8"
        higher = [
            f"layer {layer} kv-head {head} {('keys', 'values')[k]} from {int(floors[k, layer, head])}"
            for k in range(2)
            for layer, head in np.argwhere(floors[k] > low[k])
        ]
        if higher:
            more = f" and {len(higher) - shown} more" if len(higher) > shown else ""
            text += f" ({', '.join(higher[:shown])}{more})"
        parts.append(text)
    return "; ".join(parts)


def _evaluation_line(results: CompareResults) -> str:
    ev = results.evaluation
    bos = (
        f"each starting with the BOS token (id {ev['bos_token_id']})"
        if ev.get("bos")
        else "without a BOS token (the tokenizer adds none)"
    )
    others = sorted({e["corpus"] for e in results.evaluations.values()} - {ev["corpus"]})
    also = (
        f"; every method is also scored on the evaluation split of {', '.join(md_code(c) for c in others)}"
        if others
        else ""
    )
    mode = (
        "through the real cache (streaming, chunked prefill)"
        if ev.get("mode") == "streaming"
        else "with simulated quantization (what the cache gives token by token)"
    )
    head = (
        f"- Evaluation: {ev['windows']} non-overlapping window{'s' if ev['windows'] != 1 else ''} of {ev['seq_len']} "
        "tokens of the evaluation split "
        f"of {md_code(ev['corpus'])}, {bos}, {mode}"
    )
    if ev["scoring"] == "second-half":
        scored = (
            f". Headline scores: the second half of each window (tokens {ev['first_scored_token']}.."
            f"{ev['seq_len'] - 1}, as llama.cpp's perplexity tool scores them: {ev['scored_tokens']:,} tokens)"
        )
    else:
        scored = f"; every prediction scored ({ev['scored_tokens']:,} tokens)"
    return f"{head}{scored}; the scores of every evaluation are in the evaluations table{also}."


def setup_lines(results: CompareResults) -> list[str]:
    cfg, m = results.config, results.model
    cal, fp = cfg.calibration, results.full_precision
    return [
        f"- Model: {md_code(m['name'])} ({m['num_layers']} layers, {m['num_kv_heads']} KV heads, head dim "
        f"{m['head_dim']}, {md_text(m['dtype'])}); corpus {md_code(results.corpus['name'])} (sha256 "
        f"{md_code(str(results.corpus['sha256'])[:12] + '…')}).",
        f"- Calibration: {cal.sequences} sequence(s) of {cal.seq_len} tokens of the calibration "
        f"split, metric `{cal.metric}`, widths {cal.bitset[0]}..{cal.bitset[-1]}; the allocators use each design's "
        f"informative widths ({_informative(results)}: a width whose reconstruction of the calibration keys or values "
        f"is worse than their mean is left out).",
        _evaluation_line(results),
        f"- Full precision: PPL {fmt_ppl(fp.ppl)} ± {fmt_ppl(fp.score().ppl_se)}. KL is the mean per-token "
        "KL(full || method) in nats on the same tokens, ± its standard error over tokens; it is the headline "
        "measure of damage (less noisy than perplexity), PPL is beside it.",
        f"- {'Simulated quantization' if cfg.mode == 'simulated' else 'The real cache (streaming)'} with a "
        f"full-precision residual window of {cal.residual_length} tokens"
        + (
            " (every whole quantization chunk is quantized, as in the papers' figures; with short evaluation windows a "
            "128-token window would keep a large share of the context at full precision and hide the differences)"
            if cal.residual_length == 0
            else ""
        )
        + f" and {_sinks(results)} kept at full precision"
        + f". True bytes count codes, scales/zeros and the tokens kept at full precision at {cfg.context_tokens} "
        f"tokens of context; the model's own dtype ({md_text(m['dtype'])}) is {fp.kv_bytes_per_token:,.0f} bytes per "
        "token, "
        f"float16 would be {fp.details['fp16_kv_bytes_per_token']:,} bytes.",
        f"- Rank reduction: per-component PCA of the calibration keys and values; `rank` keeps r = floor(bits x "
        f"head_dim / 16) coefficients at 16 bits, `rank + quant` the largest r whose {cfg.hybrid_design} "
        f"{cfg.hybrid_bits}-bit coefficients plus per-token metadata fit the same bits; the bases are a per-model "
        f"constant, not counted per token. No residual window.",
        *(
            [
                f"- RateQuant + KL search: RateQuant's widths, or the fixed key/value split of the same size if it "
                f"causes less KL, refined by {cal.search_proposals} one-bit moves on the KL they cause on a "
                f"{cal.search_tokens}-token window of the calibration split, all kept only if they also lower the KL "
                f"on a second, held-out window of it (else the start is kept); the evaluation text is never seen."
            ]
            if cal.search_proposals
            else []
        ),
    ]


def _search_seconds(results: CompareResults) -> float:
    """Seconds the ``ratequant-search`` methods spent on their searches (their allocation time)."""
    return sum(m.details["allocation_seconds"] for m in results.select(method="ratequant-search"))


def _noise_line(results: CompareResults) -> str:
    fp = results.full_precision.score()
    return (
        f"- Noise: {len(fp.window_nll)} window(s); a KL difference is clear when the paired per-window standard "
        f"error is well below it (the tables give it); PPL ± {fmt_ppl(fp.ppl_se)} at full precision, and KL "
        f"standard errors around {fmt_kl(_typical_kl_se(results))}."
    )


def _long_context_lines(results: CompareResults, heading: str) -> list[str]:
    """The long-context section (``heading`` "## " makes it a section with a subsection per task), or nothing
    when it was not run."""
    study = long_context_of(results)
    if study is None:
        return []
    settings = study["settings"]
    depths = ", ".join(f"{d:g}" for d in settings["depths"])
    text = (
        f"Retrieval at {settings['context']} tokens through the real cache: the same prompts under every condition, "
        f"needles at depths {depths}, {settings['trials_per_depth']} prompt(s) per depth. Accuracy is greedy exact "
        "match with its 95% Wilson interval; the answer's log-probability is teacher-forced, and its change from "
        "full precision is the mean over the same prompts with its standard error (it moves before accuracy does)."
    )
    sections = heading == "## "
    lines = ["## Long-context retrieval through the real cache" if sections else heading, "", text, ""]
    for task in study["tasks"]:
        lines += [f"### {md_text(task)}" if sections else f"{md_text(task)}:", "", long_context_table(study, task), ""]
    return lines


def _typical_kl_se(results: CompareResults) -> float:
    values = sorted(m.score().kl_se for m in results.methods if m.score().kl > 0)
    return values[len(values) // 2] if values else 0.0


def _study_sections(results: CompareResults, *, sections: bool, norms: bool = True) -> list[str]:
    """The sink-token study, the headroom and (``norms``) the weight norms, each where it was run: as ``##``
    sections of the report (``sections``) or under bold run-in titles (the README summary)."""
    lines: list[str] = []
    for title, table, text in (
        (
            "Sink tokens",
            sink_study_table(results),
            "The same widths, with the first tokens of every window kept at full precision in the cache (KL, headline "
            "scoring); in parentheses the change against the first column.",
        ),
        (
            "Headroom: allocation on measured damage",
            headroom_table(results),
            "Each component quantized alone at each width, its KL from full precision measured on a calibration "
            "window; allocating on these measured curves is the optimum of a per-head allocation if the damages "
            "of components add up and the calibration window's damage is the evaluation's.",
        ),
        (
            "Weight norms of W_K and W_V",
            norms_table(results) if norms else "",
            'Per layer ("Quantize What Counts", Theorem 1), beside the key and value widths RateQuant gives the layer.',
        ),
    ):
        if table:
            lines += [f"## {title}" if sections else f"**{title}.**", "", text, "", table, ""]
    return lines


def report_markdown(
    results: CompareResults,
    *,
    image_prefix: str = "",
    command: str | None = None,
    repeat: str | None = None,
    files: Sequence[str] = (),
) -> str:
    """The full report (``report.md``)."""
    cfg = results.config
    lines = [f"# ratequant compare: {md_text(results.model['name'])}", ""]
    if command:
        lines += ["Made by:", "", *md_fenced(command), ""]
    if repeat:
        lines += ["Repeat exactly (the configuration is saved beside the results):", "", *md_fenced(repeat), ""]
    lines += ["## Setup", "", *setup_lines(results), _noise_line(results), "", "## Findings", ""]
    lines += [f"- {f}" for f in findings(results)]
    lines += [
        "- The best fixed scheme is chosen on the evaluation windows themselves (an oracle choice that favours "
        "the baseline); RateQuant and layerwise are chosen from the calibration split only.",
        "",
    ]
    lines += ["## Every evaluation", "", evaluations_table(results), "", *_long_context_lines(results, "## ")]
    lines += _study_sections(results, sections=True)
    lines += [
        "## KL divergence from full precision (nats per token)",
        "",
        "Lower is better; bold: the best of the design at that budget. Splits show which one.",
        "",
        metric_table(results, "kl"),
        "",
        f"![KL against bits]({image_prefix}kl_vs_bits.png)",
        "",
        "## Perplexity by method and budget",
        "",
        metric_table(results, "ppl"),
        "",
        f"![perplexity against bits]({image_prefix}ppl_vs_bits.png)",
        "",
        "## Damage recovered relative to the best fixed scheme",
        "",
        SHARE_TEXT,
        "",
        "On KL:",
        "",
        recovered_table(results, "kl"),
        "",
        "On perplexity:",
        "",
        recovered_table(results, "ppl"),
        "",
        "## Fitted distortion curves",
        "",
        "D(b) = alpha * beta^-b, one beta per design and kind; R^2 in log space (pooled within components).",
        "",
        fit_table(results),
        "",
        "Measured over fitted distortion on the calibration data, by width (geometric mean over components; "
        "1.00 is a perfect fit, above 1 the curve under-predicts the damage an allocator is trading):",
        "",
        fit_ratio_table(results),
        "",
    ]
    lines += [f"![{name} curves]({image_prefix}curves_{name}.png)" for name in results.designs] + [""]
    lines += [
        "## Bits chosen per layer and head",
        "",
        "RateQuant's widths with each design's own curves, and with the mismatched curves.",
        "",
    ]
    lines += [
        f"![bits at {budget_text(b)}]({image_prefix}bits_{budget_text(b)}.png)"
        for b in cfg.budgets
        if f"bits_{budget_text(b)}.png" in files or not files
    ] + [""]
    lines += [
        "## Quantization against rank reduction at matched storage",
        "",
        rank_table(results),
        "",
        f"![quantization against rank reduction]({image_prefix}quant_vs_rank.png)",
        "",
        "## Storage",
        "",
        storage_table(results),
        "",
    ]
    if results.skipped:
        lines += ["## Methods not run", ""]
        grouped: dict[tuple, list[str]] = {}
        for s in results.skipped:
            grouped.setdefault((s["label"], s["budget"], s["reason"]), []).append(s["design"] or "-")
        lines += [
            f"- {md_text(label)} at {budget_text(b)} bits ({md_text(', '.join(map(str, designs)))}): {md_text(reason)}"
            for (label, b, reason), designs in grouped.items()
        ]
        lines += [""]
    t, searched = results.timings, results.config.calibration.search_proposals
    per_design = ", ".join(f"{md_text(d)} {s:.1f} s" for d, s in t["calibration"]["per_design"].items())
    env = results.environment
    evaluation = ", ".join(f"{md_text(name)} {sec:.1f} s" for name, sec in t["evaluation"].items())
    for study in ("long_context", "passkey"):  # results saved before the long-context study timed "passkey"
        if study in t:
            evaluation += f"; long-context retrieval {t[study]:.1f} s"
    lines += [
        "## Time",
        "",
        f"- Calibration capture (shared by all designs): {t['capture']:.1f} s; distortion measurement and fit: "
        f"{per_design}; rank bases: {t['rank_bases']:.1f} s; allocations: {t['allocation']:.1f} s"
        + (f" (the KL searches' {_search_seconds(results):.0f} s included)." if searched else "."),
        f"- Evaluation: {evaluation}; total {t['total']:.1f} s (ratequant {md_text(env['ratequant_version'])}, "
        f"torch {md_text(env['torch_version'])}, {env['threads']} threads, {md_text(env['device'])}).",
        "",
    ]
    return "\n".join(lines)


def summary_markdown(
    results: CompareResults, *, image_prefix: str = "", command: str | None = None, heading: str = "## Results"
) -> str:
    """A README "Results" section: the command, the setup, the main tables, the findings and the main plots."""
    cfg = results.config
    lines = [heading, ""]
    if command:
        lines += ["Generated by `ratequant compare` with:", "", *md_fenced(command), ""]
    lines += [
        *setup_lines(results),
        _noise_line(results),
        "",
        "KL divergence from full precision (lower is better; bold: best of the design at that budget):",
        "",
        metric_table(results, "kl"),
        "",
        "Perplexity:",
        "",
        metric_table(results, "ppl"),
        "",
        "What the numbers say:",
        "",
    ]
    lines += [f"- {f}" for f in findings(results)]
    lines += [
        "- The best fixed scheme is picked on the evaluation windows themselves, which favours it.",
        "",
        "Every evaluation:",
        "",
        evaluations_table(results),
        "",
        *_long_context_lines(results, "Long-context retrieval through the real cache:"),
        "",
        "Share of the best fixed scheme's KL damage recovered (see the report for the definition):",
        "",
        recovered_table(results, "kl"),
        "",
        *_study_sections(results, sections=False, norms=False),
        "Fitted curves:",
        "",
        fit_table(results),
        "",
        f"![KL against bits]({image_prefix}kl_vs_bits.png)",
        "",
        f"![quantization against rank reduction]({image_prefix}quant_vs_rank.png)",
        "",
    ]
    lowest = budget_text(cfg.budgets[0])
    lines += [f"![bits at {lowest}]({image_prefix}bits_{lowest}.png)", ""]
    return "\n".join(lines)


__all__ = ["report_markdown", "setup_lines", "summary_markdown"]
