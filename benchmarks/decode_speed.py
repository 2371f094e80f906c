"""Decode speed and memory of KV caches on the embedded default model, all in one process, same prompts.

For each context length (default 512, 1024, 2048, 4096 tokens of the evaluation corpus) and each cache:

* ``dynamic``: transformers' full-precision ``DynamicCache`` (the model's dtype);
* ``hqq-2``: transformers' ``QuantizedCache`` with the HQQ backend at 2 bits (group 64, residual 128);
* ``quanto-2``: the same with the quanto backend at 2 bits, where optimum-quanto is installed;
* ``rq-uniform-2``: ``RateQuantCache``, KIVI (groups of 32), every component at 2 bits (residual 128);
* ``rq-uniform-2-g64``: the same with KIVI groups of 64, the grouping of the HQQ and quanto runs (half the
  metadata of groups of 32);
* ``rq-mixed-2.5``: ``RateQuantCache`` with a RateQuant plan at 2.5 average code bits, calibrated on the
  default model before the run (KIVI, Fisher metric, 4 x 512 calibration tokens; ``--plan`` loads one
  instead; ``--design quarot`` calibrates it for that design, or applies a loaded plan's widths with it),
  decoded by the native kernel where it is built (``attention="decode"``: the history decoded on every step);
* ``rq-mixed-2.5-packed`` and ``rq-uniform-2-packed``: the same caches with decode steps attending straight
  from the packed codes inside the context manager :func:`ratequant.cache.packed_attention`, the history never
  decoded;
* ``rq-mixed-2.5-plain``: the same plan's cache made for the model (``RateQuantCache.from_plan(plan, model)``,
  which routes the model's attention to the packed path) and used with no context manager at all, as a user's
  own code would: the prompt by ``model.generate(ids, cache=cache, max_new_tokens=1)`` (with
  ``prefill_chunk_size`` when ``--prefill-chunk`` is given), the steps by plain forwards;
* ``rq-mixed-2.5-torch``: the same plan decoded by the PyTorch path (the kernel switched off), to show
  what the kernel buys;
* ``rq-mixed-2.5+buffer``: the same plan with a working buffer of dequantized chunks large enough for the
  whole history (``buffer_bytes``); the buffer is full-precision memory and is counted;
* ``no-history``: a ``DynamicCache`` given only the prompt's first ``NO_HISTORY_TOKENS`` tokens at every
  context: the cost of a step without attention over a long history. ``speed_vs_dynamic`` of this row is the
  most any cache could speed a step up at that context (its attention and cache reads free), the ceiling
  against which the cache's ratios are read.

Once ``rq-mixed-2.5-plain`` has made its cache, every forward of the model (all conditions) goes through
ratequant's attention dispatcher, which hands calls without packed handles to the model's own implementation
(the same result; a few microseconds per layer and step).

It measures time to first token (the prefill forward over the prompt), decode tokens per second (the
median step time of ``--new-tokens`` greedy single-token forwards, after ``--warmup`` untimed ones; with
``--batch N``, N distinct windows decoded together and tokens per second counting all of them), the
cache's real bytes after decoding (every tensor it holds: packed codes, metadata, residual windows, buffers)
against a float16 ``DynamicCache`` of the same length, and the process's peak resident memory during the
prefill and warm-up above its level before them (sampled from ``/proc/self/statm``; Linux only, else null).
Greedy tokens are compared with ``dynamic``'s (``tokens_match_dynamic``) and, for the mixed plan's other paths
(packed, plain, torch, buffer), with its decode path's (``tokens_match_decode_path``: every token equal is what
the fast path promises, for every design).

Fairness on a shared machine: every cache is prefilled first (in a rotating order per context); then the
timed decode steps are interleaved, one step of each cache in turn (the order rotating every step), so a
slow spell of the machine hits every cache alike. Ratios to ``dynamic`` and to ``hqq-2`` are reported beside
the absolute numbers.

    python benchmarks/decode_speed.py --output results/decode_speed.json --plot results/decode_speed.png

Use ``--threads 1`` (the default) on a small shared machine: with more threads than idle cores every
parallel kernel waits for a descheduled thread and timings measure the scheduler, not the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import (
    PeakRSS,
    args_dict,
    corpus_windows,
    float16_bytes_per_token,
    held_bytes,
    machine_info,
    trim,
    write_result,
)
from ratequant import prefill as chunked_prefill
from ratequant.compat import cache_argument

FORMAT_VERSION = 1
HQQ_GROUP = 64
NO_HISTORY_TOKENS = 16
PLAIN_CALLS = frozenset({"rq-mixed-2.5-plain"})
"""Conditions prefilled by a plain ``model.generate`` instead of :func:`ratequant.cache.prefill.prefill`."""


def cache_bytes(name: str, cache) -> dict:
    if name.startswith("rq-"):
        return cache.nbytes().to_dict()
    return {"total": held_bytes(cache.layers)}


# ---------------------------------------------------------------------------------------------------------
# conditions
# ---------------------------------------------------------------------------------------------------------


def calibrated_plan(loaded, avg_bits: float, path: Path | None, sequences: int, design: str | None = None):
    """The RateQuant plan of the mixed conditions: loaded from ``path``, or calibrated now (default settings,
    for ``design`` when given)."""
    from ratequant import Plan, load_corpus
    from ratequant.allocation import Budget
    from ratequant.calibration import CalibrationSettings, calibrate

    if path is not None:
        return Plan.load(path), 0.0
    start = time.perf_counter()
    extra = {} if design is None else {"quantizer": design}
    settings = CalibrationSettings(budget=Budget.avg_bits(avg_bits), sequences=sequences, **extra)
    run = calibrate(loaded, load_corpus(), settings)
    return run.plan, time.perf_counter() - start


def make_conditions(loaded, args) -> tuple[dict, dict, dict]:
    """``({name: (make_cache, around)}, skipped, plan_info)`` for the chosen conditions that pass a smoke run;
    ``around(cache)`` is the context manager each cache's forwards run in (the PyTorch-path condition's switch,
    the packed attention's interception)."""
    from contextlib import nullcontext

    from transformers import DynamicCache, QuantizedCache

    from ratequant import KVQuantSpec
    from ratequant.cache import DEFAULT_RESIDUAL_LENGTH as RESIDUAL
    from ratequant.cache import RateQuantCache, packed_attention
    from ratequant.kernels import native
    from ratequant.quantizers import get_quantizer

    model, cfg, g = loaded.model, loaded.model.config, loaded.geometry
    layers, heads, head_dim = g.num_layers, g.num_kv_heads, g.head_dim
    kivi, kivi64 = get_quantizer("kivi"), get_quantizer("kivi", group_size=HQQ_GROUP)
    uniform2 = np.full((2, layers, heads), 2)
    plan, plan_seconds = calibrated_plan(loaded, 2.5, args.plan, args.calib_sequences, args.design)
    design = None if args.design is None else get_quantizer(args.design)
    other = {}  # a loaded plan's widths with another design: a distortion-model mismatch, fine for speed
    if design is not None and design.name != plan.quantizer["name"]:
        other = {"quantizer": design, "allow_mismatch": True}

    def from_plan(**kw) -> RateQuantCache:
        return RateQuantCache.from_plan(plan, model, **other, **kw)

    elem = next(model.parameters()).element_size()
    full_history = 2 * layers * heads * head_dim * elem * (max(args.contexts) + args.new_tokens + args.warmup)
    conditions = {
        "dynamic": lambda: DynamicCache(config=cfg),
        "hqq-2": lambda: QuantizedCache(
            "hqq", cfg, nbits=2, axis_key=1, axis_value=1, q_group_size=HQQ_GROUP, residual_length=RESIDUAL
        ),
        "quanto-2": lambda: QuantizedCache("quanto", cfg, nbits=2, q_group_size=HQQ_GROUP, residual_length=RESIDUAL),
        "rq-uniform-2": lambda: RateQuantCache(KVQuantSpec(uniform2, kivi, RESIDUAL)),
        "rq-uniform-2-g64": lambda: RateQuantCache(KVQuantSpec(uniform2, kivi64, RESIDUAL)),
        "rq-mixed-2.5": lambda: from_plan(attention="decode"),
        "rq-mixed-2.5-packed": lambda: from_plan(attention="decode"),
        "rq-mixed-2.5-plain": lambda: from_plan(),
        "rq-uniform-2-packed": lambda: RateQuantCache(KVQuantSpec(uniform2, kivi, RESIDUAL)),
        "rq-mixed-2.5-torch": lambda: from_plan(attention="decode"),
        "rq-mixed-2.5+buffer": lambda: from_plan(buffer_bytes=full_history, attention="decode"),
        "no-history": lambda: DynamicCache(config=cfg),
    }
    contexts = {
        "rq-mixed-2.5-torch": lambda cache: native.disabled(),
        "rq-mixed-2.5-packed": lambda cache: packed_attention(model, cache),
        "rq-uniform-2-packed": lambda cache: packed_attention(model, cache),
    }
    chosen, skipped = {}, {}
    for name in args.conditions:
        around = contexts.get(name, lambda cache: nullcontext())
        try:
            cache = conditions[name]()
            with torch.inference_mode(), around(cache):  # a tiny smoke run: a backend that cannot run here is skipped
                ids = torch.arange(3, 3 + 140).unsqueeze(0)
                out = model(ids, **cache_argument(model, cache), use_cache=True)
                model(out.logits[:, -1:].argmax(-1), **cache_argument(model, cache), use_cache=True)
            chosen[name] = (conditions[name], around)
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"skipping {name}: {skipped[name]}", file=sys.stderr)
    bits = plan.bits_array()
    plan_info = {
        "rq-mixed-2.5": {
            "source": str(args.plan)
            if args.plan
            else f"calibrated in this run (default settings, 2.5 bits, {args.calib_sequences} x 512 tokens)",
            "calibration_seconds": plan_seconds,
            "design": plan.quantizer["name"] if design is None else design.name,
            "mean_bits": float(bits.mean()),
            "key_mean_bits": float(bits[0].mean()),
            "value_mean_bits": float(bits[1].mean()),
            "width_counts": {str(b): int((bits == b).sum()) for b in np.unique(bits)},
            "layers_with_mixed_heads": int(sum(len(set(bits[k, i])) > 1 for k in range(2) for i in range(layers))),
            "bit_groups_per_layer_kind": float(
                np.mean([len(set(bits[k, i])) for k in range(2) for i in range(layers)])
            ),
        },
        "rq-mixed-2.5+buffer": {"buffer_bytes_limit": int(full_history)},
        "decode_path": native.describe(),
    }
    return chosen, skipped, plan_info


