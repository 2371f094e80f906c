"""Long runs: process memory over many generations, and a 16k-token context through the packed cache.

Two measurements, one JSON file (``--output``, default ``results/long_runs.json``):

1. **Repeated generations.** ``--generations`` (default 200) consecutive greedy generations with
   :func:`ratequant.cache.generation.generate` on the embedded default model (SmolLM2-135M), each with a fresh
   :class:`~ratequant.cache.RateQuantCache` built from the same plan (``plan.resolve(model)``, a
   :class:`~ratequant.spec.KVQuantSpec`) (KIVI, widths alternating 2 and 3 bits,
   2.5 on average, ``--residual`` 32 so that chunks are quantized during prefill *and* decoding). Prompts
   are different slices of the evaluation corpus. After every generation the resident set size (RSS,
   ``/proc/self/statm``) is sampled after ``gc.collect()``. Reported: RSS after the warm-up
   (``--warmup`` generations), at the end, the growth between them, the least-squares slope in bytes per
   generation after the warm-up, and the number of live tensors (which must not grow). Criterion: growth
   after warm-up below ``--max-growth-mib`` (default 16 MiB: allocator noise, not a per-generation leak).

2. **A 16k-token context.** ``--context`` tokens (default 16384) of the evaluation corpus go through the
   *real default model* and the cache in aligned prefill chunks of ``--chunk`` tokens (512), then
   ``--decode`` single-token steps. The default model was trained with 8192 positions; its rotary
   embedding is computed for any position, so ``max_position_embeddings`` is raised to the context
   length: positions beyond 8192 are outside its trained range, which changes what it predicts but not
   what the cache stores (this measures memory, not quality). The cache's real bytes (``nbytes()``) are
   compared with the plan's two formulas: :meth:`ratequant.spec.KVQuantSpec.expected_bytes` (exact tokens)
   and :class:`ratequant.allocation.CostModel` ``bytes_per_token * tokens`` (what ``calibrate`` budgets). A
   sampler thread records peak RSS during the run; the RSS still held after the run (cache alive)
   is compared with the cache's bytes, and a float32 and float16 ``DynamicCache`` of the same tokens are
   given for scale. Criterion: ``nbytes() <= 1.01 * expected_bytes`` and the run completes.

3. **Under pressure.** A soak of the library: ``--soak`` iterations (default 600) of a cache's whole life on
   one model (prefill a prompt, greedy decode, beam search with ``num_beams=2`` so the cache is reordered,
   ``crop`` back to the prompt, decode again, ``reset``), sampling RSS and open file descriptors after every
   iteration (criterion: both flat after the warm-up, RSS within ``--max-growth-mib``). Then ``--processes``
   (default 4) concurrent ``ratequant generate`` processes with the same plan, while as many processes
   write plans into one folder (each its own file, and all of them the same file with ``overwrite``) ``--writes``
   times; every process must exit 0 and every plan file must load and equal what was written.

``--model random`` uses a randomly initialised model of the default geometry instead (no package needed).

    python benchmarks/long_runs.py                         # both parts, about 10 minutes on 2 CPU cores
    python benchmarks/long_runs.py --generations 20 --context 2048 --output results/long_runs_quick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import (
    FLOAT16_BYTES,
    PeakRSS,
    alternating_bits,
    args_dict,
    corpus_windows,
    key_channel_scales,
    machine_info,
    rss_or_peak,
    write_result,
)
from ratequant import Geometry, KVQuantSpec, Plan
from ratequant.allocation import CostModel
from ratequant.cache import DEFAULT_RESIDUAL_LENGTH, RateQuantCache
from ratequant.compat import cache_argument
from ratequant.quantizers import get_quantizer

FORMAT_VERSION = 1
MIB = 2**20


def live_tensors() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def make_plan(name: str, geometry: Geometry, bits: np.ndarray, quantizer, residual: int) -> Plan:
    avg = float(bits.mean())
    return Plan(
        model={"name": name, **geometry.to_dict()},
        quantizer=quantizer.to_config(),
        budget={"kind": "avg_bits", "value": avg},
        allocator="alternating",
        avg_bits=avg,
        bits={"key": bits[0].tolist(), "value": bits[1].tolist()},
        residual_length=residual,
    )


def load(args):
    """``LoadedModel`` of the default model, or of a random model with its geometry (``--model random``)."""
    from ratequant import LoadedModel, load_model

    if args.model == "default":
        return load_model()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ratequant.compat import model_geometry

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=8192,
        max_position_embeddings=args.context + args.decode,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=_corpus_tokenizer(config.vocab_size),
        name="random-smollm2-geometry",
        source="random",
        geometry=model_geometry(model),
    )


def _corpus_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained in memory on the calibration split (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ratequant import load_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_corpus().calibration], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def corpus_ids(loaded, tokens: int) -> torch.Tensor:
    from ratequant import load_corpus

    return corpus_windows(loaded.tokenizer, load_corpus().evaluation, tokens, 1)


# -- part 1 ------------------------------------------------------------------------------------------------
def repeated_generations(loaded, args) -> dict:
    from ratequant import generate

    quantizer = get_quantizer("kivi")
    bits = alternating_bits(loaded.geometry)
    plan = make_plan(loaded.name, loaded.geometry, bits, quantizer, args.residual)
    ids = corpus_ids(loaded, args.generations * args.prompt_tokens + args.prompt_tokens)[0]
    prompts = [
        loaded.tokenizer.decode(ids[i * args.prompt_tokens : (i + 1) * args.prompt_tokens])
        for i in range(args.generations)
    ]
    rss, tensors, seconds, cache_bytes = [], [], [], []
    for i, prompt in enumerate(prompts):
        out = generate(loaded, prompt, plan.resolve(loaded.model), max_new_tokens=args.new_tokens)
        seconds.append(out.seconds)
        cache_bytes.append(out.cache_bytes["total"])
        del out
        gc.collect()
        rss.append(rss_or_peak())
        if i % args.tensor_every == 0 or i == len(prompts) - 1:
            tensors.append((i, live_tensors()))
        if (i + 1) % 20 == 0:
            print(f"  generation {i + 1}/{len(prompts)}: RSS {rss[-1] / MIB:.1f} MiB, {seconds[-1]:.2f} s", flush=True)
    warm = min(args.warmup, len(rss) - 1)
    after = np.array(rss[warm:], dtype=np.float64)
    slope = float(np.polyfit(np.arange(after.size), after, 1)[0]) if after.size > 1 else 0.0
    growth = rss[-1] - rss[warm - 1 if warm else 0]
    return {
        "generations": len(prompts),
        "prompt_tokens_approx": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "residual_length": args.residual,
        "quantizer": quantizer.to_config(),
        "avg_bits": float(bits.mean()),
        "warmup": warm,
        "rss_first_mib": rss[0] / MIB,
        "rss_after_warmup_mib": rss[warm - 1 if warm else 0] / MIB,
        "rss_last_mib": rss[-1] / MIB,
        "rss_max_after_warmup_mib": float(after.max()) / MIB,
        "rss_min_after_warmup_mib": float(after.min()) / MIB,
        "growth_after_warmup_mib": growth / MIB,
        "slope_bytes_per_generation": slope,
        "live_tensors": tensors,
        "cache_bytes_per_generation": {"min": min(cache_bytes), "max": max(cache_bytes)},
        "seconds_per_generation": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))},
        "rss_mib": [round(r / MIB, 2) for r in rss],
        "criterion": {"max_growth_mib": args.max_growth_mib, "passed": growth / MIB <= args.max_growth_mib},
    }


# -- part 2 ------------------------------------------------------------------------------------------------
def realistic_kv(geometry: Geometry, seed: int = 0):
    """Per layer, the (key, value) scales ``[1, H, 1, D]`` of realistic keys and values: keys with lognormal
    per-channel scales and two outlier channels (as observed in real models), values Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    h, d = geometry.num_kv_heads, geometry.head_dim
    return [(key_channel_scales(gen, h, d), torch.full((1, h, 1, d), 0.5)) for _ in range(geometry.num_layers)]


