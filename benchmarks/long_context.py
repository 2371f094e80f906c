"""The memory a user feels at long context: process peak while prefilling and decoding, per cache and prefill.

For a prompt of ``--tokens`` tokens of the evaluation corpus (default 16,384; the embedded default model was
trained with 8,192 positions, so beyond them its ``max_position_embeddings`` is raised: its rotary embedding is
computed for any position, which changes what it predicts but not what it stores; this measures memory) and
each condition,
a fresh child process loads the default model (float32, ``--threads`` threads), records its resident memory
after loading (the weights), prefills the prompt and greedily decodes ``--new-tokens`` tokens, and reports
the peak resident memory above that level, the cache's real bytes at the end and the time taken:

* ``dynamic``: transformers' ``DynamicCache``, the prompt in one forward pass;
* ``dynamic-chunked``: the same cache, prefilled ``--chunk`` tokens at a time (:mod:`ratequant.cache.prefill`);
* ``rq-2.5``: ``RateQuantCache`` with a 2.5-bit RateQuant plan (calibrated once before the children start,
  or ``--plan``), one forward pass;
* ``rq-2.5-chunked``: the same plan prefilled ``--chunk`` tokens at a time (each piece attending to the
  history one block at a time), decode steps attending straight from the packed codes
  (:func:`ratequant.cache.packed_attention`);
* ``activations``: one ``--chunk``-token forward pass without a cache: what one chunk's activations cost;
* ``late-chunk``: the 2.5-bit cache filled (untimed, outside the measurement) with ``--tokens - --chunk``
  positions of random keys and values, then one ``--chunk``-token forward pass over it, as prefill's pieces
  run: what the last chunk of a long prefill costs beyond its own activations (its attention over the whole
  packed history).

Criterion (issue target): the chunked 2.5-bit run's peak is at most 1.5x its packed cache plus one chunk's
activations, above the weights. Each condition runs in its own process, so no allocator state carries over.

    python benchmarks/long_context.py --output results/long_context.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PeakRSS, args_dict, corpus_windows, held_bytes, machine_info, subprocess_env, write_result

FORMAT_VERSION = 1
CONDITIONS = ("activations", "late-chunk", "dynamic", "dynamic-chunked", "rq-2.5", "rq-2.5-chunked")
HERE = Path(__file__).resolve().parent


def child(args) -> dict:
    """One condition in this process: load, prefill, decode; the measurements as a dict."""
    from contextlib import nullcontext

    import torch
    from transformers import DynamicCache

    from ratequant import Plan, load_corpus, load_model, prefill
    from ratequant.cache import RateQuantCache, packed_attention, piece_attention
    from ratequant.compat import cache_argument

    torch.set_num_threads(args.threads)
    loaded = load_model(dtype="float32")
    model = loaded.model
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.tokens + args.new_tokens)
    one_chunk = args.condition in ("activations", "late-chunk")
    ids = corpus_windows(loaded.tokenizer, load_corpus().evaluation, args.chunk if one_chunk else args.tokens, 1)[:1]
    quantized = args.condition.startswith("rq-") or args.condition == "late-chunk"
    chunk = args.chunk if args.condition.endswith("-chunked") else None
    if args.condition == "late-chunk":
        cache = RateQuantCache(Plan.load(args.plan).resolve(model), model=model)
        history, g = args.tokens - args.chunk, torch.Generator().manual_seed(0)
        shape = (1, loaded.geometry.num_kv_heads, history, loaded.geometry.head_dim)
        with torch.inference_mode():
            for layer in range(loaded.geometry.num_layers):
                cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), layer)
        positions = torch.arange(history, args.tokens).unsqueeze(0)
    with torch.inference_mode(), PeakRSS() as mem:
        start = time.perf_counter()
        if args.condition == "activations":
            model(ids, use_cache=False, logits_to_keep=1)
            cache = None
        elif args.condition == "late-chunk":
            with piece_attention(model, cache):  # as prefill's pieces run
                model(ids, position_ids=positions, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - start
        else:
            spec = Plan.load(args.plan).resolve(model) if quantized else None
            cache = RateQuantCache(spec, model=model) if quantized else DynamicCache(config=model.config)
            token = prefill(model, ids, cache, chunk).argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - start
            with packed_attention(model, cache) if quantized and chunk else nullcontext():
                for _ in range(args.new_tokens):
                    token = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
    if cache is None:
        cache_total = 0
    else:
        cache_total = cache.nbytes().total if quantized else held_bytes(cache.layers)
    return {
        "condition": args.condition,
        "tokens": int(ids.shape[1]),
        "chunk": chunk,
        "weights_rss_bytes": mem.start,
        "peak_extra_bytes": mem.extra,
        "cache_bytes": cache_total,
        "prefill_seconds": None if cache is None else prefill_s,
        "seconds": seconds,
    }


def calibrated_plan_file(folder: Path) -> Path:
    """A 2.5-bit RateQuant plan of the default model with the default calibration settings, written to ``folder``."""
    from ratequant import load_corpus, load_model
    from ratequant.allocation import Budget
    from ratequant.calibration import CalibrationSettings, calibrate

    run = calibrate(load_model(), load_corpus(), CalibrationSettings(budget=Budget.avg_bits(2.5)))
    return run.plan.to_json(folder / "plan-2.5.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="prompt tokens (default 16384)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens (default 512)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens decoded after the prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    parser.add_argument("--plan", type=Path, help="the 2.5-bit plan (default: calibrated before the run)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset")
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "long_context.json")
    parser.add_argument("--condition", help=argparse.SUPPRESS)  # internal: run one condition and print JSON
    args = parser.parse_args(argv)
    if args.condition:
        print(json.dumps(child(args)))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plan = args.plan or calibrated_plan_file(Path(tmp))
        rows = []
        for name in args.conditions.split(","):
            command = [sys.executable, __file__, "--condition", name, "--plan", str(plan)]
            command += ["--tokens", str(args.tokens), "--chunk", str(args.chunk)]
            command += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
            done = subprocess.run(command, env=subprocess_env(args.threads), capture_output=True, text=True)
            if done.returncode:
                rows.append({"condition": name, "error": done.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    by = {row["condition"]: row for row in rows if "error" not in row}
    verdict = None
    if {"activations", "rq-2.5-chunked"} <= set(by):
        rq, act = by["rq-2.5-chunked"], by["activations"]
        allowed = 1.5 * rq["cache_bytes"] + act["peak_extra_bytes"]
        verdict = {"allowed_bytes": allowed, "peak_extra_bytes": rq["peak_extra_bytes"]}
        verdict["met"] = rq["peak_extra_bytes"] <= allowed
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "long_context",
        "args": args_dict(args),
        "machine": machine_info(args.threads),
        "rows": rows,
        "criterion": verdict,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.output, result)
    mib = 1 << 20
    for row in rows:
        if "error" in row:
            print(f"{row['condition']:>16}: failed: {row['error']}")
            continue
        print(
            f"{row['condition']:>16}: peak +{row['peak_extra_bytes'] / mib:8.1f} MiB above the weights, "
            f"cache {row['cache_bytes'] / mib:7.1f} MiB, {row['seconds']:.1f} s"
        )
    if verdict:
        print(
            f"criterion (peak <= 1.5 x packed cache + one chunk's activations = {verdict['allowed_bytes'] / mib:.1f} "
            f"MiB): {'met' if verdict['met'] else 'missed'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
