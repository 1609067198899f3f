"""One decode step of the whole model over fixed buffers, captured once into a CUDA graph and replayed per token.

Why: eager decoding launches several kernels per layer per token from Python, so on a GPU it is launch-bound (a
168 M DeltaNet takes about 14 ms per token at batch 8 and at batch 256 alike). A decode step has fixed shapes (token
ids ``[B, 1]`` in, logits ``[B, V]`` out, every layer's state ``[B, ...]`` updated), so it can be recorded once into
a ``torch.cuda.CUDAGraph`` and replayed with one launch per token.

A graph replays fixed memory addresses, so the step reads its input token ids and the state from static buffers and
overwrites the state *in place* (``copy_``) inside the captured region; :func:`decode_step` is exactly that function,
and :class:`StaticDecodeStep` runs it eagerly over the same buffers (any device; the CPU tests use it), while
:class:`GraphedDecodeStep` captures it. Sampling stays outside the graph in
:func:`refine_core.models.generation.generate` (it is cheap and uses Python-level options and generators).

Reuse: REFINE calls ``generate`` every training step with the same batch size, so captured graphs are kept in a
small LRU (:func:`graphed_decode_step`) keyed by the model, batch size, device, autocast dtype, the fla switch and
the starting cache's tensor shapes/dtypes. An entry is dropped when the model is gone or any parameter or buffer
moved (``data_ptr`` changed: ``.to()``, a reload that assigns new tensors); in-place weight updates (optimizer steps,
``load_state_dict``) are seen by the next replay because the graph reads the parameters' memory. Under autocast the
graph is captured with ``cache_enabled=False`` so the fp32 -> bf16 weight casts are part of the graph and re-read
the current weights at every replay (a cached cast would be stale after an optimizer step).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from refine_core.models.cache import FastWeightCache, LayerState
from refine_core.models.ops import fla_backend

# How many captured steps to keep (each holds its static state and one step's activations in a private pool).
MAX_CACHED_GRAPHS = 4
# Eager runs before capture: fla's Triton kernels autotune on their first call, which cannot happen during capture.
WARMUP_RUNS = 3

TensorSignature = tuple[tuple[int, ...], torch.dtype] | None
CacheSignature = tuple[tuple[TensorSignature, tuple[TensorSignature, ...] | None], ...]


def _tensor_signature(t: torch.Tensor | None) -> TensorSignature:
    return None if t is None else (tuple(t.shape), t.dtype)


def cache_signature(cache: FastWeightCache) -> CacheSignature:
    """Shapes and dtypes of every tensor of ``cache`` (``None`` where a state is absent): what a graph is built for."""
    return tuple(
        (
            _tensor_signature(layer.recurrent_state),
            None if layer.conv_states is None else tuple(_tensor_signature(c) for c in layer.conv_states),
        )
        for layer in cache.layers
    )


def _state_pairs(dst: FastWeightCache, src: FastWeightCache) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Matching ``(dst, src)`` tensors of two caches of one model; ``src`` may lack a state (an empty prefix)."""
    if len(dst.layers) != len(src.layers):
        raise ValueError(f"caches have {len(dst.layers)} and {len(src.layers)} layers")
    pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for d, s in zip(dst.layers, src.layers, strict=True):
        if d.recurrent_state is not None:
            pairs.append((d.recurrent_state, s.recurrent_state))
        elif s.recurrent_state is not None:
            raise ValueError("the source cache has a recurrent state where the destination has none")
        d_conv, s_conv = d.conv_states or (), s.conv_states or ()
        if s_conv and len(s_conv) != len(d_conv):
            raise ValueError(f"caches have {len(d_conv)} and {len(s_conv)} conv states in one layer")
        for i, dc in enumerate(d_conv):
            if dc is not None:
                pairs.append((dc, s_conv[i] if s_conv else None))
    return pairs


