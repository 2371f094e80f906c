"""Calibration capture: keys, values, queries and loss gradients of every attention layer.

:func:`capture` runs one forward pass (and, for sensitivity statistics, one backward pass) of a Hugging Face
decoder model on calibration tokens and returns :class:`CalibrationStats`: per layer the keys and values
exactly as the KV cache would store them (after RoPE, before ``repeat_kv``), the queries, and the gradients
of the next-token cross-entropy with respect to keys and values. Those gradients give the diagonal
Fisher / gradient-weighted distortion of RateQuant's distortion model (and of KVQuant, Hooper et al., 2024).

:class:`Recorder` is the context-manager form for callers that run the model themselves. Both go through
:func:`ratequant.compat.intercept_attention`, so every hook and patch is removed on exit, also on error.

One module of this size because the forward and backward hooks, their bookkeeping and the statistics they fill
are one pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from ratequant.compat import check_supported, intercept_attention, model_geometry, original_attention
from ratequant.compat.placement import input_device
from ratequant.errors import RateQuantError
from ratequant.geometry import Geometry

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits [B, T, V], input_ids [B, T], attention_mask [B, T] bool) -> scalar``."""


@dataclass(frozen=True)
class CalibrationStats:
    """What one calibration pass recorded, stacked over layers; all float32, detached, on CPU or the model's device.

    Shapes (``L`` layers, ``B`` sequences, ``T`` tokens, ``Hkv`` kv heads, ``Hq`` query heads, ``D`` head dim):

    * ``keys``, ``values``: ``[L, B, Hkv, T, D]``, as the cache stores them (after RoPE, before repeat_kv).
    * ``queries``: ``[L, B, Hq, T, D]`` (after RoPE) or None.
    * ``key_grads``, ``value_grads``: ``[L, B, Hkv, T, D]`` or None: the gradient of the *summed* next-token
      cross-entropy over every valid predicted token of the batch (``loss_sum``). Each token's loss counts
      once whatever the batch size; divide by ``token_count`` for per-token averages.
    * ``attention_mask``: ``[B, T]`` bool, True for real tokens. Padded positions hold zeros in every tensor.
    * ``token_count``: number of real tokens (``attention_mask.sum()``).
    * ``loss_sum`` / ``loss_tokens``: the summed loss and how many predicted tokens it covers (None/0 without
      gradients).
    * ``scalings``: per layer, the softmax scale the model applies to ``q . k`` (usually ``D ** -0.5``).
    * ``sliding_windows``: per layer, the attention window in tokens, or None for full attention.
    * ``timings``: seconds per phase (``forward``, ``backward``, ``collect``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    attention_mask: torch.Tensor
    geometry: Geometry
    queries: torch.Tensor | None = None
    key_grads: torch.Tensor | None = None
    value_grads: torch.Tensor | None = None
    loss_sum: float | None = None
    loss_tokens: int = 0
    scalings: tuple[float, ...] | None = None
    sliding_windows: tuple[int | None, ...] | None = None
    timings: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        g = self.geometry
        if not isinstance(self.keys, torch.Tensor) or self.keys.dim() != 5:
            raise RateQuantError(f"calibration keys must be [L, B, Hkv, T, D], got {_shape(self.keys)}")
        L, B, H, T, D = self.keys.shape
        if (g.num_layers, g.num_kv_heads, g.head_dim) != (L, H, D):
            raise RateQuantError(
                f"calibration keys {tuple(self.keys.shape)} do not match geometry "
                f"(layers={g.num_layers}, kv_heads={g.num_kv_heads}, head_dim={g.head_dim})"
            )
        for name in ("values", "key_grads", "value_grads"):
            t = getattr(self, name)
            if (t is not None or name == "values") and (not isinstance(t, torch.Tensor) or t.shape != self.keys.shape):
                raise RateQuantError(
                    f"calibration {name} must have the keys' shape {tuple(self.keys.shape)}, got {_shape(t)}"
                )
        if (self.key_grads is None) != (self.value_grads is None):
            raise RateQuantError("calibration stats need both key_grads and value_grads, or neither")
        if self.queries is not None:
            hq = g.num_heads or self.queries.shape[2]
            if tuple(self.queries.shape) != (L, B, hq, T, D):
                raise RateQuantError(f"calibration queries must be {(L, B, hq, T, D)}, got {_shape(self.queries)}")
        m = self.attention_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (B, T):
            raise RateQuantError(f"attention_mask must be a bool tensor of shape {(B, T)}, got {_shape(m)}")
        if self.token_count < 1:
            raise RateQuantError("calibration data holds no real tokens (the attention mask is all padding)")
        for name in ("scalings", "sliding_windows"):
            per_layer = getattr(self, name)
            if per_layer is not None and len(per_layer) != L:
                raise RateQuantError(f"calibration {name} must have one entry per layer ({L}), got {len(per_layer)}")
        if not isinstance(self.timings, MappingProxyType):
            object.__setattr__(self, "timings", MappingProxyType(dict(self.timings)))

    @property
    def token_count(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def has_gradients(self) -> bool:
        return self.key_grads is not None

    def tensor(self, kind: str) -> torch.Tensor:
        """``keys`` or ``values`` by kind name ("key"/"value")."""
        return {"key": self.keys, "value": self.values}[kind]

    def grads(self, kind: str) -> torch.Tensor | None:
        """``key_grads`` or ``value_grads`` by kind name."""
        return {"key": self.key_grads, "value": self.value_grads}[kind]

    @classmethod
    def concat(cls, parts: list[CalibrationStats]) -> CalibrationStats:
        """The stats of several passes over disjoint sequences as one, sequences in order (timings summed).

        Exact: each sequence's keys, values, queries and loss gradients depend on that sequence only.
        """
        if not parts:
            raise RateQuantError("concat needs at least one CalibrationStats")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        for p in parts[1:]:
            same = (p.geometry, p.scalings, p.sliding_windows) == (
                first.geometry,
                first.scalings,
                first.sliding_windows,
            )
            kinds = (p.queries is None, p.key_grads is None) == (first.queries is None, first.key_grads is None)
            if not (same and kinds and p.keys.shape[3] == first.keys.shape[3]):
                raise RateQuantError("concat: the passes differ in model, token count or what they recorded")

        def cat(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors, dim=1)

        timings: dict[str, float] = {}
        for p in parts:
            for k, v in p.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        return cls(
            keys=cat("keys"),
            values=cat("values"),
            queries=cat("queries"),
            key_grads=cat("key_grads"),
            value_grads=cat("value_grads"),
            attention_mask=torch.cat([p.attention_mask for p in parts]),
            geometry=first.geometry,
            loss_sum=None if first.loss_sum is None else sum(p.loss_sum for p in parts),
            loss_tokens=sum(p.loss_tokens for p in parts),
            scalings=first.scalings,
            sliding_windows=first.sliding_windows,
            timings=MappingProxyType(timings),
        )


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def next_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting token ``t+1`` from position ``t`` where both are real tokens."""
    valid = attention_mask[:, 1:] & attention_mask[:, :-1]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (nll * valid).sum()