# ---------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------


def generate_first(model, ids: torch.Tensor, cache, chunk: int | None) -> torch.Tensor:
    """The first new token ``[B, 1]`` of a plain ``model.generate`` over the prompt ``ids [B, T]`` (greedy,
    transformers' ``prefill_chunk_size=chunk`` when given), no context manager: the user's call path."""
    extra = {} if chunk is None else {"prefill_chunk_size": chunk}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **cache_argument(model, cache),
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=model.generation_config.eos_token_id,
        **extra,
    )
    return out[:, -1:]


@torch.inference_mode()
def prefill(model, make_cache, around, ids: torch.Tensor, warmup: int, chunk: int | None, plain: bool) -> dict:
    """A new cache, the prompt's forward (timed: time to first token; ``chunk`` tokens per pass, one pass when
    None; by :func:`generate_first` where ``plain``) and ``warmup`` untimed steps."""
    cache = make_cache()
    with PeakRSS() as mem, around(cache):
        start = time.perf_counter()
        if plain:
            token = generate_first(model, ids, cache, chunk)
        else:
            token = chunked_prefill(model, ids, cache, chunk).argmax(-1, keepdim=True)
        ttft = time.perf_counter() - start
        generated = []
        for _ in range(warmup):
            token = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
            generated.append(int(token[0]))
    return {
        "cache": cache,
        "token": token,
        "around": around,
        "ttft_s": ttft,
        "peak": mem.extra,
        "steps": [],
        "tokens": generated,
    }