def copy_state_(dst: FastWeightCache, src: FastWeightCache) -> None:
    """Overwrite ``dst``'s tensors in place with ``src``'s (zeros where ``src`` has none, as the layers read None)."""
    for d, s in _state_pairs(dst, src):
        if s is None:
            d.zero_()
        else:
            d.copy_(s)


def decode_step(model: torch.nn.Module, ids: torch.Tensor, state: FastWeightCache) -> torch.Tensor:
    """Feed ``ids`` ``[B, 1]`` after ``state``, overwrite ``state``'s tensors in place with the state after them, and
    return the float ``[B, V]`` logits for the next token.

    This is the function a :class:`GraphedDecodeStep` captures; run eagerly it equals one step of the eager loop
    (``model(ids, cache=state, use_cache=True)``). ``state.seen_tokens`` is not advanced (a graph cannot update a
    Python int); the caller counts fed tokens.
    """
    require_static_decoding(model)
    out = model(ids, cache=state, use_cache=True)
    copy_state_(state, out.cache)
    return out.logits[:, -1].float()


def supports_static_decoding(model: object) -> bool:
    """Whether one decode step of ``model`` is a fixed computation over fixed buffers (DeltaNet, GatedDeltaNet).

    A LaCT step is not: where each row stands in its chunk and window is host data that decides, token by token,
    whether the fast weights update, so it decodes eagerly.
    """
    return bool(getattr(model, "static_decoding", True))


def require_static_decoding(model: object) -> None:
    if not supports_static_decoding(model):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NotImplementedError(
            f"{kind} has no static (CUDA-graph) decode step: its cache changes shape-dependent host state every "
            "token; decode eagerly (generate(..., cuda_graph=False) or None)"
        )


def _param_ptrs(model: torch.nn.Module) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _autocast(dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    # cache_enabled=False: the weight casts are recomputed (inside the graph) at every step, never taken from a cache
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype, cache_enabled=False)


class StaticDecodeStep:
    """:func:`decode_step` over static buffers (token ids, state, logits), run eagerly; any device.

    The buffers are allocated for the starting cache's shapes; their dtypes are the wider of the starting cache's
    and the step's output dtypes, so copying a state in and the step's new state back are both exact (e.g. a
    float32 conv cache from an fp32 prefill continuing under bf16 autocast).

    Args:
        model: the LM (held weakly: a cached step must not keep a deleted model alive).
        start: a cache of the batch to decode (only its shapes and dtypes are used here).
        batch: rows decoded at once.
        autocast_dtype: run the step under CUDA autocast with this dtype (``None``: no autocast).
    """

    def __init__(
        self, model: torch.nn.Module, start: FastWeightCache, batch: int, autocast_dtype: torch.dtype | None = None
    ) -> None:
        require_static_decoding(model)
        self._model_ref = weakref.ref(model)
        self._param_ptrs = _param_ptrs(model)
        self.batch = batch
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        with torch.no_grad(), _autocast(autocast_dtype):
            probe = model(self.ids, cache=start, use_cache=True).cache
        self.state = FastWeightCache(
            layers=[
                LayerState(
                    recurrent_state=self._buffer(s.recurrent_state, p.recurrent_state),
                    conv_states=None
                    if p.conv_states is None
                    else tuple(
                        self._buffer(sc, pc)
                        for sc, pc in zip(s.conv_states or (None,) * len(p.conv_states), p.conv_states, strict=True)
                    ),
                )
                for s, p in zip(start.layers, probe.layers, strict=True)
            ]
        )
        # The dtypes eager decoding would return (by static tensor), to hand back a cache identical to the eager one.
        self._out_dtypes = {id(d): d.dtype if s is None else s.dtype for d, s in _state_pairs(self.state, probe)}
        self.logits: torch.Tensor | None = None

    @staticmethod
    def _buffer(start: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor | None:
        if out is None:
            return None
        dtype = out.dtype if start is None else torch.promote_types(start.dtype, out.dtype)
        return torch.zeros(out.shape, dtype=dtype, device=out.device)

    @property
    def model(self) -> torch.nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model of this decode step has been deleted")
        return model

    def is_valid_for(self, model: torch.nn.Module) -> bool:
        """Same live model object, parameters and buffers at the same addresses as when the step was built."""
        return self._model_ref() is model and _param_ptrs(model) == self._param_ptrs

    def load(self, cache: FastWeightCache) -> None:
        """Copy ``cache`` (not modified) into the static state."""
        copy_state_(self.state, cache)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B]``: the static state advances one token; returns the static ``[B, V]`` float logits
        (overwritten by the next feed)."""
        self.ids.copy_(tokens[:, None])
        self._run()
        assert self.logits is not None
        return self.logits

    @torch.no_grad()
    def _run(self) -> None:
        with _autocast(self.autocast_dtype):
            self.logits = decode_step(self.model, self.ids, self.state)

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the static state, to roll back to with :meth:`restore`."""
        return [d.clone() for d, _ in _state_pairs(self.state, self.state)]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for (d, _), s in zip(_state_pairs(self.state, self.state), snapshot, strict=True):
            d.copy_(s)

    def cache(self, seen_tokens: int) -> FastWeightCache:
        """A copy of the static state as a :class:`FastWeightCache` in the dtypes eager decoding returns."""
        out = self.state.map(lambda t: t.to(self._out_dtypes[id(t)], copy=True))
        out.seen_tokens = seen_tokens
        return out