class Recorder:
    """Context manager recording queries, keys and values of every attention layer while the model runs.

    ``with Recorder(model) as rec: model(input_ids, attention_mask=mask)`` and then
    ``rec.stats(attention_mask=mask)``. With ``gradients=True`` the recorded keys and values stay attached
    to the autograd graph (parameters are frozen for the duration, inputs made differentiable), and
    ``rec.stats(attention_mask=mask, loss=loss)`` computes their gradients with one backward pass.
    Every patch (attention routing, embedding hook, ``requires_grad`` flags) is undone on exit.
    Each forward pass is recorded; :meth:`stats` concatenates passes of equal length along the batch.
    """

    def __init__(self, model: nn.Module, *, queries: bool = True, gradients: bool = False):
        check_supported(model)
        self.model = model
        self.geometry = model_geometry(model)
        self.record_queries = queries
        self.gradients = gradients
        self._passes: list[dict[int, tuple]] = []
        self._scalings: dict[int, float] = {}
        self._windows: dict[int, int | None] = {}
        self._stack: ExitStack | None = None

    # -- context --------------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self._passes = []
        stack = ExitStack()
        try:
            if self.gradients:
                params = [p for p in self.model.parameters() if p.requires_grad]
                for p in params:
                    p.requires_grad_(False)
                stack.callback(lambda: [p.requires_grad_(True) for p in params])
                emb = self.model.get_input_embeddings()
                handle = emb.register_forward_hook(_make_differentiable)
                stack.callback(handle.remove)
            stack.enter_context(intercept_attention(self.model, self._attention))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        if not self._passes or layer in self._passes[-1]:
            self._passes.append({})
        if self.gradients and torch.is_grad_enabled():
            record = (query.detach() if self.record_queries else None, key, value)
        else:
            record = (query.detach() if self.record_queries else None, key.detach(), value.detach())
        self._passes[-1][layer] = record
        scaling = kwargs.get("scaling")
        self._scalings[layer] = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        window = kwargs.get("sliding_window")
        self._windows[layer] = int(window) if window else None
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    # -- results --------------------------------------------------------------------------------------
    @property
    def num_passes(self) -> int:
        return len(self._passes)

    def stats(
        self, attention_mask: torch.Tensor | None = None, loss: torch.Tensor | None = None, *, loss_tokens: int = 0
    ) -> CalibrationStats:
        """Stack the recorded passes into :class:`CalibrationStats`.

        ``attention_mask`` ``[B, T]`` (all passes concatenated along the batch; None = no padding).
        ``loss``: a scalar computed from this recorder's passes; its gradients w.r.t. every recorded key and
        value are taken with ``torch.autograd.grad`` (needs ``gradients=True``).
        """
        if not self._passes:
            raise RateQuantError("the recorder saw no forward pass; call the model inside the `with` block")
        L = self.geometry.num_layers
        for i, rec in enumerate(self._passes):
            if sorted(rec) != list(range(L)):
                raise RateQuantError(f"forward pass {i} recorded layers {sorted(rec)}, expected 0..{L - 1}")
        lengths = {rec[0][1].shape[2] for rec in self._passes}
        if len(lengths) != 1:
            raise RateQuantError(f"recorded passes have different lengths {sorted(lengths)}; pad them to one length")
        timings = {}
        key_grads = value_grads = None
        loss_value = None
        if loss is not None:
            if not self.gradients:
                raise RateQuantError("gradients were not recorded; create the Recorder with gradients=True")
            t0 = time.perf_counter()
            ks = [rec[layer][1] for rec in self._passes for layer in range(L)]
            vs = [rec[layer][2] for rec in self._passes for layer in range(L)]
            if not all(t.requires_grad for t in ks + vs):
                raise RateQuantError(
                    "recorded keys/values are not attached to the graph; run the model with grad enabled"
                )
            grads = torch.autograd.grad(loss, ks + vs, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, ks + vs)]
            key_grads = _stack_layers(grads[: len(ks)], L)
            value_grads = _stack_layers(grads[len(ks) :], L)
            loss_value = float(loss.detach())
            timings["backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        keys = _stack_layers([rec[layer][1] for rec in self._passes for layer in range(L)], L)
        values = _stack_layers([rec[layer][2] for rec in self._passes for layer in range(L)], L)
        queries = None
        if self.record_queries:
            queries = _stack_layers([rec[layer][0] for rec in self._passes for layer in range(L)], L)
        B, T = keys.shape[1], keys.shape[3]
        if attention_mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=keys.device)
        else:
            mask = attention_mask.to(device=keys.device, dtype=torch.bool)
            if tuple(mask.shape) != (B, T):
                raise RateQuantError(
                    f"attention_mask must have shape {(B, T)} (batch, tokens), got {tuple(mask.shape)}"
                )
        keep = mask[None, :, None, :, None]
        tensors = [t if t is None else t * keep for t in (keys, values, queries, key_grads, value_grads)]
        timings["collect"] = time.perf_counter() - t0
        return CalibrationStats(
            keys=tensors[0],
            values=tensors[1],
            queries=tensors[2],
            key_grads=tensors[3],
            value_grads=tensors[4],
            attention_mask=mask,
            geometry=self.geometry,
            loss_sum=loss_value,
            loss_tokens=loss_tokens,
            scalings=tuple(self._scalings[layer] for layer in range(L)),
            sliding_windows=tuple(self._windows[layer] for layer in range(L)),
            timings=timings,
        )


