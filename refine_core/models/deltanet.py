"""DeltaNet token mixer (fla ``fla.layers.DeltaNet``), parameter-compatible with fla checkpoints.

The fast weight ``S`` is updated per token by the delta rule ``S += beta * k (v - S^T k)^T`` and read with the
query, ``o = S^T q``. Padding is handled by masking rather than unpadding: at a pad position the layer input,
and therefore q, k and v, are zero and beta is zero, so the token leaves the state and the short-convolution
history exactly as if it were absent. For left padding (spec §1) this reproduces fla's varlen result.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from refine_core.models.cache import LayerState
from refine_core.models.configuration import DeltaNetConfig
from refine_core.models.layers import GatedRMSNorm, RMSNorm, ShortConvolution
from refine_core.models.ops import delta_rule, delta_rule_with_cuts
from refine_core.models.ops.conv import conv_cache_at
from refine_core.models.ops.cut_states import CutPlan, plan_cuts


def apply_padding_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` ``[B, T, ...]`` where ``mask`` ``[B, T]`` is 0."""
    if mask is None:
        return x
    return x * mask.view(*mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)


# q, k, v, the conv caches after all tokens, the conv caches at the cuts
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]


def as_cut_plan(cuts: torch.Tensor | CutPlan | None, x: torch.Tensor) -> CutPlan | None:
    """``cuts`` ``[B, M]`` as the :class:`CutPlan` for rows ``x`` ``[B, T, ...]`` (a plan passes through unchanged).

    The model makes the plan once per pass; a layer called on its own makes its own.
    """
    if cuts is None or isinstance(cuts, CutPlan):
        return cuts
    return plan_cuts(cuts, x.shape[1], x.device)


def conv_qkv(
    layer: nn.Module, x: torch.Tensor, state: LayerState | None, use_cache: bool, cuts: CutPlan | None = None
) -> QKV:
    """q, k, v through the layer's projections and short convolutions, continuing from ``state``'s conv caches.

    Returns the three ``[B, T, D]`` tensors, the new conv caches (``None`` unless ``use_cache``) and the conv caches
    at ``cuts`` (``[B * M, D, W]`` each, ``None`` without cuts).
    """
    caches = state.conv_states if state is not None and state.conv_states is not None else (None,) * 3
    outputs, new_caches, cut_caches = [], [], []
    convs = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)
    for proj, conv, cache in zip((layer.q_proj, layer.k_proj, layer.v_proj), convs, caches, strict=True):
        pre = proj(x)
        y, new = conv(pre, cache=cache, output_final_state=use_cache)
        outputs.append(y)
        new_caches.append(new)
        if cuts is not None:
            cut_caches.append(conv_cache_at(pre, cache, cuts.device_cuts, conv.kernel_size[0]))
    q, k, v = outputs
    return q, k, v, (tuple(new_caches) if use_cache else None), (tuple(cut_caches) if cuts is not None else None)


def mix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    *,
    state: LayerState | None,
    use_cache: bool,
    cuts: CutPlan | None,
    use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The delta rule of one layer: ``(o, state after all tokens or None, [B * M, H, K, V] states at cuts or None)``."""
    initial_state = state.recurrent_state if state is not None else None
    if cuts is None:
        o, final = delta_rule(
            q, k, v, beta, g, initial_state=initial_state, output_final_state=use_cache, use_qk_l2norm=use_qk_l2norm
        )
        return o, final, None
    o, final, at_cuts = delta_rule_with_cuts(
        q, k, v, beta, g, cuts=cuts, initial_state=initial_state, use_qk_l2norm=use_qk_l2norm
    )
    return o, (final if use_cache else None), at_cuts.flatten(0, 1)


class DeltaNet(nn.Module):
    """One DeltaNet layer's token mixer (named ``attn`` inside a block, as in fla)."""

    def __init__(self, config: DeltaNetConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_k_dim = config.key_dim // config.num_heads
        self.head_v_dim = config.value_dim // config.num_heads

        self.q_proj = nn.Linear(config.hidden_size, config.key_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.key_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.value_dim, bias=False)
        if config.use_beta:
            self.b_proj = nn.Linear(config.hidden_size, config.num_heads, bias=False)
        if config.use_short_conv:
            qk_act = "silu" if config.qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(config.key_dim, config.conv_size, activation=qk_act)
            self.k_conv1d = ShortConvolution(config.key_dim, config.conv_size, activation=qk_act)
            self.v_conv1d = ShortConvolution(config.value_dim, config.conv_size, activation="silu")
        if config.use_gate:
            self.g_proj = nn.Linear(config.hidden_size, config.value_dim, bias=False)
            self.o_norm: nn.Module = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=config.norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(config.value_dim, config.hidden_size, bias=False)

    def _qkv(
        self, x: torch.Tensor, state: LayerState | None, use_cache: bool, cuts: CutPlan | None
    ) -> QKV:
        if self.config.use_short_conv:
            return conv_qkv(self, x, state, use_cache, cuts)
        q, k, v = self.q_proj(x), self.k_proj(x), F.silu(self.v_proj(x))
        if self.config.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        return q, k, v, None, None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: LayerState | None = None,
        use_cache: bool = False,
        cuts: torch.Tensor | CutPlan | None = None,
    ) -> tuple[torch.Tensor, LayerState | None, LayerState | None]:
        """Mix tokens.

        Args:
            hidden_states: ``[B, T, D]`` normed layer input.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (of this call's tokens only).
            state: this layer's state after the previous tokens, or ``None`` for an empty prefix.
            use_cache: return the state after these tokens.
            cuts: ``[B, M]`` positions in ``[0, T]`` or their :class:`CutPlan`; also return the state after the first
                ``cuts[b, j]`` tokens.

        Returns:
            ``([B, T, D]`` output, the new state or ``None``, the states at the cuts (rows ``(b, j)``) or ``None``).
        """
        cfg = self.config
        batch, seq_len, _ = hidden_states.shape
        x = apply_padding_mask(hidden_states, attention_mask)
        cuts = as_cut_plan(cuts, x)
        q, k, v, conv_states, cut_conv = self._qkv(x, state, use_cache, cuts)
        q = q.view(batch, seq_len, self.num_heads, self.head_k_dim)
        k = k.view(batch, seq_len, self.num_heads, self.head_k_dim)
        v = v.view(batch, seq_len, self.num_heads, self.head_v_dim)
        if cfg.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif cfg.qk_activation == "elu":
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        if cfg.qk_norm == "sum":
            q = F.normalize(q, p=1, dim=-1, eps=1e-6)
            k = F.normalize(k, p=1, dim=-1, eps=1e-6)

        beta = self.b_proj(x).sigmoid() if cfg.use_beta else q.new_ones(batch, seq_len, self.num_heads)
        if cfg.allow_neg_eigval:
            beta = beta * 2.0
        beta = apply_padding_mask(beta, attention_mask)

        o, recurrent_state, cut_recurrent = mix(
            q, k, v, beta, None, state=state, use_cache=use_cache, cuts=cuts, use_qk_l2norm=cfg.qk_norm == "l2"
        )
        if cfg.use_gate:
            gate = self.g_proj(x).view(batch, seq_len, self.num_heads, self.head_v_dim)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        o = self.o_proj(o.reshape(batch, seq_len, -1).to(hidden_states.dtype))
        new_state = LayerState(recurrent_state=recurrent_state, conv_states=conv_states) if use_cache else None
        cut_state = None if cuts is None else LayerState(recurrent_state=cut_recurrent, conv_states=cut_conv)
        return o, new_state, cut_state
