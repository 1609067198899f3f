"""Fast-weight causal LMs: pre-norm blocks around a token mixer, fla's module tree and parameter names.

``FastWeightForCausalLM`` is the one model interface the trainers use::

    out = model(input_ids, attention_mask, cache=None, use_cache=True)
    out.logits        # [B, T, V] (or None with return_logits=False)
    out.hidden_states # [B, T, D] final-normed last-layer states (the LM head's input; spec §1 reward states)
    out.cache         # FastWeightCache after these tokens, to continue decoding or branch rollouts
    out.cut_cache     # with cuts=[B, M]: the cache after the first cuts[b, j] tokens of each row (rows (b, j))

State-dict keys are fla's (``model.embeddings.weight``, ``model.layers.N.attn.q_proj.weight``, ...,
``lm_head.weight``), so fla checkpoints load with a strict key check and our checkpoints load into fla.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from refine_core.models.cache import FastWeightCache, LayerState
from refine_core.models.configuration import DeltaNetConfig, FastWeightConfig, GatedDeltaNetConfig, LaCTConfig
from refine_core.models.deltanet import DeltaNet
from refine_core.models.gated_deltanet import GatedDeltaNet
from refine_core.models.lact import LaCT, PaddingMask
from refine_core.models.layers import GatedMLP, RMSNorm
from refine_core.models.ops.cut_states import CutPlan, plan_cuts


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, T, V]
    hidden_states: torch.Tensor  # [B, T, D], final-normed
    cache: FastWeightCache | None
    # With ``cuts``: the state after the first ``cuts[b, j]`` tokens of row ``b``, as B·M rows ordered (b, j).
    cut_cache: FastWeightCache | None = None


def _make_mixer(config: FastWeightConfig, layer_idx: int) -> nn.Module:
    if isinstance(config, GatedDeltaNetConfig):
        return GatedDeltaNet(config, layer_idx)
    if isinstance(config, DeltaNetConfig):
        return DeltaNet(config, layer_idx)
    if isinstance(config, LaCTConfig):
        return LaCT(config, layer_idx)
    raise TypeError(f"no token mixer for config type {type(config).__name__}")


class FastWeightBlock(nn.Module):
    """``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))`` (fla ``DeltaNetBlock`` / ``GatedDeltaNetBlock``)."""

    def __init__(self, config: FastWeightConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = _make_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        state: LayerState | None,
        use_cache: bool,
        cuts: CutPlan | None = None,
    ) -> tuple[torch.Tensor, LayerState | None, LayerState | None]:
        mixed, new_state, cut_state = self.attn(self.attn_norm(hidden_states), attention_mask, state, use_cache, cuts)
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, new_state, cut_state


class FastWeightModel(nn.Module):
    """Embeddings, blocks and the final norm (fla ``DeltaNetModel``; the ``model.`` prefix of the keys)."""

    def __init__(self, config: FastWeightConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(FastWeightBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)


class FastWeightForCausalLM(nn.Module):
    """A DeltaNet or GatedDeltaNet language model with fla-compatible weights, or LaCT with upstream's."""

    def __init__(self, config: FastWeightConfig) -> None:
        super().__init__()
        self.config = config
        self.model = FastWeightModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        # Recompute each block in the backward pass instead of storing its activations (long documents).
        self.gradient_checkpointing = False
        # One decode step is a fixed computation over fixed buffers (CUDA-graph decoding); LaCT's is not.
        self.static_decoding = not isinstance(config, LaCTConfig)
        self.apply(self._init_weights)
        self.mark_no_weight_decay()

    def mark_no_weight_decay(self) -> None:
        """Flag GatedDeltaNet's ``A_log`` and ``dt_bias`` as fla does (lost when a load assigns new tensors)."""
        for module in self.modules():
            if isinstance(module, GatedDeltaNet):
                module.A_log._no_weight_decay = True  # type: ignore[attr-defined]
                module.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]

    def _init_weights(self, module: nn.Module) -> None:
        # fla's FLAPreTrainedModel._init_weights: N(0, initializer_range) for linear, conv and embedding weights.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LaCT):  # upstream: its fast-weight initial values and q/k scale, after the Linears
            module.reset_fast_weights()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: FastWeightCache | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        cuts: torch.Tensor | None = None,
    ) -> LMOutput:
        """Read ``input_ids`` after the prefix summarised by ``cache``.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding, for *these* tokens only (the prefix is in
                the cache). Left padding is exact; ``None`` means all real.
            cache: state after the previous tokens (not modified), or ``None`` for an empty prefix.
            use_cache: return the state after these tokens.
            return_logits: compute the LM head; ``False`` returns only hidden states (e.g. to compute logits in
                chunks for long sequences).
            cuts: ``[B, M]`` positions in ``[0, T]`` (of these tokens, pads included): also return ``cut_cache``, the
                state after the first ``cuts[b, j]`` tokens of each row, computed in this same pass and
                differentiable (REFINE's branch rollouts continue from it, spec §2.3).
        """
        hidden = self.model.embeddings(input_ids)
        layers = self.model.layers
        if isinstance(self.config, LaCTConfig):  # LaCT layers read the mask on the host: one copy per pass
            attention_mask = PaddingMask.of(attention_mask)
        # One plan for all layers: the cut index and fla's offsets reach the device once per pass, not per layer.
        plan = None if cuts is None else plan_cuts(cuts, input_ids.shape[1], hidden.device)
        new_cache = FastWeightCache.empty(len(layers)) if use_cache else None
        cut_cache = FastWeightCache.empty(len(layers)) if cuts is not None else None
        for i, block in enumerate(layers):
            state = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, layer_state, cut_state = checkpoint(
                    block, hidden, attention_mask, state, use_cache, plan, use_reentrant=False
                )
            else:
                hidden, layer_state, cut_state = block(hidden, attention_mask, state, use_cache, plan)
            if new_cache is not None:
                new_cache.layers[i] = layer_state
            if cut_cache is not None:
                cut_cache.layers[i] = cut_state
        hidden = self.model.norm(hidden)
        if new_cache is not None:
            new_cache.seen_tokens = (cache.seen_tokens if cache is not None else 0) + input_ids.shape[1]
        logits = self.lm_head(hidden) if return_logits else None
        return LMOutput(logits=logits, hidden_states=hidden, cache=new_cache, cut_cache=cut_cache)


def build_model(config: FastWeightConfig) -> FastWeightForCausalLM:
    """A freshly initialised model for ``config``."""
    return FastWeightForCausalLM(config)