@torch.inference_mode()
def long_context(loaded, args) -> dict:
    """``--context`` tokens through a plan's cache, then ``--decode`` single-token steps; bytes and RSS."""
    g = loaded.geometry
    dtype = loaded.dtype
    quantizer = get_quantizer("kivi")
    bits = alternating_bits(g)
    plan = make_plan(loaded.name, g, bits, quantizer, DEFAULT_RESIDUAL_LENGTH)
    gc.collect()
    rss_before = rss_or_peak()
    if args.context_source == "model":
        model = loaded.model
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.context + args.decode)
        ids = corpus_ids(loaded, args.context)
        cache = RateQuantCache.from_plan(plan, model)
    else:
        scales = realistic_kv(g)
        gen = torch.Generator().manual_seed(1)
        cache = RateQuantCache(KVQuantSpec(plan.bits_array(), quantizer, plan.residual_length))
    spec = cache.spec
    start = time.perf_counter()
    with PeakRSS(0.005, trim_first=False, read=rss_or_peak) as sampler:
        if args.context_source == "model":
            for i in range(0, args.context, args.chunk):
                chunk = ids[:, i : i + args.chunk]
                logits = loaded.model(chunk, **cache_argument(loaded.model, cache), use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            for _ in range(args.decode):
                out = loaded.model(token, **cache_argument(loaded.model, cache), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            del logits
        else:  # what a forward pass does to the cache: every layer appends the chunk and reads everything back
            whole, rest = divmod(args.context, args.chunk)
            steps = [args.chunk] * whole + [rest] * bool(rest)
            steps += [1] * args.decode
            for n in steps:
                for layer, (k_scale, v_scale) in zip(cache.layers, scales):
                    shape = (1, g.num_kv_heads, n, g.head_dim)
                    keys = (torch.randn(shape, generator=gen) * k_scale).to(dtype)
                    values = (torch.randn(shape, generator=gen) * v_scale).to(dtype)
                    k_all, v_all = layer.update(keys, values)
                    del k_all, v_all
    seconds = time.perf_counter() - start
    gc.collect()
    rss_held = rss_or_peak()
    tokens = cache.get_seq_length()
    got = cache.nbytes()
    formula = spec.expected_bytes(g.head_dim, tokens, dtype=dtype)
    cost = CostModel.from_policy(spec.policy, g, tokens, itemsize=dtype.itemsize)
    per_token = cost.bytes_per_token(bits)
    fp_elems = 2 * g.num_layers * g.num_kv_heads * g.head_dim * tokens
    del cache
    gc.collect()
    rss_released = rss_or_peak()
    return {
        "source": args.context_source,
        "model": loaded.name,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "prefill_chunk": args.chunk,
        "decode_steps": args.decode,
        "quantizer": quantizer.to_config(),
        "residual_length": 128,
        "avg_bits": float(bits.mean()),
        "seconds": seconds,
        "cache_bytes": got.to_dict(),
        "expected_bytes": formula.to_dict(),
        "cache_over_expected": got.total / formula.total,
        "cost_model_bytes_per_token": per_token,
        "cost_model_total_bytes": per_token * tokens,
        "cache_over_cost_model": got.total / (per_token * tokens),
        "float32_dynamic_cache_bytes": fp_elems * 4,
        "float16_dynamic_cache_bytes": fp_elems * FLOAT16_BYTES,
        "ratio_to_float16": got.total / (fp_elems * FLOAT16_BYTES),
        "cache_mib": got.total / MIB,
        "rss_before_mib": rss_before / MIB,
        "rss_peak_mib": sampler.peak / MIB,
        "rss_peak_growth_mib": (sampler.peak - rss_before) / MIB,
        "rss_held_growth_mib": (rss_held - rss_before) / MIB,
        "rss_after_release_growth_mib": (rss_released - rss_before) / MIB,
        "criterion": {"max_cache_over_expected": 1.01, "passed": got.total <= 1.01 * formula.total},
    }


# -- part 3 ------------------------------------------------------------------------------------------------
def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


@torch.inference_mode()
def soak(loaded, args) -> dict:
    """Many lives of a cache on one model: prefill, decode, beam search (reorder), crop, decode, reset."""
    model, g = loaded.model, loaded.geometry
    plan = make_plan(loaded.name, g, alternating_bits(g), get_quantizer("kivi"), args.residual)
    spec = plan.resolve(model)
    ids = corpus_ids(loaded, args.prompt_tokens)[:, : args.prompt_tokens]
    pad = loaded.tokenizer.eos_token_id
    rss, fds, start = [], [], time.perf_counter()
    for i in range(args.soak):
        cache = RateQuantCache(spec, model=model)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad, **cache_argument(model, cache))
        out = model.generate(ids, **kw)
        if i % 3 == 0:
            beams = RateQuantCache(spec, model=model)
            model.generate(ids, num_beams=2, **{**kw, **cache_argument(model, beams)})
        cache.crop(ids.shape[1] - cache.get_seq_length())  # a negative count: drop what was generated
        model.generate(out[:, : ids.shape[1] + 1], **kw)
        cache.reset()
        del cache, out
        gc.collect()
        rss.append(rss_or_peak())
        fds.append(open_fds())
        if (i + 1) % 100 == 0:
            print(f"  soak {i + 1}/{args.soak}: RSS {rss[-1] / MIB:.1f} MiB, {fds[-1]} fds", flush=True)
    warm = min(args.warmup, len(rss) - 1)
    growth = (rss[-1] - rss[warm]) / MIB
    return {
        "iterations": args.soak,
        "seconds": time.perf_counter() - start,
        "rss_after_warmup_mib": rss[warm] / MIB,
        "rss_last_mib": rss[-1] / MIB,
        "growth_after_warmup_mib": growth,
        "fds_after_warmup": fds[warm],
        "fds_last": fds[-1],
        "fds_max": max((f for f in fds if f is not None), default=None),
        "rss_mib": [round(r / MIB, 2) for r in rss],
        "criterion": {"passed": growth <= args.max_growth_mib and fds[-1] == fds[warm]},
    }


PLAN_WRITER = """
import sys
from ratequant import Plan
plan, folder, n = Plan.load(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    plan.to_json(f"{folder}/own-{sys.argv[4]}-{i}.json")
    plan.to_json(f"{folder}/shared.json", overwrite=True)
"""


def concurrent_processes(loaded, args) -> dict:
    """``--processes`` generate processes and as many plan writers at once; every exit status and file."""
    import subprocess
    import sys
    import tempfile

    from _common import subprocess_env

    plan = make_plan(
        loaded.name, loaded.geometry, alternating_bits(loaded.geometry), get_quantizer("kivi"), DEFAULT_RESIDUAL_LENGTH
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plan_path = plan.to_json(folder / "plan.json")
        (folder / "plans").mkdir()
        env = subprocess_env(1)
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ratequant.cli", "generate", "--plan", str(plan_path), "--quiet",
                 "--prompt", f"Process {i} writes about the with statement", "--max-new-tokens", "24",
                 "--json", str(folder / f"generate-{i}.json")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            for i in range(args.processes)
        ]  # fmt: skip
        procs += [
            subprocess.Popen(
                [sys.executable, "-c", PLAN_WRITER, str(plan_path), str(folder / "plans"), str(args.writes), str(i)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            for i in range(args.processes)
        ]  # fmt: skip
        codes = [p.wait() for p in procs]
        errors = [p.stderr.read().strip().splitlines()[-1:] for p, c in zip(procs, codes) if c]
        seconds = time.perf_counter() - start
        written = sorted((folder / "plans").glob("*.json"))
        intact = sum(Plan.load(f).to_dict() == plan.to_dict() for f in written)
        outputs = [json.loads((folder / f"generate-{i}.json").read_text()) for i in range(args.processes)]
        leftovers = [f.name for f in (folder / "plans").iterdir() if not f.name.endswith(".json")]
    expected_files = args.processes * args.writes + 1
    return {
        "processes": args.processes,
        "writes_per_writer": args.writes,
        "seconds": seconds,
        "exit_codes": codes,
        "errors": errors,
        "plan_files": len(written),
        "plan_files_intact": intact,
        "leftover_temporary_files": leftovers,
        "generated_tokens": [o["new_tokens"] for o in outputs],
        "criterion": {
            "passed": not any(codes) and intact == len(written) == expected_files and not leftovers,
        },
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("default", "random"), default="default")
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--residual", type=int, default=32)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--tensor-every", type=int, default=20, help="count live tensors every N generations")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument(
        "--context-source",
        choices=("kv", "model"),
        default="kv",
        help="kv (default): feed realistic keys/values into the cache layers as a forward pass "
        "would; model: run the model itself (hours on a 2-core CPU at 16k tokens)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a small shared CPU more threads spin against each other)",
    )
    parser.add_argument("--soak", type=int, default=600, help="soak iterations (part 3)")
    parser.add_argument("--processes", type=int, default=4, help="concurrent generate processes (part 3)")
    parser.add_argument("--writes", type=int, default=50, help="plan files each concurrent writer writes")
    parser.add_argument("--skip", choices=("generations", "context", "pressure"), action="append", default=[])
    parser.add_argument("--output", type=Path, default=Path("results/long_runs.json"))
    args = parser.parse_args(argv)
    if args.chunk % 128:
        parser.error("--chunk must be a multiple of 128 (the residual window) so prefill follows the decoding policy")

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded = load(args)
    result = {
        "format_version": FORMAT_VERSION,
        "benchmark": "long_runs",
        "config": args_dict(args),
        "machine": machine_info(args.threads),
        "model": {"name": loaded.name, **loaded.geometry.to_dict(), "dtype": str(loaded.dtype).removeprefix("torch.")},
    }
    if "generations" not in args.skip:
        print(f"{args.generations} generations ...", flush=True)
        result["repeated_generations"] = repeated_generations(loaded, args)
        r = result["repeated_generations"]
        print(
            f"  RSS growth after warm-up {r['growth_after_warmup_mib']:+.2f} MiB "
            f"(slope {r['slope_bytes_per_generation'] / 1024:+.2f} KiB/generation); "
            f"live tensors {r['live_tensors'][0][1]} -> {r['live_tensors'][-1][1]}"
        )
    if "context" not in args.skip:
        print(f"{args.context}-token context ...", flush=True)
        result["long_context"] = long_context(loaded, args)
        r = result["long_context"]
        print(
            f"  {r['tokens']} tokens in {r['seconds']:.0f} s; cache {r['cache_mib']:.1f} MiB = "
            f"{r['cache_over_expected']:.4f} x expected_bytes; RSS peak +{r['rss_peak_growth_mib']:.0f} MiB, "
            f"held +{r['rss_held_growth_mib']:.0f} MiB"
        )
    if "pressure" not in args.skip:
        print(f"soak: {args.soak} cache lives ...", flush=True)
        result["soak"] = soak(loaded, args)
        r = result["soak"]
        print(
            f"  RSS growth after warm-up {r['growth_after_warmup_mib']:+.2f} MiB; fds {r['fds_after_warmup']} -> "
            f"{r['fds_last']}; {'passed' if r['criterion']['passed'] else 'FAILED'}"
        )
        print(f"{args.processes} generate processes and {args.processes} plan writers at once ...", flush=True)
        result["concurrent"] = concurrent_processes(loaded, args)
        r = result["concurrent"]
        print(
            f"  exit codes {r['exit_codes']}; {r['plan_files_intact']}/{r['plan_files']} plan files intact; "
            f"{'passed' if r['criterion']['passed'] else 'FAILED'}"
        )
    result["seconds"] = time.perf_counter() - start
    print(f"written to {write_result(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
