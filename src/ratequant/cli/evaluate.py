"""``ratequant eval``, ``generate`` and ``info``.

Three commands in one module because they load a model, a corpus or a plan through the same options.
"""

from __future__ import annotations

import argparse
import sys

from ratequant import __version__
from ratequant.cache.generation import generate
from ratequant.cache.prefill import DEFAULT_PREFILL_CHUNK
from ratequant.cli import command
from ratequant.cli.options import (
    add_corpus_options,
    add_model_options,
    add_output_options,
    add_plan_options,
    bounded_float,
    check_output,
    emit_json,
    float_list,
    load_model_from,
    nonnegative_int,
    positive_int,
    read_plan,
    spec_for,
)
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import Simulated, Streaming, quantized_predictions
from ratequant.evaluation.protocol import (
    BOS_CHOICES,
    DEFAULT_SCORING,
    DEFAULT_SEQ_LEN,
    DEFAULT_WINDOWS,
    SCORING,
    WindowProtocol,
)
from ratequant.evaluation.tasks import TASKS, PasskeyTask, PerplexityTask
from ratequant.inputs.corpora import load_corpus
from ratequant.kernels import native
from ratequant.progress import warning
from ratequant.validation import inert


def configure_eval(parser: argparse.ArgumentParser) -> None:

    PASSKEY = PasskeyTask()  # its defaults

    add_model_options(parser)
    add_corpus_options(parser)
    add_plan_options(parser, positional=True)
    parser.add_argument(
        "--task", choices=tuple(TASKS), default="perplexity", help="what to measure (default perplexity)"
    )
    parser.add_argument(
        "--mode",
        choices=("simulated", "streaming"),
        default="simulated",
        help="with --plan: simulated quantization on whole windows (fast, default) or through the real cache",
    )
    parser.add_argument("--seq-len", type=positive_int, help=f"tokens per window (default {DEFAULT_SEQ_LEN})")
    parser.add_argument(
        "--windows", type=positive_int, help=f"number of windows to evaluate (default {DEFAULT_WINDOWS})"
    )
    parser.add_argument(
        "--bos",
        choices=BOS_CHOICES,
        default="auto",
        help="start every window with BOS: auto (as the tokenizer does, default), yes, no",
    )
    parser.add_argument(
        "--scoring",
        choices=SCORING,
        help="score the second half of each window (second-half, default, as llama.cpp's perplexity tool and "
        "ratequant compare do) or every prediction (all)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        metavar="N",
        help="streaming: tokens per forward pass through the cache (default: the quantization chunk)",
    )
    parser.add_argument(
        "--context", type=positive_int, help=f"retrieval tasks: prompt length in tokens (default {PASSKEY.context})"
    )
    parser.add_argument(
        "--depths",
        type=float_list,
        default=(0.1, 0.3, 0.5, 0.7, 0.9),
        metavar="D,D,...",
        help="retrieval tasks: needle depths in [0, 1]",
    )
    parser.add_argument(
        "--trials", type=positive_int, help=f"retrieval tasks: trials per depth (default {PASSKEY.trials})"
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, help=f"retrieval tasks: seed of the needles (default {PASSKEY.seed})"
    )
    add_output_options(parser)


@command("eval", configure_eval)
def run_eval(args: argparse.Namespace) -> int:
    check_output(args)

    PASSKEY = PasskeyTask()  # its defaults

    if args.plan is None and args.mode != "simulated":
        raise RateQuantError(
            "--mode streaming runs a plan's cache; pass --plan (without one the model runs at full precision)"
        )
    windows_given = any(getattr(args, name) is not None for name in ("seq_len", "windows", "scoring"))
    retrieval = args.task != "perplexity"  # passkey and the RULER-style tasks: needles at depths of one context
    if retrieval and windows_given:
        raise RateQuantError(
            f"--seq-len, --windows and --scoring apply to --task perplexity; {args.task} takes --context"
        )
    if not retrieval and any(getattr(args, name) is not None for name in ("context", "trials", "seed")):
        raise RateQuantError("--context, --depths, --trials and --seed apply to the retrieval tasks (e.g. passkey)")
    args.seq_len = args.seq_len or DEFAULT_SEQ_LEN
    args.windows = args.windows or DEFAULT_WINDOWS
    args.scoring = args.scoring or DEFAULT_SCORING
    args.context = args.context or PASSKEY.context
    args.trials = args.trials or PASSKEY.trials
    args.seed = PASSKEY.seed if args.seed is None else args.seed

    plan = read_plan(args)
    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    spec = spec_for(args, plan, loaded.model)
    conditions = {}
    coverage = None
    if spec is not None:
        condition = (
            Simulated(spec) if args.mode == "simulated" else Streaming(spec, args.prefill_chunk, label="streaming")
        )
        conditions["plan"] = condition
        if args.task == "perplexity":
            protocol = WindowProtocol(args.seq_len, args.windows, args.bos, args.scoring)
            coverage = quantized_coverage(spec, condition, protocol)
    if retrieval:
        task = TASKS.get(args.task)(
            context=args.context,
            depths=tuple(args.depths),
            trials=args.trials,
            seed=args.seed,
            prefill_chunk=args.prefill_chunk or DEFAULT_PREFILL_CHUNK,
        )
    else:
        task = PerplexityTask(WindowProtocol(args.seq_len, args.windows, args.bos, args.scoring))
    outcome = task.run(loaded, corpus, conditions)
    payload = {
        "format_version": 2,
        "kind": "eval",
        **headline(outcome),
        **outcome.to_dict(),
        "model": loaded.name,
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": loaded.describe()["device"],
        "ratequant_version": __version__,
    }
    storage = None
    if spec is not None:
        payload.update(plan=str(args.plan), mode=args.mode, avg_bits=spec.avg_bits, **spec.to_dict())
        if plan.bytes_per_token is not None:  # what the plan states, at the context it states it for
            payload.update(plan_bytes_per_token=plan.bytes_per_token, plan_bytes_context=plan.stated_context_tokens)
        if outcome.task == "perplexity":
            storage = kv_bytes(conditions["plan"], spec, loaded, args.seq_len)
            windows = outcome.settings["windows"]["windows"]
            payload.update(storage)
            payload.update(
                quantized_predictions=coverage[0] * windows,
                scored_predictions=coverage[1] * windows,
                quantized_share=coverage[0] / coverage[1],
            )
    for line in describe_outcome(outcome, loaded, spec, args, coverage, storage):
        print(inert(line))
    emit_json(args, payload)
    return 0


