"""GatedDeltaNet token mixer (fla ``fla.layers.GatedDeltaNet``), parameter-compatible with fla checkpoints.

Adds a per-token, per-head decay to the delta rule: ``S = exp(g_t) S`` before each update, with
``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` (what fla computes in-kernel with ``use_gate_in_kernel``).
Padding is masked as in :mod:`refine_core.models.deltanet`; ``g`` is also zeroed at pads so the state does not
decay there.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from refine_core.models.cache import LayerState
from refine_core.models.configuration import GatedDeltaNetConfig
from refine_core.models.deltanet import apply_padding_mask, as_cut_plan, conv_qkv, mix
from refine_core.models.layers import GatedRMSNorm, RMSNorm, ShortConvolution
from refine_core.models.ops.cut_states import CutPlan


class GatedDeltaNet(nn.Module):
    """One GatedDeltaNet layer's token mixer (named ``attn`` inside a block, as in fla)."""

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_v_heads = config.value_heads
        self.head_k_dim = config.head_dim
        self.head_v_dim = config.head_v_dim
        d = config.hidden_size

        self.q_proj = nn.Linear(d, config.key_dim, bias=False)
        self.k_proj = nn.Linear(d, config.key_dim, bias=False)
        self.v_proj = nn.Linear(d, config.value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(d, self.num_v_heads, bias=False)
        # Same initialisation as fla: A ~ U(0, 16), dt log-uniform in [1e-3, 1e-1], dt_bias = softplus^-1(dt).
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_v_heads).uniform_(0, 16)))
        dt = torch.exp(torch.rand(self.num_v_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if config.use_short_conv:
            self.q_conv1d = ShortConvolution(config.key_dim, config.conv_size, activation="silu")
            self.k_conv1d = ShortConvolution(config.key_dim, config.conv_size, activation="silu")
            self.v_conv1d = ShortConvolution(config.value_dim, config.conv_size, activation="silu")
        if config.use_gate:
            self.g_proj = nn.Linear(d, config.value_dim, bias=False)
            self.o_norm: nn.Module = GatedRMSNorm(
                self.head_v_dim, eps=config.norm_eps, activation=config.output_gate_activation
            )
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=config.norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(config.value_dim, d, bias=False)

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """Log-space decay ``g`` ``[B, T, HV]`` in at least float32 (always <= 0)."""
        a = self.a_proj(x)
        dtype = torch.promote_types(a.dtype, torch.float32)
        return -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: LayerState | None = None,
        use_cache: bool = False,
        cuts: torch.Tensor | CutPlan | None = None,
    ) -> tuple[torch.Tensor, LayerState | None, LayerState | None]:
        """Same contract as :meth:`refine_core.models.deltanet.DeltaNet.forward`."""
        cfg = self.config
        batch, seq_len, _ = hidden_states.shape
        x = apply_padding_mask(hidden_states, attention_mask)
        cuts = as_cut_plan(cuts, x)
        if cfg.use_short_conv:
            q, k, v, conv_states, cut_conv = conv_qkv(self, x, state, use_cache, cuts)
        else:
            q, k, v = F.silu(self.q_proj(x)), F.silu(self.k_proj(x)), F.silu(self.v_proj(x))
            conv_states = cut_conv = None
        q = q.view(batch, seq_len, self.num_heads, self.head_k_dim)
        k = k.view(batch, seq_len, self.num_heads, self.head_k_dim)
        v = v.view(batch, seq_len, self.num_v_heads, self.head_v_dim)
        if self.num_v_heads > self.num_heads:
            # Grouped value attention: value head i reads query/key head i // (HV / H), as fla's kernels do.
            group = self.num_v_heads // self.num_heads
            q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)

        beta = self.b_proj(x).sigmoid()
        if cfg.allow_neg_eigval:
            beta = beta * 2.0
        beta = apply_padding_mask(beta, attention_mask)
        g = apply_padding_mask(self.decay(x), attention_mask)

        o, recurrent_state, cut_recurrent = mix(
            q, k, v, beta, g, state=state, use_cache=use_cache, cuts=cuts, use_qk_l2norm=True
        )
        if cfg.use_gate:
            gate = self.g_proj(x).view(batch, seq_len, self.num_v_heads, self.head_v_dim)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        o = self.o_proj(o.reshape(batch, seq_len, -1).to(hidden_states.dtype))
        new_state = LayerState(recurrent_state=recurrent_state, conv_states=conv_states) if use_cache else None
        cut_state = None if cuts is None else LayerState(recurrent_state=cut_recurrent, conv_states=cut_conv)
        return o, new_state, cut_state