def _make_differentiable(module, inputs, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


def _stack_layers(tensors: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    """Per-(pass, layer) tensors ``[B_i, H, T, D]`` -> ``[L, sum B_i, H, T, D]`` float32, detached, on the first
    layer's device (a model spread over devices records each layer where it runs)."""
    per_pass = [tensors[i : i + num_layers] for i in range(0, len(tensors), num_layers)]
    layers = [torch.cat([p[layer] for p in per_pass], dim=0) for layer in range(num_layers)]
    device = layers[0].device
    return torch.stack([t.detach().to(device=device, dtype=torch.float32) for t in layers])


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gradients: bool = True,
    queries: bool = True,
    loss: str | LossFn = "next-token",
    batch_size: int | None = None,
) -> CalibrationStats:
    """Run ``model`` on ``input_ids`` ``[B, T]`` and return its :class:`CalibrationStats`.

    ``gradients=True`` adds one backward pass of ``loss`` (default: the next-token cross-entropy summed over
    every real predicted token) to get ``d loss / d keys`` and ``d loss / d values``; parameter gradients
    are not computed. The model runs in eval mode without a cache; its training flag, ``requires_grad``
    flags and attention setup are restored afterwards. Padding (``attention_mask == 0``) contributes
    nothing: those positions are zero in every recorded tensor and excluded from the loss.

    ``batch_size`` (default: all ``B`` at once) runs the sequences in passes of that many and concatenates
    the results (:meth:`CalibrationStats.concat`, exact for a per-sequence loss such as the default): the
    activations the backward pass keeps shrink with it, so a smaller batch needs less memory (and, on a
    CPU, less time spent first touching it).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise RateQuantError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    integer = isinstance(input_ids, torch.Tensor) and input_ids.dtype in (torch.int64, torch.int32)
    if not integer or input_ids.dim() != 2:
        raise RateQuantError(f"input_ids must be an integer tensor [batch, tokens], got {_shape(input_ids)}")
    if input_ids.shape[1] < 2 and gradients:
        raise RateQuantError("need at least 2 tokens per sequence for a next-token loss")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise RateQuantError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        mask = attention_mask.to(torch.bool)
    if loss == "next-token":
        loss_fn: LossFn = next_token_loss_sum
    elif callable(loss):
        loss_fn = loss
    else:
        raise RateQuantError(f"loss must be 'next-token' or a callable(logits, input_ids, mask), got {loss!r}")
    if batch_size is not None and input_ids.shape[0] > batch_size:
        return CalibrationStats.concat(
            [
                capture(
                    model,
                    input_ids[i : i + batch_size],
                    mask[i : i + batch_size],
                    gradients=gradients,
                    queries=queries,
                    loss=loss,
                )
                for i in range(0, input_ids.shape[0], batch_size)
            ]
        )
    device = input_device(model)
    input_ids, mask = input_ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    try:
        with Recorder(model, queries=queries, gradients=gradients) as rec, torch.set_grad_enabled(gradients):
            t0 = time.perf_counter()
            # positions count real tokens only, so left padding does not shift RoPE
            position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)
            out = model(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids, use_cache=False)
            forward_s = time.perf_counter() - t0
            loss_value = loss_fn(out.logits, input_ids, mask) if gradients else None
            del out
            tokens = int((mask[:, 1:] & mask[:, :-1]).sum()) if gradients else 0
            stats = rec.stats(attention_mask=mask, loss=loss_value, loss_tokens=tokens)
    finally:
        model.train(was_training)
    timings = {"forward": forward_s, **stats.timings}
    object.__setattr__(stats, "timings", MappingProxyType(timings))
    return stats


__all__ = ["CalibrationStats", "LossFn", "Recorder", "capture", "next_token_loss_sum"]