def quantized_coverage(spec, condition, protocol) -> tuple[int, int]:
    """``(quantized, scored)`` predictions per window of ``protocol`` under ``condition``: refuses (one line) a
    window that the residual window and the sinks keep wholly at full precision, and warns when they keep most of
    it so (the KL would then say little about the plan)."""
    prefill = condition.prefill_chunk if isinstance(condition, Simulated) else condition.piece
    first, seq_len = protocol.first_target, protocol.seq_len
    scored = seq_len - first
    quantized = quantized_predictions(spec, seq_len, first, prefill)
    chunk = min(max(f, prefill) for f in spec.chunks)
    kept = f"a residual window of {spec.residual_length} tokens" + (
        f" and {spec.sink_tokens} sink token(s)" if spec.sink_tokens else ""
    )
    if quantized == 0:
        raise RateQuantError(
            f"nothing would be quantized: with {kept} every scored prediction of a {seq_len}-token window sees only "
            f"full-precision keys and values; use --seq-len {4 * (spec.sink_tokens + chunk)} or more, or a smaller "
            "--residual"
        )
    if quantized < scored / 2:
        warning(
            f"only {quantized} of the {scored} scored predictions per window ({quantized / scored:.0%}) read quantized "
            f"keys or values; {kept} keep the rest at full precision, so the KL understates the plan's damage: use a "
            "longer --seq-len"
        )
    return quantized, scored


def kv_bytes(condition, spec, loaded, context: int) -> dict:
    """True KV bytes per token at ``context`` tokens: read from the real cache after the last window (streaming),
    or from the byte formula (simulated); beside them the bytes per token of a full-precision cache of the same
    tokens in float16 and in the model's dtype."""
    if getattr(condition, "last_cache", None) is not None:
        total, source = condition.last_cache.nbytes().total, "measured from the cache's tensors"
    else:
        expected = spec.expected_bytes(loaded.geometry.head_dim, context, dtype=loaded.dtype)
        total, source = expected.total, "byte formula"
    return {
        "kv_bytes_per_token": total / context,
        "kv_bytes_context": context,
        "kv_bytes_source": source,
        "kv_bytes_per_token_float16": loaded.geometry.kv_bytes_per_token(2),
        "kv_bytes_per_token_model_dtype": loaded.geometry.kv_bytes_per_token(loaded.dtype.itemsize),
    }


def headline(outcome) -> dict:
    """The numbers of the measured condition (the plan's, else full precision) at the top of the JSON."""
    name = next(reversed(outcome.results))
    result = outcome.results[name]
    if outcome.task != "perplexity":
        return {key: result[key] for key in ("context", "trials", "accuracy", "mean_logprob") if key in result}
    w = outcome.settings["windows"]
    keys = ("ppl", "ppl_se", "kl", "kl_se", "top1", "tokens", "seconds")
    return {**{key: result[key] for key in keys}, "windows": w["windows"], "seq_len": w["seq_len"]}