@torch.inference_mode()
def decode_step(model, state: dict) -> None:
    """One timed greedy step of one cache."""
    with state["around"](state["cache"]):
        start = time.perf_counter()
        out = model(state["token"], **cache_argument(model, state["cache"]), use_cache=True)
        state["token"] = out.logits[:, -1:].argmax(-1)
        state["steps"].append(time.perf_counter() - start)
    state["tokens"].append(int(state["token"][0]))  # the first sequence's, for the agreement check


def run_context(model, conditions: dict, ids: torch.Tensor, args, rotation: int) -> list[dict]:
    """Every condition at one context: prefills in a rotating order, then interleaved timed steps."""
    names = list(conditions)
    states = {}
    for name in names[rotation % len(names) :] + names[: rotation % len(names)]:
        make_cache, around = conditions[name]
        prompt = ids[:, :NO_HISTORY_TOKENS] if name == "no-history" else ids
        chunk = args.prefill_chunk or None
        states[name] = prefill(model, make_cache, around, prompt, args.warmup, chunk, plain=name in PLAIN_CALLS)
    for step in range(args.new_tokens):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            decode_step(model, states[name])
    rows = []
    for name in names:
        st = states.pop(name)
        steps = np.asarray(st["steps"])
        rows.append(
            {
                "condition": name,
                "ttft_s": st["ttft_s"],
                "step_s_median": float(np.median(steps)),
                "step_s_q25": float(np.quantile(steps, 0.25)),
                "step_s_q75": float(np.quantile(steps, 0.75)),
                "tokens_per_s": float(ids.shape[0] / np.median(steps)),  # every sequence of the batch
                "seq_len": int(st["cache"].get_seq_length()),
                "cache_bytes": cache_bytes(name, st["cache"]),
                "peak_rss_extra_bytes": st["peak"],
                "tokens": st["tokens"],
            }
        )
        del st
        trim()
    return rows


