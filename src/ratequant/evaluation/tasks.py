"""Evaluation tasks: what is measured for a set of conditions. One class per task, in :data:`TASKS`.

* ``perplexity`` -- next-token perplexity and KL divergence from full precision on windows of a corpus
  (:mod:`ratequant.evaluation.perplexity`, under the protocol of :mod:`ratequant.evaluation.protocol`);
* ``passkey`` -- retrieval of a key hidden in a long filler context, through the real cache
  (:mod:`ratequant.evaluation.passkey`);
* ``niah-single``, ``niah-single-word``, ``niah-multikey``, ``niah-multivalue``, ``niah-multiquery``,
  ``variable-tracking`` -- RULER's synthetic retrieval in the corpus's evaluation text, through the real cache
  (:mod:`ratequant.evaluation.retrieval`).

Every task runs with ``run(loaded, corpus, conditions)`` over named :class:`Condition` objects and returns a
:class:`TaskResult` whose ``to_dict()`` is the JSON the command line writes. Adding a task is one class with
``@TASKS.register``; the command line (``eval --task``) and the tests pick it up from the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from ratequant.cache.prefill import DEFAULT_PREFILL_CHUNK
from ratequant.errors import RateQuantError
from ratequant.evaluation.conditions import Condition, FullPrecision, PeerCache, Simulated, Streaming
from ratequant.evaluation.needles import KINDS
from ratequant.evaluation.passkey import DEFAULT_DEPTHS, PasskeyResult, run_passkey
from ratequant.evaluation.perplexity import REFERENCE, ConditionScore, score_conditions
from ratequant.evaluation.protocol import WindowProtocol, make_windows
from ratequant.evaluation.retrieval import RetrievalResult, run_retrieval
from ratequant.inputs.corpora import Corpus
from ratequant.inputs.models import LoadedModel
from ratequant.registry import Registry
from ratequant.spec import DEFAULT_CONTEXT_TOKENS
from ratequant.validation import check_float, check_int

TASKS: Registry[type[Task]] = Registry("evaluation task")


@dataclass(frozen=True)
class TaskResult:
    """A task's outcome: ``settings`` (what was run) and ``results`` (JSON-ready, per condition name)."""

    task: str
    settings: dict
    results: dict
    scores: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"task": self.task, **self.settings, "results": self.results}