def describe_outcome(outcome, loaded, spec, args, coverage=None, storage=None) -> list[str]:
    """The lines ``eval`` prints for a task result (``coverage``: quantized and scored predictions per window;
    ``storage``: :func:`kv_bytes`)."""
    lines = []
    if outcome.task != "perplexity":
        for name, r in outcome.results.items():
            interval = f" (95% {r['accuracy_low']:.2f}-{r['accuracy_high']:.2f})" if "accuracy_low" in r else ""
            lines.append(
                f"{outcome.task} at {r['context']} tokens ({name}): accuracy {r['accuracy']:.2f}{interval} over "
                f"{r['trials']} trials, mean answer log-probability {r['mean_logprob']:.3f} nats ({r['seconds']:.0f} s)"
            )
        return lines
    w = outcome.settings["windows"]
    for name, score in outcome.scores.items():
        what = (
            "full precision"
            if name == "full-precision"
            else f"{args.mode}, {spec.quantizer.name} at {spec.avg_bits:.3f} average bits"
        )
        kl = (
            ""
            if name == "full-precision"
            else f", KL {score.kl:.4f} ± {score.kl_se:.4f}, top-1 agreement {score.top1:.3f}"
        )
        if name != "full-precision" and coverage is not None:
            what += f"; {coverage[0] / coverage[1]:.0%} of the scored predictions read quantized storage"
        lines.append(
            f"perplexity {score.ppl:.3f} ± {score.ppl_se:.3f}{kl} on {score.tokens} tokens ({w['windows']} windows "
            f"of {w['seq_len']}, {'BOS first' if w['bos'] else 'no BOS'}, {w['scoring']} scored) in "
            f"{score.seconds:.1f} s; model {loaded.name}, corpus {outcome.settings['corpus']}; {what}"
        )
    if storage is not None:
        dtype = str(loaded.dtype).removeprefix("torch.")
        lines.append(
            f"KV cache at {storage['kv_bytes_context']} tokens: {storage['kv_bytes_per_token']:,.1f} bytes per token "
            f"({storage['kv_bytes_source']}); full precision {storage['kv_bytes_per_token_float16']:,} in float16, "
            f"{storage['kv_bytes_per_token_model_dtype']:,} in {dtype}"
        )
    return lines


# -- generate --------------------------------------------------------------------------------------------
def configure_generate(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_plan_options(parser)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="at most this many new tokens (default 64)"
    )
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--temperature", type=bounded_float(0.01, 100.0), default=0.8, help="sampling temperature, 0.01..100"
    )
    parser.add_argument("--top-p", type=bounded_float(1e-6, 1.0), default=0.95, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (0 to 2**62)")
    parser.add_argument(
        "--prefill-chunk",
        type=nonnegative_int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help=f"prefill the prompt N tokens at a time, bounding activation memory (default {DEFAULT_PREFILL_CHUNK}; "
        "0: one pass)",
    )
    parser.add_argument(
        "--attention",
        choices=("packed", "decode"),
        default="packed",
        help="decode steps attend straight from the packed codes (packed, default) or decode the history first",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print the continuation at the end instead of as it is made"
    )
    add_output_options(parser)


@command("generate", configure_generate)
def run_generate(args: argparse.Namespace) -> int:
    check_output(args)

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RateQuantError(f"the prompt is not valid UTF-8 text (a bad byte at character {exc.start})") from None
    plan = read_plan(args)
    loaded = load_model_from(args)
    spec = spec_for(args, plan, loaded.model)
    out = generate(
        loaded,
        args.prompt,
        spec,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stream=not args.quiet,
        prefill_chunk=args.prefill_chunk or None,
        attention=args.attention,
    )
    if args.quiet:
        print(out.text)
    print("---", file=sys.stderr)
    print(inert(out.describe()), file=sys.stderr)
    emit_json(
        args,
        {
            "format_version": 1,
            "kind": "generate",
            **out.to_dict(),
            "model": loaded.name,
            "plan": args.plan,
            "ratequant_version": __version__,
        },
    )
    return 0


# -- info ------------------------------------------------------------------------------------------------
def configure_info(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_corpus_options(parser)
    add_output_options(parser)


@command("info", configure_info)
def run_info(args: argparse.Namespace) -> int:
    check_output(args)

    corpus = load_corpus(args.corpus)
    loaded = load_model_from(args)
    model_info = loaded.describe()
    g = loaded.geometry
    fp16_bytes = g.kv_bytes_per_token(2)
    print(inert(f"model      {loaded.name}  ({loaded.source})"))
    print(f"  layers {g.num_layers}, query heads {g.num_heads}, kv heads {g.num_kv_heads}, head dim {g.head_dim}")
    print(f"  {g.num_components} components (key and value of each kv head of each layer)")
    print(f"  dtype {model_info['dtype']}, device {model_info['device']}, {model_info['parameters']:,} parameters")
    print(f"  float16 KV cache: {fp16_bytes:,} bytes per token")
    print(f"decode     {native.describe()}")
    splits = {}
    print(inert(f"corpus     {corpus.name}  (sha256 {corpus.sha256[:16]}...)"))
    for split in ("calibration", "evaluation"):
        text = corpus.split(split)
        tokens = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # the whole split
        splits[split] = {"chars": len(text), "tokens": tokens}
        print(f"  {split:<12} {len(text):>9,} characters {tokens:>9,} tokens")
    emit_json(
        args,
        {
            "format_version": 1,
            "kind": "info",
            "model": {**model_info, "kv_bytes_per_token_fp16": fp16_bytes},
            "corpus": {"name": corpus.name, "sha256": corpus.sha256, "splits": splits},
            "decode": {"native": native.available(), "path": native.describe()},
        },
    )
    return 0
