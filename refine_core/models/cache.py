"""The recurrent state of a fast-weight LM: what a prefix has written into the fast weights.

For DeltaNet-style layers the whole past is summarised by a fixed-size state per layer, whatever the length:
the fast-weight matrix ``S`` (``[B, H, K, V]``, float32) and the last inputs of the three short convolutions.
LaCT layers keep :class:`refine_core.models.lact.LaCTState` instead (fast weights, momentum, the current chunk's
gradient sum, the attention window). Decoding feeds new tokens with this cache instead of re-encoding the prefix,
and REFINE's rollouts branch from it (clone, select or repeat rows), so the operations here are cheap tensor copies
over every tensor of every layer's state, whatever its type: each state's tensors have the row as their first
dimension and the state offers ``map``, ``cat`` and ``tensors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class LayerState:
    """State of one layer after reading a prefix."""

    recurrent_state: torch.Tensor | None = None  # [B, H, K, V], float32
    # Last inputs of the q/k/v short convolutions, each [B, D, W] (None when the layer has no short conv).
    conv_states: tuple[torch.Tensor | None, ...] | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayerState:
        conv = None if self.conv_states is None else tuple(None if c is None else fn(c) for c in self.conv_states)
        rec = None if self.recurrent_state is None else fn(self.recurrent_state)
        return LayerState(recurrent_state=rec, conv_states=conv)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.recurrent_state, *(self.conv_states or ())) if t is not None]

    @property
    def batch_size(self) -> int:
        return self.recurrent_state.shape[0] if self.recurrent_state is not None else 0

    @staticmethod
    def cat(states: list[LayerState]) -> LayerState:
        rec = [s.recurrent_state for s in states]
        conv = [s.conv_states for s in states]
        return LayerState(
            recurrent_state=None if rec[0] is None else torch.cat(rec, dim=0),
            conv_states=None
            if conv[0] is None
            else tuple(None if parts[0] is None else torch.cat(parts, dim=0) for parts in zip(*conv, strict=True)),
        )


@dataclass
class FastWeightCache:
    """Per-layer states plus the number of tokens read so far (padding included)."""

    layers: list[LayerState] = field(default_factory=list)
    seen_tokens: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> FastWeightCache:
        return cls(layers=[LayerState() for _ in range(num_layers)])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FastWeightCache:
        return FastWeightCache(layers=[layer.map(fn) for layer in self.layers], seen_tokens=self.seen_tokens)

    def clone(self) -> FastWeightCache:
        return self.map(torch.clone)

    def detach(self) -> FastWeightCache:
        return self.map(torch.Tensor.detach)

    def select(self, index: torch.Tensor | list[int]) -> FastWeightCache:
        """Rows ``index`` of the batch (a copy), e.g. to continue only some sequences."""
        index = torch.as_tensor(index, dtype=torch.long)
        return self.map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> FastWeightCache:
        """Each row repeated ``repeats`` times (``[a, b] -> [a, a, b, b]``): G rollouts from one prefix."""
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(caches: list[FastWeightCache]) -> FastWeightCache:
        """Stack the rows of several caches of the same model into one batch (e.g. one prefix per cut point)."""
        if not caches:
            raise ValueError("FastWeightCache.cat needs at least one cache")
        layers = [type(states[0]).cat(list(states)) for states in zip(*(c.layers for c in caches), strict=True)]
        return FastWeightCache(layers=layers, seen_tokens=max(c.seen_tokens for c in caches))

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.batch_size:
                return layer.batch_size
        return 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
