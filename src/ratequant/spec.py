"""The quantization spec: which width every component gets, which design stores it, and where tokens go.

Two rules live here and only here; the cache, the simulated evaluation, the cost model and the plan all use them.

**The token rule** (:class:`StoragePolicy`). A cache holding ``n`` tokens of one kind (keys or values) lays
them out as three ranges of cache positions::

    [0, s0)        sink tokens: the first ``S = sink_tokens`` tokens, kept in the model's dtype for good
                   (the attention sink; KVQuant's ``first_few_fp16``, IntactKV's pivot tokens)
    [s0, s1)       quantized: whole aligned chunks of ``F`` tokens counted from ``s0``, each quantized once
    [s1, n)        residual window: the tokens waiting for their chunk, in the model's dtype

with ``s0 = min(S, n)`` and ``s1 = s0 + floor((n - s0) / F) * F``. The chunk ``F`` of a kind is
``residual_length`` (which must be a positive multiple of the design's ``token_group(kind)``), or the token
group itself when ``residual_length == 0``. A query at cache position ``t`` (the ``t`` tokens before it are in
the cache, its own update is not yet stored) therefore sees key ``j`` quantized iff ``s0(t) <= j < s1(t)``:
:meth:`StoragePolicy.quantized_end` is that ``s1`` for a number of tokens or a tensor of positions.

**The byte formula** (:meth:`StoragePolicy.component_bytes`, :meth:`StoragePolicy.full_precision_bytes`). A
kv head at width ``b`` costs ``quantizer.bits_per_token(head_dim, b, kind) / 8`` bytes per *quantized* token
(``head_dim * b`` code bits plus the design's scales and zeros); sink and residual tokens cost ``head_dim``
values of the model's dtype. :meth:`KVQuantSpec.expected_bytes` adds this up for a cache and
:class:`ratequant.allocation.CostModel` tabulates it per width for the allocator. Sink tokens are a
per-sequence constant: in bytes per token of context they are amortised over the context length, like the
residual window; an average-bits budget counts code bits of quantized tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ratequant.errors import PlanError, RateQuantError
from ratequant.geometry import KINDS, Geometry
from ratequant.quantizers.base import Quantizer
from ratequant.validation import check_bits_array, check_int

DEFAULT_RESIDUAL_LENGTH = 128
"""KIVI's full-precision residual window (Liu et al., ICML 2024), in tokens."""
MAX_SINK_TOKENS = 1 << 16
DEFAULT_CONTEXT_TOKENS = 4096
"""The context length at which true bytes per token are stated by default (the residual window and the sink
tokens are amortised over it)."""


