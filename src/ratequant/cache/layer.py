"""A mixed-precision, bit-packed KV cache for transformers' ``generate``.

:class:`RateQuantCache` is a ``transformers`` :class:`~transformers.Cache` made of one
:class:`RateQuantLayer` per decoder layer (the library's intended extension point: a new cache is a new layer
class). Every kv-head's keys and values have their own bit width; within a layer, the heads that share a
width (separately for keys and values) are quantized and stored together (:mod:`ratequant.cache.storage`).

Token policy: the rule of :mod:`ratequant.spec`, which :mod:`ratequant.cache.simulate` reproduces for whole
sequences. Positions are cache indices ``0, 1, ...`` (left padding included). The first ``sink_tokens``
tokens stay in the model's dtype for good; after them tokens are quantized in aligned chunks of ``F`` tokens,
each chunk exactly once, right after the forward pass that delivered its last token, and its stored codes are
never touched again (Hugging Face's ``QuantizedCache`` instead re-quantizes the whole cache whenever its
residual fills, compounding error). Until then the chunk's tokens sit at full precision in the residual
window, so the residual holds at most ``F`` tokens. Consequences:

* Decoding one token at a time, the query at position ``t`` sees key/value ``j`` quantized iff
  ``s0 <= j < s1(t)`` (:meth:`ratequant.spec.StoragePolicy.quantized_end`): its own chunk and the sinks at
  full precision, every earlier chunk as stored.
* A forward pass of several new tokens (prefill) sees the tokens stored before it as stored and its own
  new tokens at full precision (the convention of KIVI and of ``QuantizedCache``). Feeding a prompt in
  pieces of ``F`` tokens aligned after the sinks gives exactly the token-by-token result above.
* The quantized value of a token depends only on its chunk, so it is deterministic: streaming and
  :func:`ratequant.cache.simulate.simulated_quantization` agree to floating-point tolerance.

Padding. Left-padded positions hold the keys/values the model computed for the pad token (finite numbers,
masked out of attention). They are quantized like any token; with per-token designs they affect nothing
else, with token-grouped designs (KIVI keys) they share a group's range with real tokens of the same chunk.

Reads. Each update returns keys and values ``[batch, kv_heads, seq, head_dim]`` in head order and in the
model's dtype: the sinks, all stored chunks decoded straight into that output by one prepared decoder per
bit group (:meth:`Quantizer.prepare_decode`: the native kernel of :mod:`ratequant.kernels.native` for min-max designs
on the CPU), then the residual. No dequantized copy is kept between steps unless ``buffer_bytes`` asks for one
(it costs full-precision memory). Where the attention reads the stores itself (a cache made with ``model=``,
which routes that model's attention, or inside :func:`ratequant.cache.attention.packed_attention`) updates
return handles instead: short passes attend from the packed codes without decoding the history, long ones
(prefill pieces, a whole prompt) decode one block of it at a time.

Memory of a prompt in one pass (a plain ``model.generate``): each layer's keys and values of the pass are
quantized right after that layer's update, so the float history of all layers never exists; the pass does hold
its own activations (``T`` tokens of hidden states and MLP) and one layer's ``T`` keys and values at a time. Pass
``prefill_chunk_size=P`` to ``generate`` (or use :func:`ratequant.cache.prefill.prefill`, whose pieces follow the
token rule exactly) to bound those to ``P`` tokens.

Sliding-window layers (Mistral with ``sliding_window``, Gemma2/3) keep their whole history here and the
attention mask applies the window, which is correct; memory then grows like a full-attention layer (the
byte formula counts every token, so it still matches).

One module of this size because the cache and its layer implement one transformers interface together.

One module of this size because the cache and its layers share one token policy and one update path.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch

from ratequant.cache.attention import (
    ATTENTION_PATHS,
    MAX_QUERY,
    packed_handle,
    reads_handles,
    reads_in_blocks,
    route_packed,
)
from ratequant.cache.storage import KindStore
from ratequant.compat import cache_base_classes
from ratequant.errors import PlanError, RateQuantError
from ratequant.spec import CacheBytes, KVQuantSpec, StoragePolicy
from ratequant.validation import check_bits_array, check_float, check_int

Cache, CacheLayerMixin = cache_base_classes()


class RateQuantLayer(CacheLayerMixin):
    """One decoder layer's mixed-precision KV cache.

    Args:
        key_bits, value_bits: bit width (1..8) of each kv-head's keys / values, length ``num_kv_heads``.
        policy: the design, sink tokens and residual window (:class:`ratequant.spec.StoragePolicy`).
        growth: extra capacity reserved when a packed store grows (0 = exact size).
        buffer_bytes: byte limit of this layer's optional working buffer of dequantized stored chunks
            (default 0: none). Half goes to keys, half to values; each holds the dequantized values of its
            first stored chunks, as many as fit, so those are copied instead of decoded on every step. It is
            full-precision memory, reported as :attr:`CacheBytes.buffer`.

    ``update`` returns keys/values ``[batch, kv_heads, seq, head_dim]`` in head order and the model's dtype, or
    empty handles to the stores where :attr:`attend_packed` is set and the attention of the bound module
    (:meth:`bind`) reads them in the calling thread (:func:`ratequant.cache.attention.reads_handles`).
    All tensors live on the device of the first ``update`` (so models spread with ``device_map`` work).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False  # crop into a stored chunk cannot restore the tokens' full-precision values

    def __init__(
        self,
        key_bits: Sequence[int],
        value_bits: Sequence[int],
        policy: StoragePolicy,
        *,
        growth: float = 0.0,
        buffer_bytes: int = 0,
    ):
        super().__init__()
        if not isinstance(policy, StoragePolicy):
            raise RateQuantError(f"policy must be a StoragePolicy, got {type(policy).__name__}")
        if len(key_bits) != len(value_bits) or len(key_bits) == 0:
            raise RateQuantError(
                f"key_bits and value_bits must give one width per kv-head, got {len(key_bits)} and {len(value_bits)}"
            )
        self.growth = check_float(growth, "growth", lo=0.0, hi=4.0)
        self.buffer_bytes = check_int(buffer_bytes, "buffer_bytes (0 = no working buffer)", lo=0)
        check_bits_array([[list(key_bits)], [list(value_bits)]])
        self.policy = policy
        self.key_bits = tuple(int(b) for b in key_bits)
        self.value_bits = tuple(int(b) for b in value_bits)
        self.cumulative_length = 0
        self.lossy_crop = False
        self.attend_packed = False  # may hand packed handles over (a cache routed for its model, packed_attention)
        self._module: weakref.ref | None = None  # the attention module this layer feeds (bind)
        self._make_stores()

    @property
    def quantizer(self):
        return self.policy.quantizer

    @property
    def attention_module(self) -> torch.nn.Module | None:
        """The attention module this layer feeds (held weakly), None when unbound or gone."""
        return None if self._module is None else self._module()

    def bind(self, module: torch.nn.Module | None) -> None:
        """Feed ``module`` (the model's attention of this layer): whether its attention reads packed handles is
        asked of it at every update."""
        self._module = None if module is None else weakref.ref(module)

    def _make_stores(self) -> None:
        self._stores = (
            KindStore(self.key_bits, "key", self.policy, self.growth, self.buffer_bytes // 2),
            KindStore(self.value_bits, "value", self.policy, self.growth, self.buffer_bytes // 2),
        )

    def __repr__(self) -> str:
        return (
            f"RateQuantLayer(key_bits={list(self.key_bits)}, value_bits={list(self.value_bits)}, "
            f"{self.policy.describe()}, seq_len={self.cumulative_length})"
        )

    # -- transformers CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise RateQuantError(
                f"expected keys and values of equal shape [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        b, h, _, d = key_states.shape
        if h != len(self.key_bits):
            raise PlanError(
                f"the model gives {h} kv-heads for this layer but the bit widths name {len(self.key_bits)}; "
                "use a plan made for this model"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.head_dim = b, d
        for store in self._stores:
            store.initialise(b, d, self.dtype, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, T, D]`` keys/values; return all keys/values ``[B, H, S, D]`` for attention (or the
        packed handles, see the class docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        expected = (self.batch_size, len(self.key_bits), self.head_dim)
        if (b, h, d) != expected or value_states.shape != key_states.shape:
            raise RateQuantError(
                f"update of shape {tuple(key_states.shape)} / {tuple(value_states.shape)} does not fit this cache "
                f"layer (batch {self.batch_size}, {len(self.key_bits)} kv-heads, head_dim {self.head_dim}); "
                "call reset() before reusing the cache for another batch"
            )
        key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        if not bool(torch.isfinite(key_states).all() & torch.isfinite(value_states).all()):  # one sync, not two
            raise RateQuantError(
                f"keys or values hold NaN or Inf in the cache's dtype ({str(self.dtype).removeprefix('torch.')}); "
                "KV tensors must be finite to quantize (this update was refused and the cache is unchanged; a "
                "float16 model may overflow: try bfloat16 or float32)"
            )
        if self._hands_over(t):
            # the attention reads the stores' packed codes itself (ratequant.cache.attention)
            views = [store.append(x) for store, x in zip(self._stores, (key_states, value_states))]
            out = packed_handle(views[0], key_states), packed_handle(views[1], value_states)
        else:
            out = self._stores[0].update(key_states), self._stores[1].update(value_states)
        self.cumulative_length += t
        return out

    def _hands_over(self, tokens: int) -> bool:
        """Whether this update returns handles: the layer may, the bound module's attention reads them in this
        thread now, and the stores suit a pass of ``tokens`` tokens (:meth:`_reads_from_codes`)."""
        if not self.attend_packed:
            return False
        module = self.attention_module
        return module is not None and reads_handles(module) and self._reads_from_codes(tokens)

    def _reads_from_codes(self, tokens: int) -> bool:
        """Whether attention over a pass of ``tokens`` new tokens reads the stores itself: short passes where
        the native kernel serves every store, long ones (prefill pieces) block by block on the CPU. Both compute
        in float32, so float64 models (exact checks) keep the decode path."""
        if self.dtype == torch.float64:
            return False
        if tokens <= MAX_QUERY:
            return all(store.reads_packed() for store in self._stores)
        return reads_in_blocks(self.device)

    def reserve(self, tokens: int) -> None:
        """See :meth:`RateQuantCache.reserve`."""
        tokens = check_int(tokens, "tokens to reserve", lo=0)
        for store in self._stores:
            store.reserve(tokens)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop all stored data (memory released); the layer re-initialises on the next update."""
        self.cumulative_length = 0
        self.lossy_crop = False
        self.is_initialized = False
        self._make_stores()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as transformers passes it).

        Cropping inside the residual window is exact. Cropping into a stored chunk puts the chunk's
        surviving tokens back in the residual as their dequantized values (what attention saw); they are
        quantized again when the chunk refills, and :attr:`lossy_crop` becomes True.
        """
        if tokens_to_remove > 0:
            raise RateQuantError(
                f"crop takes a negative count of tokens to remove, got {tokens_to_remove}; "
                "use crop(-n) to drop the last n tokens"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = max(0, self.cumulative_length + tokens_to_remove)
        for store in self._stores:
            self.lossy_crop |= store.crop(length)
        self.cumulative_length = length

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            for store in self._stores:
                store.map_batch(fn)
            self.batch_size = self._stores[0].residual.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows of every stored tensor (lossless: codes move, no re-quantizing)."""
        idx = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._map_batch(lambda t, dim: t.index_select(dim, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows ``indices`` (integer indices or a boolean mask)."""
        if not self.is_initialized:
            return
        idx = torch.as_tensor(indices, device=self.device)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long().flatten()
        self._map_batch(lambda t, dim: t.index_select(dim, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def offload(self) -> None:
        if self.is_initialized:
            for store in self._stores:
                store.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            for store in self._stores:
                store.to(self.device)

    # -- ratequant ---------------------------------------------------------------------------------------
    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values attention would see now ``[B, H, S, D]`` (without adding tokens)."""
        if not self.is_initialized:
            raise RateQuantError("the cache layer is empty")
        return self._stores[0].read(), self._stores[1].read()

    def stored_lengths(self) -> tuple[int, int]:
        """Tokens held quantized for (keys, values); the rest are sink tokens or in the residual window."""
        return self._stores[0].stored_len, self._stores[1].stored_len

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (residual buffers, packed codes, metadata)."""
        return [t for store in self._stores for t in store.tensors()]

    def nbytes(self) -> CacheBytes:
        """Real allocated bytes of this layer, split into codes, metadata and residual."""
        return self._stores[0].nbytes() + self._stores[1].nbytes()


class RateQuantCache(Cache):
    """Mixed-precision bit-packed KV cache: one :class:`RateQuantLayer` per layer, as ``spec`` says.

    Args:
        spec: widths, design, residual window and sink tokens (:class:`ratequant.spec.KVQuantSpec`).
        model: when given, the spec is checked against the model's layers and kv heads now, not at first use,
            and (with ``attention="packed"``) the model's attention is routed to read this cache's stores.
        growth: extra capacity reserved when a packed store grows (default 0: exact size).
        buffer_bytes: byte limit of an optional working buffer of dequantized chunks, split evenly over the
            layers (default 0: none, the packed store is decoded on every step). A buffer trades memory for
            decode speed and is counted in :meth:`nbytes` as ``buffer``.
        attention: ``"packed"`` (default) or ``"decode"``, how a cache made with ``model`` attends (below).

    Use ``model.generate(..., cache=RateQuantCache(spec, model=model))`` (``past_key_values=`` before
    transformers 5.24; :func:`ratequant.compat.cache_argument` picks the keyword) or :meth:`from_plan`. Works with
    greedy and sampled decoding, beam search, batches with padding, ``crop`` and ``reset``.

    Attention. Made with ``model`` and ``attention="packed"``, the cache switches that model's attention
    implementation name to a ratequant dispatcher (``ratequant_sdpa`` for ``sdpa``; once per model, for every
    thread, until :func:`ratequant.cache.restore_attention`): in any plain forward or ``generate`` with this
    cache, decode steps then attend straight from the packed codes where the native kernel serves the design (the
    min-max designs on the CPU) and prompt passes block by block on the CPU; elsewhere, and for float64 models,
    the history is decoded as with ``"decode"``. Calls with any other cache or none run the model's own
    implementation with the same arguments, so their results are exactly what they were. ``"decode"``, or no
    ``model``, decodes the history on every step (:func:`ratequant.cache.packed_attention` still switches such a
    cache to the packed path for a ``with`` block). The two paths agree to float32 rounding.
    """

    def __init__(
        self,
        spec: KVQuantSpec,
        *,
        model=None,
        growth: float = 0.0,
        buffer_bytes: int = 0,
        attention: str = "packed",
    ):
        if not isinstance(spec, KVQuantSpec):
            raise RateQuantError(
                "RateQuantCache needs a KVQuantSpec (ratequant.KVQuantSpec(bits, quantizer, ...)), "
                f"got {type(spec).__name__}"
            )
        if attention not in ATTENTION_PATHS:
            raise RateQuantError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {attention!r}")
        if model is not None:
            spec.check_model(model)
        per_layer = check_int(buffer_bytes, "buffer_bytes (0 = no working buffer)", lo=0) // spec.num_layers
        layers = [
            RateQuantLayer(spec.bits[0, i], spec.bits[1, i], spec.policy, growth=growth, buffer_bytes=per_layer)
            for i in range(spec.num_layers)
        ]
        super().__init__(layers=layers)
        self.spec = spec
        modules = route_packed(model) if model is not None and attention == "packed" else None
        for layer, module in zip(layers, modules or ()):
            layer.bind(module)
            layer.attend_packed = True

    @classmethod
    def from_plan(
        cls,
        plan,
        model,
        quantizer=None,
        *,
        residual_length: int | None = None,
        sink_tokens: int | None = None,
        allow_mismatch: bool = False,
        growth: float = 0.0,
        buffer_bytes: int = 0,
        attention: str = "packed",
    ) -> RateQuantCache:
        """A cache for ``model`` following ``plan``: a :class:`ratequant.plan.Plan` or the path of its JSON file
        (see :meth:`Plan.resolve` for the other arguments). Made with the model: see the class docstring for
        ``attention``."""
        if isinstance(plan, (str, os.PathLike)):
            from ratequant.plan import Plan

            plan = Plan.load(plan)
        spec = plan.resolve(
            model, quantizer, residual_length=residual_length, sink_tokens=sink_tokens, allow_mismatch=allow_mismatch
        )
        return cls(spec, model=model, growth=growth, buffer_bytes=buffer_bytes, attention=attention)

    @property
    def quantizer(self):
        return self.spec.quantizer

    @property
    def bits(self):
        return self.spec.bits

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise PlanError(
                f"the model updates layer {layer_idx} but this cache's spec has {len(self.layers)} layers; use a "
                "plan made for this model"
            )
        if layer_idx == 0 and self.layers[0].get_seq_length() != self.layers[-1].get_seq_length():
            raise PlanError(
                f"the model's last forward pass did not reach layer {len(self.layers) - 1} of this cache: the model "
                f"has fewer layers than the spec's {len(self.layers)}; use a plan made for this model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def __repr__(self) -> str:
        return f"RateQuantCache({self.spec!r}, seq_len={self.get_seq_length()})"

    def reserve(self, tokens: int) -> None:
        """Allocate the packed stores for a sequence of ``tokens`` tokens in all (cached ones included) when they
        next grow, instead of growing chunk by chunk: :func:`ratequant.cache.prefill.prefill` calls it for the prompt.
        Growing a store copies it, and the freed smaller copies stay in the process's heap; a long prompt in
        pieces would otherwise leave dozens of them. Until filled, the reserved chunks are real memory, counted
        in :meth:`nbytes`; after the prompt they are exactly the stored chunks."""
        for layer in self.layers:
            layer.reserve(tokens)

    def nbytes(self) -> CacheBytes:
        """Real allocated bytes of the whole cache, split into codes, metadata, residual and sink tokens."""
        total = CacheBytes()
        for layer in self.layers:
            total = total + layer.nbytes()
        return total

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds."""
        return [t for layer in self.layers for t in layer.tensors()]

    @property
    def lossy_crop(self) -> bool:
        """True when a ``crop`` cut into stored chunks since the last ``reset``."""
        return any(layer.lossy_crop for layer in self.layers)


__all__ = ["RateQuantCache", "RateQuantLayer"]