def add_ratios(rows: list[dict], fp16_bytes_per_token: int) -> None:
    by = {(r["context"], r["condition"]): r for r in rows}
    for r in rows:
        r["fp16_dynamic_bytes"] = fp16_bytes_per_token * r["seq_len"]
        r["bytes_vs_fp16_dynamic"] = r["cache_bytes"]["total"] / r["fp16_dynamic_bytes"]
        for ref in ("dynamic", "hqq-2"):
            base = by.get((r["context"], ref))
            if base is None:
                continue
            r[f"speed_vs_{ref}"] = r["tokens_per_s"] / base["tokens_per_s"]
            r[f"ttft_vs_{ref}"] = r["ttft_s"] / base["ttft_s"]
            r[f"bytes_vs_{ref}"] = r["cache_bytes"]["total"] / base["cache_bytes"]["total"]


def plot(rows: list[dict], path: Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in names:
        sub = sorted((r for r in rows if r["condition"] == name), key=lambda r: r["context"])
        ctx = [r["context"] for r in sub]
        style = {"linestyle": "--"} if not name.startswith("rq-") else {"linewidth": 2.2}
        axes[0].plot(ctx, [r["tokens_per_s"] for r in sub], marker="o", label=name, **style)
        axes[1].plot(ctx, [r["cache_bytes"]["total"] / 2**20 for r in sub], marker="o", label=name, **style)
    sub = sorted((r for r in rows if r["condition"] == names[0]), key=lambda r: r["context"])
    axes[1].plot(
        [r["context"] for r in sub],
        [r["fp16_dynamic_bytes"] / 2**20 for r in sub],
        color="grey",
        linestyle=":",
        label="float16 DynamicCache (computed)",
    )
    axes[0].set(xlabel="context tokens", ylabel="decode tokens / s (median step)", title="Decode speed")
    axes[1].set(xlabel="context tokens", ylabel="KV cache MiB (all tensors held)", title="Cache memory")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")  # full-precision caches are 10x the quantized ones
    fig.suptitle(
        f"SmolLM2-135M, {info.get('cpu_model', info['processor'])}, {info['torch_threads']} thread(s), "
        f"torch {info['torch']}, transformers {info['transformers']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="sequences decoded together (distinct windows of the corpus; tokens per second count all of them)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps before the timed ones")
    parser.add_argument(
        "--prefill-chunk", type=int, default=0, help="prefill the prompt this many tokens at a time (0: one pass)"
    )
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=[
            "dynamic",
            "hqq-2",
            "quanto-2",
            "rq-uniform-2",
            "rq-uniform-2-g64",
            "rq-uniform-2-packed",
            "rq-mixed-2.5",
            "rq-mixed-2.5-packed",
            "rq-mixed-2.5-plain",
            "rq-mixed-2.5-torch",
            "rq-mixed-2.5+buffer",
            "no-history",
        ],
    )
    parser.add_argument("--plan", type=Path, help="plan JSON for the mixed conditions (default: calibrate one now)")
    parser.add_argument(
        "--design",
        help="quantizer design of the mixed conditions (e.g. quarot): calibrate the plan for it, or apply a "
        "--plan's widths with it (default: kivi, or the loaded plan's own)",
    )
    parser.add_argument("--calib-sequences", type=int, default=4, help="512-token calibration windows (default 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("results/decode_speed.json"))
    parser.add_argument(
        "--plot",
        type=lambda s: Path(s) if s else None,
        default=Path("results/decode_speed.png"),
        help="PNG to write ('' for none)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ratequant import load_corpus, load_model

    loaded = load_model()
    model = loaded.model.eval()
    info = machine_info(args.threads)
    info["model"] = loaded.describe()
    conditions, skipped, plan_info = make_conditions(loaded, args)
    text = load_corpus().evaluation
    fp16_per_token = float16_bytes_per_token(loaded.geometry)

    rows = []
    names = list(conditions)
    started = time.perf_counter()
    for ci, context in enumerate(sorted(args.contexts)):
        ids = corpus_windows(loaded.tokenizer, text, context, args.batch)
        for result in run_context(model, conditions, ids, args, rotation=ci):
            rows.append({"context": context, **result})
            print(
                f"ctx {context:5d} x{args.batch} {result['condition']:22s} ttft {result['ttft_s']:7.2f} s  decode "
                f"{result['tokens_per_s']:6.2f} tok/s  cache {result['cache_bytes']['total'] / 2**20:8.2f} MiB  "
                f"peak+ {(result['peak_rss_extra_bytes'] or 0) / 2**20:8.1f} MiB",
                flush=True,
            )
    add_ratios(rows, fp16_per_token)
    for r in rows:  # greedy decoding: how many generated tokens equal full precision's (a sanity check)
        base = next((b for b in rows if b["context"] == r["context"] and b["condition"] == "dynamic"), None)
        if r["condition"] == "no-history":
            base = None  # another prompt: its tokens are not comparable
        r["tokens_match_dynamic"] = None if base is None else sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
        # the same plan's other paths against its decode path (the history decoded every step): the greedy tokens
        # must be identical, whatever the design
        decode = next((b for b in rows if b["context"] == r["context"] and b["condition"] == "rq-mixed-2.5"), None)
        same_plan = r["condition"].startswith("rq-mixed-2.5") and r["condition"] != "rq-mixed-2.5"
        r["tokens_match_decode_path"] = (
            sum(a == b for a, b in zip(r["tokens"], decode["tokens"])) if decode and same_plan else None
        )
    for r in rows:
        if r["tokens_match_decode_path"] is not None:
            print(
                f"ctx {r['context']:5d} {r['condition']:22s} greedy tokens equal to the decode path's: "
                f"{r['tokens_match_decode_path']}/{len(r['tokens'])}"
            )
        r["tokens_compared"] = len(r.pop("tokens"))
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "decode_speed",
        "machine": info,
        "settings": args_dict(args),
        "conditions": names,
        "skipped": skipped,
        "plans": plan_info,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    write_result(args.output, result)
    if args.plot:
        plot(rows, args.plot, info)
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
