"""How a prefill piece should read the packed history on a CPU: block by block through PyTorch's fused
attention (what the cache does), or straight from the codes with the decode kernel, as decode steps do.

For a prompt of ``--tokens`` tokens of the evaluation corpus, prefilled ``--chunk`` tokens at a time on the
default model with one thread, it times to the first token:

* ``dynamic``: transformers' ``DynamicCache``, the same pieces;
* ``blocks``: ``RateQuantCache`` of the plan (``--plan``, default ``results/demo/plan.json``; ``--design`` applies
  its widths with another design), each piece attending to the history one 1,024-token block at a time, each
  block decoded to float32 (:func:`ratequant.cache.attention.attention_in_blocks`);
* ``codes``: the same cache with every piece sent to the path decode steps take
  (:func:`ratequant.kernels.native.attend_layer`: the history never decoded, each stored row read once per query
  row group), by raising the query-length limit of that path (:data:`ratequant.cache.attention.MAX_QUERY`).

``--conditions`` picks among them (``dynamic`` always runs). Conditions alternate over ``--repeats`` rounds (the
order rotating), so a slow spell of the machine hits them alike; the median time of each is reported with its
ratio to ``dynamic``, and the first token of each is checked against ``dynamic``'s.

    python benchmarks/prefill_paths.py --output results/prefill_paths.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

from _common import args_dict, corpus_windows, machine_info, write_result

FORMAT_VERSION = 1
CONDITIONS = ("dynamic", "blocks", "codes")


@contextmanager
def long_pieces_from_codes():
    """Within the block, passes of any length attend straight from the codes (as decode steps do)."""
    from ratequant.cache import attention, layer

    with mock.patch.object(attention, "MAX_QUERY", 1 << 30), mock.patch.object(layer, "MAX_QUERY", 1 << 30):
        yield


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plan", type=Path, default=Path("results/demo/plan.json"))
    parser.add_argument("--design", help="apply the plan's widths with this design (default: the plan's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS), help="dynamic is always run"
    )
    parser.add_argument("--output", type=Path, default=Path("results/prefill_paths.json"))
    args = parser.parse_args(argv)

    import torch
    from transformers import DynamicCache

    from ratequant import Plan, load_corpus, load_model, prefill
    from ratequant.cache import RateQuantCache
    from ratequant.quantizers import get_quantizer

    torch.set_num_threads(args.threads)
    loaded = load_model(dtype="float32")
    model = loaded.model
    plan = Plan.load(args.plan)
    other = {} if args.design is None else {"quantizer": get_quantizer(args.design), "allow_mismatch": True}
    ids = corpus_windows(loaded.tokenizer, load_corpus().evaluation, args.tokens, 1)[:1]
    make = {
        "dynamic": (DynamicCache, None),
        "blocks": (lambda: RateQuantCache.from_plan(plan, model, **other), None),
        "codes": (lambda: RateQuantCache.from_plan(plan, model, **other), long_pieces_from_codes),
    }
    conditions = [name for name in CONDITIONS if name == "dynamic" or name in args.conditions]
    seconds = {name: [] for name in conditions}
    first = {}
    for round_ in range(args.repeats):
        turn = round_ % len(conditions)
        for name in conditions[turn:] + conditions[:turn]:
            make_cache, context = make[name]
            cache = make_cache()
            with torch.inference_mode(), context() if context else nullcontext():
                start = time.perf_counter()
                logits = prefill(model, ids, cache, args.chunk)
                seconds[name].append(time.perf_counter() - start)
            first[name] = int(logits.argmax(-1)[0])
            print(f"round {round_ + 1} {name:8s} {seconds[name][-1]:7.2f} s", flush=True)
            del cache
    base = statistics.median(seconds["dynamic"])
    rows = [
        {
            "condition": name,
            "ttft_s_median": statistics.median(seconds[name]),
            "ttft_s": seconds[name],
            "vs_dynamic": statistics.median(seconds[name]) / base,
            "first_token_matches_dynamic": first[name] == first["dynamic"],
        }
        for name in conditions
    ]
    for r in rows:
        print(f"{r['condition']:8s} median {r['ttft_s_median']:7.2f} s  {r['vs_dynamic']:.2f}x dynamic")
    info = machine_info(args.threads)
    info["model"] = loaded.describe()
    result = {"format_version": FORMAT_VERSION, "benchmark": "prefill_paths", "machine": info,
              "settings": args_dict(args), "plan": plan.summary(), "rows": rows}  # fmt: skip
    write_result(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