class GraphedDecodeStep(StaticDecodeStep):
    """:class:`StaticDecodeStep` captured into a ``torch.cuda.CUDAGraph``: each :meth:`feed` is one graph replay.

    The step is warmed up eagerly on a side stream first (fla's Triton kernels autotune on their first call, and
    autotuning cannot run under capture; PyTorch's CUDA-graph recipe). Warm-up and capture overwrite the static
    state; :meth:`load` the starting cache afterwards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        start: FastWeightCache,
        batch: int,
        autocast_dtype: torch.dtype | None = None,
        warmup: int = WARMUP_RUNS,
    ) -> None:
        super().__init__(model, start, batch, autocast_dtype)
        if self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a model on a CUDA device, not {self.device}")
        self.load(start)  # realistic values for the warm-up runs
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                super()._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a DataLoader pinning memory) must not invalidate the capture
        capture = torch.cuda.graph(self.graph, capture_error_mode="thread_local")
        with torch.no_grad(), capture, _autocast(autocast_dtype):
            self.logits = decode_step(self.model, self.ids, self.state)

    def _run(self) -> None:
        self.graph.replay()


_GRAPHS: OrderedDict[tuple[Any, ...], GraphedDecodeStep] = OrderedDict()


def graphed_decode_step(
    model: torch.nn.Module, batch: int, start: FastWeightCache, autocast_dtype: torch.dtype | None
) -> GraphedDecodeStep:
    """The captured decode step for this model, batch and starting cache layout: from the LRU, else captured now.

    The key is ``(id(model), batch, device, autocast_dtype, fla enabled, cache_signature(start))``; an entry whose
    model died or whose parameters/buffers moved is dropped and recaptured. The fla switch is in the key because
    :func:`refine_core.models.ops.fla_backend.disabled` changes which kernels a capture records.
    """
    device = next(model.parameters()).device
    key = (id(model), batch, device, autocast_dtype, fla_backend.fla_enabled(), cache_signature(start))
    for k in [k for k, step in _GRAPHS.items() if step._model_ref() is None]:
        del _GRAPHS[k]
    step = _GRAPHS.get(key)
    if step is not None and not step.is_valid_for(model):
        del _GRAPHS[key]
        step = None
    if step is None:
        step = GraphedDecodeStep(model, start, batch, autocast_dtype)
        _GRAPHS[key] = step
        while len(_GRAPHS) > MAX_CACHED_GRAPHS:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    return step


def clear_decode_graphs() -> None:
    """Drop every cached graph (frees their static states and memory pools)."""
    _GRAPHS.clear()