@dataclass(frozen=True)
class CacheBytes:
    """Bytes of a cache: packed ``codes``, ``metadata`` (scales, zeros, norms), the ``residual`` window, the
    ``sink`` tokens, and the optional dequantized working ``buffer`` (0 unless the cache was given one)."""

    codes: int = 0
    metadata: int = 0
    residual: int = 0
    sink: int = 0
    buffer: int = 0

    def __post_init__(self) -> None:
        for name in ("codes", "metadata", "residual", "sink", "buffer"):
            check_int(getattr(self, name), f"CacheBytes.{name}", lo=0, hi=None)

    @property
    def total(self) -> int:
        return int(self.codes + self.metadata + self.residual + self.sink + self.buffer)

    def __add__(self, other: CacheBytes) -> CacheBytes:
        return CacheBytes(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def to_dict(self) -> dict:
        return {**{k: int(v) for k, v in asdict(self).items()}, "total": self.total}


def bit_groups(widths: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """Heads grouped by width, as the cache stores them: ``[(bits, (head, ...)), ...]`` in increasing width."""
    widths = [int(b) for b in widths]
    return [(b, tuple(h for h, w in enumerate(widths) if w == b)) for b in sorted(set(widths))]


@dataclass(frozen=True)
class StoragePolicy:
    """Where tokens go, whatever the widths: the design, the sink tokens and the residual window (module doc).

    ``chunks`` is derived: the quantization chunk ``F`` of (keys, values).
    """

    quantizer: Quantizer
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    sink_tokens: int = 0
    chunks: tuple[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, Quantizer):
            raise RateQuantError(f"quantizer must be a ratequant Quantizer, got {type(self.quantizer).__name__}")
        residual = check_int(self.residual_length, "residual length", lo=0)
        object.__setattr__(self, "residual_length", residual)
        object.__setattr__(self, "sink_tokens", check_int(self.sink_tokens, "sink tokens", lo=0, hi=MAX_SINK_TOKENS))
        chunks = []
        for kind in KINDS:
            group = int(self.quantizer.token_group(kind))
            if group < 1:
                raise RateQuantError(f"quantizer {self.quantizer.name!r} reports token_group({kind!r}) = {group}")
            if residual % group:
                raise RateQuantError(
                    f"residual length {residual} is not a multiple of the {self.quantizer.name!r} quantizer's "
                    f"{kind} token group ({group}); use a multiple of {group} (e.g. {math.lcm(group, 128)}) or 0"
                )
            chunks.append(residual or group)
        object.__setattr__(self, "chunks", (chunks[0], chunks[1]))

    # -- the token rule --------------------------------------------------------------------------------
    def chunk(self, kind: str) -> int:
        """The quantization chunk ``F`` of ``kind``."""
        return self.chunks[KINDS.index(kind)]

    def check_prefill_chunk(self, prefill_chunk: int) -> int:
        """``prefill_chunk`` (tokens per forward pass after the sinks) when it divides, or is a multiple of,
        both kinds' chunks; queries of one pass see each other's tokens at full precision."""
        p = check_int(prefill_chunk, "prefill chunk", lo=1, hi=1 << 24)
        for f in self.chunks:
            if p % f and f % p:
                raise RateQuantError(
                    f"prefill chunk {p} must divide or be a multiple of the quantization chunk {f}; use a multiple "
                    f"of {max(self.chunks)} (e.g. {max(self.chunks) * max(1, p // max(self.chunks))})"
                )
        return p

    def quantized_end(self, kind: str, tokens, prefill_chunk: int = 1):
        """``s1``: end of the quantized range when the cache holds ``tokens`` tokens (an int, or a tensor of
        query positions, each seeing the tokens before it).

        With tokens fed ``prefill_chunk`` at a time after the sinks (pieces ``[S + kP, S + (k+1)P)``), a query
        sees its own piece at full precision: the effective chunk is ``max(F, P)``.
        """
        f, s = max(self.chunk(kind), prefill_chunk), self.sink_tokens
        start = tokens.clamp(max=s) if isinstance(tokens, torch.Tensor) else min(int(tokens), s)
        return start + (tokens - start) // f * f

    def split(self, kind: str, num_tokens: int) -> tuple[int, int, int]:
        """``(sink, quantized, residual)`` token counts of a cache holding ``num_tokens`` tokens of ``kind``."""
        sink = min(int(num_tokens), self.sink_tokens)
        end = self.quantized_end(kind, int(num_tokens))
        return sink, end - sink, int(num_tokens) - end

    # -- the byte formula ------------------------------------------------------------------------------
    def component_bytes(
        self, kind: str, bits: int, head_dim: int, num_tokens: int, batch_size: int = 1
    ) -> tuple[float, float]:
        """``(code bytes, metadata bytes)`` of one kv head's ``kind`` at ``bits`` holding ``num_tokens`` tokens."""
        stored = self.split(kind, num_tokens)[1] * batch_size
        meta = self.quantizer.metadata_bits_per_token(head_dim, int(bits), kind)
        return stored * head_dim * int(bits) / 8, stored * meta / 8

    def full_precision_bytes(
        self, kind: str, head_dim: int, num_tokens: int, batch_size: int, itemsize: int
    ) -> tuple[int, int]:
        """``(residual bytes, sink bytes)`` of one kv head's ``kind``: tokens kept in the model's dtype."""
        sink, _, residual = self.split(kind, num_tokens)
        per_token = batch_size * head_dim * itemsize
        return residual * per_token, sink * per_token

    def describe(self) -> str:
        sinks = f", {self.sink_tokens} sink token(s) at full precision" if self.sink_tokens else ""
        return f"{self.quantizer.name}, residual window {self.residual_length}{sinks}"

    def to_dict(self) -> dict:
        return {
            "quantizer": self.quantizer.to_config(),
            "residual_length": self.residual_length,
            "sink_tokens": self.sink_tokens,
        }


@dataclass(frozen=True, eq=False)
class KVQuantSpec:
    """Everything that decides what a quantized KV cache holds: widths ``bits [2, L, H]`` (kind 0 = key) of
    integers 1..8, the quantizer design, the residual window and the sink tokens (:class:`StoragePolicy`).

    Build it directly, from a plan (:meth:`ratequant.plan.Plan.resolve`), or with :meth:`uniform`.
    """

    bits: np.ndarray
    quantizer: Quantizer
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    sink_tokens: int = 0
    policy: StoragePolicy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits_array(self.bits))
        policy = StoragePolicy(self.quantizer, self.residual_length, self.sink_tokens)
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "residual_length", policy.residual_length)
        object.__setattr__(self, "sink_tokens", policy.sink_tokens)

    @classmethod
    def uniform(cls, bits: int, geometry: Geometry, quantizer: Quantizer, **policy) -> KVQuantSpec:
        """Every component at ``bits`` for a model of ``geometry``."""
        return cls(np.full(geometry.shape, int(bits)), quantizer, **policy)

    @property
    def num_layers(self) -> int:
        return self.bits.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.bits.shape[2]

    @property
    def avg_bits(self) -> float:
        return float(self.bits.mean())

    @property
    def chunks(self) -> tuple[int, int]:
        return self.policy.chunks

    def groups(self, kind: str, layer: int) -> list[tuple[int, tuple[int, ...]]]:
        """:func:`bit_groups` of ``layer``'s ``kind`` widths."""
        return bit_groups(self.bits[KINDS.index(kind), layer])

    def check_geometry(self, geometry: Geometry) -> None:
        """Raise :class:`PlanError` unless the widths cover ``geometry``'s layers and kv heads."""
        check_bits_array(self.bits, (geometry.num_layers, geometry.num_kv_heads), error=PlanError)

    def check_model(self, model) -> None:
        """:meth:`check_geometry` for ``model``, and refuse quantization chunks or sinks longer than its context
        (they could never be filled, and a chunk that long would be allocated for nothing)."""
        from ratequant.compat import max_positions, model_geometry

        self.check_geometry(model_geometry(model))
        limit = max_positions(model)
        longest = max(self.chunks) + self.sink_tokens
        if limit is not None and longest > limit:
            raise PlanError(
                f"{self.sink_tokens} sink tokens and quantization chunks of {max(self.chunks)} tokens exceed the "
                f"model's context of {limit} tokens; use a smaller residual window, group size or sink count"
            )

    def expected_bytes(
        self, head_dim: int, num_tokens: int, *, batch_size: int = 1, dtype: torch.dtype = torch.float16
    ) -> CacheBytes:
        """Bytes a :class:`ratequant.cache.RateQuantCache` holds after ``num_tokens`` tokens, by the byte formula.

        Row padding of packed codes makes the real cache hold a few bytes more (tested to stay within 1%).
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        codes = metadata = 0.0
        residual = sink = 0
        for k, kind in enumerate(KINDS):
            for b in self.bits[k].ravel():
                c, m = self.policy.component_bytes(kind, int(b), head_dim, num_tokens, batch_size)
                codes, metadata = codes + c, metadata + m
            r, s = self.policy.full_precision_bytes(kind, head_dim, num_tokens, batch_size, itemsize)
            residual, sink = residual + r * self.bits[k].size, sink + s * self.bits[k].size
        return CacheBytes(codes=int(round(codes)), metadata=int(round(metadata)), residual=residual, sink=sink)

    def to_dict(self) -> dict:
        """JSON form: widths per kind, then the policy."""
        return {"bits": {kind: self.bits[k].tolist() for k, kind in enumerate(KINDS)}, **self.policy.to_dict()}

    def __repr__(self) -> str:
        return (
            f"KVQuantSpec({self.quantizer.name}, {self.num_layers} layers x {self.num_kv_heads} kv heads, "
            f"mean {self.avg_bits:.3f} bits, residual {self.residual_length}, sinks {self.sink_tokens})"
        )


__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_RESIDUAL_LENGTH",
    "MAX_SINK_TOKENS",
    "CacheBytes",
    "KVQuantSpec",
    "StoragePolicy",
    "bit_groups",
]
