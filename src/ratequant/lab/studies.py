"""The side studies of a comparison: peers and diagnostics per design, and sink tokens (long context has its
own module, :mod:`ratequant.lab.long_context`).

* :func:`extra_methods` -- per design, the peer baseline ``norms`` (layer-wise K/V widths from the weight norms,
  as spectral-kv / ``kvq``) and, for the headroom designs, the diagnostics ``ratequant-component`` (RateQuant
  with a beta per component) and ``measured`` (allocation on every component's measured damage).
* :func:`sink_study` -- the fixed schemes and RateQuant of the focus design re-scored with several sink-token
  counts, on windows with and without BOS (the same widths; only the storage of the first tokens changes).
"""

from __future__ import annotations

from ratequant.allocation import Curves
from ratequant.allocation.fitting import fit_distortion
from ratequant.calibration import DesignFit
from ratequant.evaluation.perplexity import score_conditions
from ratequant.evaluation.protocol import WindowProtocol, make_windows
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.lab.config import FULL_PRECISION, CompareConfig
from ratequant.lab.methods import Allocated, Method, condition_for
from ratequant.measure.capture import CalibrationStats
from ratequant.measure.headroom import measure_component_damage, measured_curves
from ratequant.measure.weight_norms import norm_curves, weight_norms
from ratequant.progress import Stages
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec


def extra_methods(
    config: CompareConfig,
    loaded: LoadedModel,
    corpus: Corpus,
    stats: CalibrationStats,
    fitted: DesignFit,
    sink_tokens: int,
    say: Stages,
) -> tuple[tuple[Allocated, ...], dict]:
    """The peers and diagnostics of one design, and what they measured (for the report)."""
    extra, info = [], {}
    curves = fitted.curves
    if "norms" in config.peers:
        norms = norm_curves(weight_norms(loaded.model), curves.bitset)
        model = Curves(norms.values, norms.bitset, "model", label=norms.label, min_bits=curves.min_bits)
        extra.append(Allocated("norms", "weight norms (layer-wise K/V)", model, "layer-kind"))
    if fitted.design in config.headroom_designs:
        table = fitted.table
        widths = curves.bitset
        per_component = fit_distortion(
            table.values[..., [table.bitset.index(b) for b in widths]],
            widths,
            shared_beta="component",
            min_bits=curves.min_bits,
        )
        extra.append(
            Allocated(
                "ratequant-component",
                "RateQuant, beta per component",
                Curves.from_fit(
                    per_component,
                    widths,
                    design=fitted.design,
                    label="fisher, beta per component",
                    min_bits=curves.min_bits,
                ),
                "ratequant",
            )
        )
        window = make_windows(loaded.tokenizer, corpus.calibration, WindowProtocol(config.headroom_tokens, 1))
        measured_widths = tuple(b for b in widths if b <= config.headroom_max_bits) or widths[:1]
        say(
            f"{fitted.design}: measuring each component's damage alone at widths {list(measured_widths)} "
            f"({len(measured_widths) * loaded.geometry.num_components} perturbations)"
        )
        damage = measure_component_damage(
            loaded.model,
            window.ids,
            get_quantizer(fitted.design),
            measured_widths,
            sink_tokens=sink_tokens,
            progress=say.enabled,
        )
        extra.append(
            Allocated("measured", "measured damage (diagnostic)", measured_curves(damage, curves), "ratequant")
        )
        info = {
            "damage": damage.to_dict(),
            "proxy": table.values[..., [table.bitset.index(b) for b in measured_widths]].tolist(),
        }
    return tuple(extra), info


def sink_study(config: CompareConfig, loaded: LoadedModel, corpus: Corpus, methods: list[Method], say: Stages) -> dict:
    """KL and PPL of the focus design's fixed schemes and RateQuant with each sink count of ``config.sink_study``,
    on windows of the evaluation split with and without BOS."""
    chosen = [
        m
        for m in methods
        if m.design == config.focus_design
        and m.method in ("uniform", "kv-split", "ratequant")
        and (m.method != "kv-split" or m.key_bits > m.value_bits)
    ]
    rows = []
    for bos in ("no", "yes"):
        windows = make_windows(
            loaded.tokenizer,
            corpus.evaluation,
            WindowProtocol(config.seq_len, config.side_windows or config.windows, bos, config.scoring),
        )
        conditions = {}
        for i, m in enumerate(chosen):
            spec = m.condition.spec
            for s in config.sink_study:
                conditions[f"{i}/{s}"] = condition_for(
                    KVQuantSpec(spec.bits, spec.quantizer, spec.residual_length, s), config, m.label
                )
        say(f"sink study (BOS {bos}): {len(conditions)} conditions over {windows.count} windows")
        scores = score_conditions(loaded.model, windows, conditions, progress=say.enabled)[config.scoring]
        for i, m in enumerate(chosen):
            for s in config.sink_study:
                score = scores[f"{i}/{s}"]
                rows.append(
                    {
                        "bos": bos,
                        "budget": m.budget,
                        "method": m.method,
                        "label": m.label,
                        "sink_tokens": s,
                        "kl": score.kl,
                        "kl_se": score.kl_se,
                        "ppl": score.ppl,
                    }
                )
        fp = scores["full-precision"]
        rows.append(
            {
                "bos": bos,
                "budget": None,
                "method": FULL_PRECISION,
                "label": "full precision",
                "sink_tokens": None,
                "kl": 0.0,
                "kl_se": 0.0,
                "ppl": fp.ppl,
            }
        )
    return {
        "design": config.focus_design,
        "sink_tokens": list(config.sink_study),
        "scoring": config.scoring,
        "rows": rows,
    }


__all__ = ["extra_methods", "sink_study"]