class Task(ABC):
    """A measurement over named conditions. Subclasses are frozen dataclasses whose fields are the settings."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def run(
        self, loaded: LoadedModel, corpus: Corpus, conditions: dict[str, Condition], *, progress: bool = True
    ) -> TaskResult:
        """Measure every condition (the task adds the full-precision reference where it needs one)."""


@TASKS.register
@dataclass(frozen=True)
class PerplexityTask(Task):
    """Perplexity and KL from full precision on the evaluation split, windows cut by ``protocol``."""

    name = "perplexity"
    summary = "perplexity and KL divergence from full precision on windows of the evaluation split"
    protocol: WindowProtocol = field(default_factory=WindowProtocol)

    def run(self, loaded, corpus, conditions, *, progress=True):
        windows = make_windows(loaded.tokenizer, corpus.evaluation, self.protocol)
        scores = score_conditions(loaded.model, windows, conditions, progress=progress)[self.protocol.scoring]
        results = {name: score.to_dict() for name, score in scores.items()}
        return TaskResult(self.name, {"windows": windows.describe(), "corpus": corpus.name}, results, scores)


@dataclass(frozen=True)
class NeedleTask(Task):
    """A retrieval task at ``context`` tokens over ``depths`` x ``trials`` (seeded), through the real cache: each
    condition's cache (a :class:`RateQuantCache` of its spec; ``DynamicCache`` at full precision), prefilled
    ``prefill_chunk`` tokens at a time (None: the spec's own chunk after its sinks). A subclass runs one
    condition (:meth:`run_condition`) and names the task."""

    context: int = DEFAULT_CONTEXT_TOKENS
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    trials: int = 2
    seed: int = 0
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK

    def __post_init__(self) -> None:
        check_int(self.context, f"{self.name} context", lo=16, hi=1 << 20)
        check_int(self.trials, f"{self.name} trials", lo=1, hi=10_000)
        check_int(self.seed, f"{self.name} seed", lo=0)
        depths = tuple(check_float(d, f"{self.name} depth", lo=0.0, hi=1.0) for d in self.depths)
        object.__setattr__(self, "depths", depths)
        if self.prefill_chunk is not None:
            check_int(self.prefill_chunk, "prefill chunk", lo=1, hi=1 << 20)

    @abstractmethod
    def run_condition(self, loaded: LoadedModel, corpus: Corpus, condition: Condition, progress: bool):
        """The task's result under one condition (``to_dict()`` gives its JSON)."""

    def run(self, loaded, corpus, conditions, *, progress=True):
        runs = dict(conditions) or {REFERENCE: FullPrecision()}
        results = {name: self.run_condition(loaded, corpus, condition, progress) for name, condition in runs.items()}
        settings = {
            "context": self.context,
            "depths": list(self.depths),
            "trials_per_depth": self.trials,
            "seed": self.seed,
            **self.extra_settings(corpus),
        }
        return TaskResult(self.name, settings, {n: r.to_dict() for n, r in results.items()}, results)

    def extra_settings(self, corpus: Corpus) -> dict:
        return {}

    def run_options(self, loaded: LoadedModel, condition: Condition, progress: bool) -> dict:
        """The keyword arguments every runner takes for ``condition``."""
        return {
            "context": self.context,
            "depths": self.depths,
            "trials": self.trials,
            "seed": self.seed,
            "make_cache": cache_factory(condition, loaded.model),
            "prefill_chunk": self.prefill_for(condition),
            "progress": progress,
        }

    def prefill_for(self, condition: Condition) -> int | None:
        if isinstance(condition, (Simulated, Streaming)):
            chunk = self.prefill_chunk or max(condition.spec.chunks)
            return condition.spec.policy.check_prefill_chunk(chunk)
        return self.prefill_chunk


@TASKS.register
@dataclass(frozen=True)
class PasskeyTask(NeedleTask):
    """Passkey retrieval (:mod:`ratequant.evaluation.passkey`): a key in filler text, as :class:`NeedleTask`."""

    name = "passkey"
    summary = "a 5-digit key hidden in filler text at several depths, asked for at the end"

    def run_condition(self, loaded, corpus, condition, progress) -> PasskeyResult:
        return run_passkey(loaded.model, loaded.tokenizer, **self.run_options(loaded, condition, progress))


@dataclass(frozen=True)
class RetrievalTask(NeedleTask):
    """A RULER-style retrieval task (:mod:`ratequant.evaluation.retrieval`), its haystack cut from the corpus's
    evaluation split, as :class:`NeedleTask`. A subclass names the task."""

    def run_condition(self, loaded, corpus, condition, progress) -> RetrievalResult:
        return run_retrieval(
            loaded.model,
            loaded.tokenizer,
            corpus.evaluation,
            kind=self.name,
            **self.run_options(loaded, condition, progress),
        )

    def extra_settings(self, corpus: Corpus) -> dict:
        return {"corpus": corpus.name}


for _kind in KINDS:  # one registered task per retrieval kind, named and summarised as the kind
    TASKS.register(
        dataclass(frozen=True)(
            type(
                f"{_kind.title().replace('-', '')}Task",
                (RetrievalTask,),
                {"name": _kind, "summary": KINDS.get(_kind).summary},
            )
        )
    )


def cache_factory(condition: Condition, model):
    """The real cache a condition decodes with: ``RateQuantCache`` of its spec, a peer's cache, or None
    (``DynamicCache``)."""
    if isinstance(condition, (Simulated, Streaming)):
        from ratequant.cache import RateQuantCache

        return lambda: RateQuantCache(condition.spec, model=model)
    if isinstance(condition, PeerCache):
        return condition.make_cache
    if isinstance(condition, FullPrecision):
        return None
    raise RateQuantError(
        f"condition {condition.label!r} has no real cache; the retrieval tasks run through a cache only"
    )


def get_task(name: str, **settings) -> Task:
    """A task by registry name with its settings."""
    try:
        return TASKS.get(name)(**settings)
    except TypeError as exc:
        raise RateQuantError(f"task {name!r}: {exc}") from None


__all__ = [
    "TASKS",
    "ConditionScore",
    "NeedleTask",
    "PasskeyTask",
    "PerplexityTask",
    "RetrievalTask",
    "Task",
    "TaskResult",
    "cache_factory",
    "get_task",
]
