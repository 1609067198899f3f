"""LaCT token mixer (upstream ``LaCTSWIGLULayer``, ``a1600012888/LaCT`` ``lact_llm/``), weight-compatible with it.

One ``qkv`` projection feeds two branches whose outputs are summed before ``o_proj`` (models-notes §2.2):
sliding-window softmax attention (:func:`~refine_core.models.ops.window_attention.window_attention`) and a
large-chunk fast-weight SwiGLU MLP per head (:mod:`refine_core.models.ops.large_chunk`). Upstream's parameter
names, shapes and initialisation are kept; its flash-attn and Triton/``torch.compile`` paths are replaced by plain
PyTorch that runs on any device.

What upstream lacks and this adds:

* **A recurrent cache** (:class:`LaCTState`): the fast weights, their momentum and the current chunk's gradient sum
  so far, plus the last ``W - 1`` attention keys and values. Decoding never re-reads the prefix.
* **Padding that is absent.** A left-pad token is not a position, not an attention key and never enters the fast
  weights; each row's chunks start at its first real token. ``config.pad_into_fast_weights`` restores upstream's
  behaviour inside the official REFINE code (pads count as positions and are learned from; only attention masks
  them; spec §10.3), for comparisons.
* **States at cut points** for REFINE's branch rollouts (spec §2.3): read off the one document pass with their
  gradients: the weights at the start of the cut's chunk, the gradient sum of its tokens before the cut, and the
  window of keys before the cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from refine_core.models.configuration import LaCTConfig
from refine_core.models.layers import RMSNorm
from refine_core.models.ops.cut_states import CutPlan, plan_cuts
from refine_core.models.ops.cut_states import to_device_nonblocking as _dev
from refine_core.models.ops.large_chunk import TTTState, chunk_gradients, initial_state, l2_normalize, large_chunk_ttt
from refine_core.models.ops.window_attention import rotary, window_attention

_BASE_LR = 1e-3  # upstream: softplus(x + softplus^-1(1e-3))


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class LowRankFastWeight(nn.Module):
    """Upstream ``LowRankFastWeight`` with ``add_identity=True``: ``W = w_left @ w_right + 0.5 I`` per head."""

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int, init_gain: float) -> None:
        super().__init__()
        self.rank, self.init_gain = rank, init_gain
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_left, std=self.init_gain / math.sqrt(self.rank))
        nn.init.normal_(self.w_right, std=self.init_gain / math.sqrt(self.w_right.shape[-1]))

    def forward(self) -> torch.Tensor:
        w = self.w_left @ self.w_right
        eye = torch.eye(w.shape[1], w.shape[2], device=w.device, dtype=w.dtype)
        return w + 0.5 * eye


@dataclass
class LaCTState:
    """One LaCT layer's state after a prefix, for ``B`` rows (every tensor's first dimension is the row).

    ``count`` / ``seen`` / ``window_len`` are CPU integers, so that the host knows where every row stands in its
    chunk and window without waiting for the GPU.
    """

    w: tuple[torch.Tensor, ...]  # W0, W1, W2 answering the current chunk, [B, H, h, d] / [B, H, d, h] / [B, H, h, d]
    main: tuple[torch.Tensor, ...] | None  # pre-norm only: the unnormalised weights
    momentum: tuple[torch.Tensor, ...] | None
    grad: tuple[torch.Tensor, ...]  # the current chunk's gradient sum so far
    gate_sum: torch.Tensor  # [B, H, 1, 1]
    count: torch.Tensor  # [B] long CPU: tokens in the current chunk
    seen: torch.Tensor  # [B] long CPU: positions read (the next token's RoPE position)
    window_k: torch.Tensor  # [B, W - 1, heads, head_dim] the last keys (after RoPE), right-aligned
    window_v: torch.Tensor
    window_len: torch.Tensor  # [B] long CPU: how many of the window's slots hold a key

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LaCTState:
        def apply(value):
            if value is None:
                return None
            return tuple(fn(t) for t in value) if isinstance(value, tuple) else fn(value)

        return LaCTState(**{f.name: apply(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(states: list[LaCTState]) -> LaCTState:
        def join(values):
            if values[0] is None:
                return None
            if isinstance(values[0], tuple):
                return tuple(torch.cat(parts, 0) for parts in zip(*values, strict=True))
            return torch.cat(values, 0)

        return LaCTState(**{f.name: join([getattr(s, f.name) for s in states]) for f in fields(LaCTState)})

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        self.map(lambda t: out.append(t) or t)
        return out

    @property
    def batch_size(self) -> int:
        return self.seen.shape[0]


@dataclass(frozen=True)
class PaddingMask:
    """A ``[B, T]`` padding mask on the host and on the device, made once per model pass.

    Every LaCT layer needs the mask on the host (how many real tokens each row has decides its chunks and window);
    reading it back from the GPU in every layer would make the host wait for the GPU's queue once a layer.
    """

    host: torch.Tensor  # bool, CPU
    device: torch.Tensor  # bool, on the activations' device

    @staticmethod
    def of(mask: torch.Tensor | PaddingMask | None) -> PaddingMask | None:
        if mask is None or isinstance(mask, PaddingMask):
            return mask
        return PaddingMask(host=mask.detach().to("cpu", torch.bool), device=mask.detach().bool())


class LaCT(nn.Module):
    """One LaCT layer's token mixer (named ``attn`` inside a block, as upstream)."""

    def __init__(self, config: LaCTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, heads = config.hidden_size, config.num_lact_heads
        d_in, d_h = config.fw_head_dim, config.fw_hidden_dim
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)
        if config.attn_qk_norm:
            self.q_norm = RMSNorm(d, eps=1e-5)
            self.k_norm = RMSNorm(d, eps=1e-5)
        self.o_proj = nn.Linear(d, d, bias=False)
        if config.w0_w2_low_rank > 0:
            self.w0: nn.Module | nn.Parameter = LowRankFastWeight(heads, d_h, d_in, config.w0_w2_low_rank,
                                                                  config.fw_init_gain)
            self.w2: nn.Module | nn.Parameter = LowRankFastWeight(heads, d_h, d_in, config.w0_w2_low_rank,
                                                                  config.fw_init_gain)
        else:
            self.w0 = nn.Parameter(torch.empty(heads, d_h, d_in))
            self.w2 = nn.Parameter(torch.empty(heads, d_h, d_in))
        self.w1 = nn.Parameter(torch.empty(heads, d_in, d_h))
        self.lr_proj = nn.Linear(d, 3 * heads * config.lr_dim)
        self.qk_scale = nn.Parameter(torch.ones(d, 2))
        self.qk_offset = nn.Parameter(torch.zeros(d, 2))
        if config.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(d, heads)
        self.ttt_norm = RMSNorm(d_in, eps=1e-5)  # fla's RMSNorm default eps: upstream passes none
        if config.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(d, heads), nn.Sigmoid())
        self.reset_fast_weights()

    def reset_fast_weights(self) -> None:
        """Upstream ``LaCTPreTrainedModel._init_weights`` for the layer's own parameters (after the Linear init)."""
        with torch.no_grad():
            self.qk_scale.fill_(1.0)
            self.qk_offset.zero_()
            for w in (self.w0, self.w2):
                if isinstance(w, LowRankFastWeight):
                    w.reset_parameters()
                else:
                    nn.init.normal_(w, std=1.0 / math.sqrt(self.config.fw_head_dim))
            nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.config.fw_hidden_dim))

    def initial_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slow initial fast weights ``(W0, W1, W2)``, ``[H, ...]`` each."""
        w0 = self.w0() if isinstance(self.w0, LowRankFastWeight) else self.w0
        w2 = self.w2() if isinstance(self.w2, LowRankFastWeight) else self.w2
        return w0, self.w1, w2

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype, window: bool = True,
                    weights: tuple[torch.Tensor, ...] | None = None) -> LaCTState:
        """The state before any token, for ``batch`` rows (``window=False``: a zero-width attention window;
        ``weights``: :meth:`initial_weights` when the caller already has them)."""
        cfg = self.config
        heads = cfg.num_lact_heads
        w = tuple(t.unsqueeze(0).expand(batch, *t.shape).reshape(batch * heads, *t.shape[1:])
                  for t in (weights or self.initial_weights()))
        wide = torch.promote_types(dtype, torch.float32)
        tt = initial_state(w, prenorm=cfg.ttt_prenorm, momentum=cfg.use_momentum, gate_dtype=wide)
        width = cfg.window_size - 1 if window else 0
        window = torch.zeros(batch, width, cfg.num_attn_heads, cfg.head_dim, device=device, dtype=dtype)
        return self._from_ttt(tt, batch, seen=torch.zeros(batch, dtype=torch.long), window=(window, window.clone()),
                              window_len=torch.zeros(batch, dtype=torch.long))

    def _from_ttt(self, tt: TTTState, batch: int, *, seen, window, window_len) -> LaCTState:
        heads = self.config.num_lact_heads

        def rows(value):
            if value is None:
                return None
            return tuple(t.reshape(batch, heads, *t.shape[1:]) for t in value)

        return LaCTState(
            w=rows(tt.w), main=rows(tt.main), momentum=rows(tt.momentum), grad=rows(tt.grad),
            gate_sum=tt.gate_sum.reshape(batch, heads, 1, 1), count=tt.count.view(batch, heads)[:, 0].clone(),
            seen=seen, window_k=window[0], window_v=window[1], window_len=window_len,
        )

    def _to_ttt(self, state: LaCTState) -> TTTState:
        def flat(value):
            return None if value is None else tuple(t.flatten(0, 1) for t in value)

        return TTTState(w=flat(state.w), main=flat(state.main), momentum=flat(state.momentum), grad=flat(state.grad),
                        gate_sum=state.gate_sum.flatten(0, 1),
                        count=state.count.repeat_interleave(self.config.num_lact_heads))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | PaddingMask | None = None,
        state: LaCTState | None = None,
        use_cache: bool = False,
        cuts: CutPlan | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LaCTState | None, LaCTState | None]:
        """Mix tokens: the interface of :class:`refine_core.models.deltanet.DeltaNet` (see there)."""
        cfg = self.config
        B, T, D = hidden_states.shape
        heads, d_fw = cfg.num_lact_heads, cfg.fw_head_dim
        official = cfg.pad_into_fast_weights
        w_init = self.initial_weights()  # the low-rank products, once per call
        fresh = state is None
        if fresh:
            state = self.empty_state(B, hidden_states.device, hidden_states.dtype, window=False, weights=w_init)
        mask = PaddingMask.of(attention_mask)
        real = torch.full((B,), T, dtype=torch.long) if mask is None else mask.host.sum(1)
        valid = torch.ones(B, T, dtype=torch.bool, device=hidden_states.device) if mask is None else mask.device
        # positions: each row's real tokens count on from the state (pads: any value, they are masked everywhere)
        steps = torch.arange(T)
        pad = T - real
        pos_cpu = state.seen[:, None] + (steps if official else (steps - pad[:, None]).clamp(min=0))
        positions = _dev(pos_cpu, hidden_states.device)

        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        if cfg.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        fast_q = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
        fast_k = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fast_v = v

        # --- sliding-window attention, continuing from the cached window
        split = lambda x: x.view(B, T, cfg.num_attn_heads, cfg.head_dim)  # noqa: E731
        qa, ka, va = rotary(split(q), positions, cfg.rope_theta), rotary(split(k), positions, cfg.rope_theta), split(v)
        W1 = cfg.window_size - 1
        if fresh:  # no cached keys in front
            keys, values, k_pos, k_valid, prefix = ka, va, positions, valid, 0
        else:
            slots = torch.arange(W1)
            window_valid = _dev(slots[None] >= W1 - state.window_len[:, None], hidden_states.device)
            window_pos = _dev(state.seen[:, None] - W1 + slots, hidden_states.device)
            keys = torch.cat([state.window_k.to(ka.dtype), ka], 1)
            values = torch.cat([state.window_v.to(va.dtype), va], 1)
            k_pos, k_valid, prefix = torch.cat([window_pos, positions], 1), torch.cat([window_valid, valid], 1), W1
        attn = window_attention(
            qa, keys, values, q_pos=positions, k_pos=k_pos, k_valid=k_valid, window=cfg.window_size, prefix=prefix
        ).reshape(B, T, D)

        # --- the large-chunk fast weights
        def per_head(x: torch.Tensor) -> torch.Tensor:  # [B, T, H*e] -> [B*H, T, e]
            return x.view(B, T, heads, -1).transpose(1, 2).reshape(B * heads, T, -1)

        if cfg.qkv_silu:
            fast_q, fast_k = F.silu(fast_q), F.silu(fast_k)
            if not cfg.no_v_silu:
                fast_v = F.silu(fast_v)
        fast_q = l2_normalize(fast_q.view(B, T, heads, d_fw)).view(B, T, D)
        fast_k = l2_normalize(fast_k.view(B, T, heads, d_fw)).view(B, T, D)
        if not cfg.ttt_nope:  # the attention's RoPE, in the attention-head layout (upstream)
            fast_q = rotary(split(fast_q), positions, cfg.rope_theta).reshape(B, T, D)
            fast_k = rotary(split(fast_k), positions, cfg.rope_theta).reshape(B, T, D)
        wide = torch.promote_types(hidden_states.dtype, torch.float32)  # upstream: float32 (float64 in exact tests)
        lr = F.softplus(self.lr_proj(hidden_states).to(wide) + _inv_softplus(_BASE_LR))
        lr = per_head(lr)
        lr3 = (lr[..., 0:1], lr[..., 1:2], lr[..., 2:3])
        gate = per_head(self.momentum_proj(hidden_states).to(wide)) if cfg.use_momentum else None
        norms = tuple(t.norm(dim=2, keepdim=True).repeat(B, 1, 1) for t in w_init)
        ttt_real = torch.full((B,), T, dtype=torch.long) if official else real
        want_cuts = cuts is not None
        if want_cuts and (official or bool((state.seen > 0).any())):
            raise NotImplementedError(
                "LaCT cut states need pads kept out of the fast weights (pad_into_fast_weights=False) and a pass "
                "that starts from an empty prefix"
            )
        tt_in = self._to_ttt(state)
        fw_out, tt_out, starts = large_chunk_ttt(
            per_head(fast_q), per_head(fast_k), per_head(fast_v), lr3, gate, tt_in,
            real=ttt_real.repeat_interleave(heads), chunk=cfg.lact_chunk_size, norms=norms,
            use_muon=cfg.use_muon, keep_state=use_cache, record=want_cuts,
        )
        fw_out = self.ttt_norm(fw_out)
        if cfg.learnable_ttt_scale:
            fw_out = fw_out * per_head(F.silu(self.ttt_scale_proj(hidden_states)))
        fw_out = fw_out.view(B, heads, T, d_fw).transpose(1, 2).reshape(B, T, D)
        out = self.o_proj(attn + fw_out.to(attn.dtype))

        new_state = None
        if use_cache:
            new_window = self._next_window(state, ka, va, real, T)
            new_state = self._from_ttt(tt_out, B, seen=state.seen + (T if official else real), window=new_window[:2],
                                       window_len=new_window[2])
        cut_state = None
        if want_cuts:
            plan = cuts if isinstance(cuts, CutPlan) else plan_cuts(cuts, T, hidden_states.device)
            cut_state = self._cut_states(plan, starts, per_head(fast_k), per_head(fast_v), lr3, gate, ka, va, real, T)
        return out, new_state, cut_state

    def _next_window(self, state: LaCTState, ka: torch.Tensor, va: torch.Tensor, real: torch.Tensor, T: int):
        """The last ``W - 1`` real keys/values after this call: the cached ones, then the new ones, right-aligned."""
        W1 = self.config.window_size - 1
        old = state.window_k.shape[1]  # W - 1, or 0 for a fresh state
        new_len = torch.clamp(state.window_len + real, max=W1)
        from_new = torch.minimum(real, new_len)
        from_old = new_len - from_new
        slot = torch.arange(W1)[None]
        e = slot - (W1 - new_len[:, None])  # index among the kept keys, < 0: empty slot
        index = torch.where(
            e < from_old[:, None], old - from_old[:, None] + e, old + T - from_new[:, None] + e - from_old[:, None]
        )
        index = _dev(index.clamp(0, old + T - 1), ka.device)
        keys = torch.cat([state.window_k.to(ka.dtype), ka], 1)
        values = torch.cat([state.window_v.to(va.dtype), va], 1)
        take = lambda x: x.gather(1, index[:, :, None, None].expand(-1, -1, *x.shape[2:]))  # noqa: E731
        empty = _dev(e < 0, ka.device)[:, :, None, None]
        return take(keys).masked_fill(empty, 0), take(values).masked_fill(empty, 0), new_len

    def _cut_states(self, plan: CutPlan, starts: list[TTTState], k, v, lr, gate, ka, va, real, T) -> LaCTState:
        """The state after the first ``cuts[b, j]`` positions of each row, rows ordered ``(b, j)``."""
        cfg = self.config
        C, heads, W1 = cfg.lact_chunk_size, cfg.num_lact_heads, cfg.window_size - 1
        B, M = plan.cuts.shape
        pad = T - real
        n = (plan.cuts - pad[:, None]).clamp(min=0)  # real tokens before each cut
        chunk_of = n // C  # the chunk the cut falls in (its start state answers the cut)
        count = n - chunk_of * C
        device = k.device
        # rows (b, j, h) of every cut, and the rows (b, h) of the pass they come from
        src = (torch.arange(B)[:, None, None] * heads + torch.arange(heads)[None, None, :]).expand(B, M, heads)
        seg = _dev(chunk_of[:, :, None].expand(B, M, heads).reshape(-1), device)
        src_d = _dev(src.reshape(-1), device)
        n_seg = len(starts)

        def pick(values: list[torch.Tensor]) -> torch.Tensor:
            stacked = torch.stack(values, 0)  # [S + 1, N, ...]
            return stacked[seg, src_d]

        w = tuple(pick([s.w[i] for s in starts]) for i in range(3)) if n_seg else None
        main = None if cfg.ttt_prenorm is False else tuple(pick([s.main[i] for s in starts]) for i in range(3))
        momentum = None if not cfg.use_momentum else tuple(pick([s.momentum[i] for s in starts]) for i in range(3))
        # the gradient sum of each cut's chunk up to the cut, with the weights of that chunk
        width = max(int(count.max()), 1)
        steps = torch.arange(width)
        first = (pad[:, None] + chunk_of * C)[:, :, None]  # padded position of the chunk's first token
        index = (first + steps).clamp(max=T - 1)  # [B, M, width]
        inside = (steps < count[:, :, None])
        rows_index = _dev(index[:, :, None, :].expand(B, M, heads, width).reshape(B * M * heads, width), device)
        inside_d = _dev(inside[:, :, None, :].expand(B, M, heads, width).reshape(B * M * heads, width), device)

        def take(x: torch.Tensor) -> torch.Tensor:  # x [B*H, T, e] -> [B*M*H, width, e]
            return x[src_d].gather(1, rows_index[..., None].expand(-1, -1, x.shape[-1]))

        lrs = tuple(take(x) * inside_d[..., None] for x in lr)
        grad = chunk_gradients(w, take(k), take(v), lrs)
        grad = tuple(g.to(torch.promote_types(g.dtype, torch.float32)) for g in grad)
        gate_sum = (take(gate) * inside_d[..., None]).sum(1, keepdim=True) if gate is not None else None
        if gate_sum is None:
            gate_sum = grad[0].new_zeros(B * M * heads, 1, 1, dtype=torch.float32)
        tt = TTTState(w=w, main=main, momentum=momentum, grad=grad, gate_sum=gate_sum.float(),
                      count=count[:, :, None].expand(B, M, heads).reshape(-1))
        # attention window: the W - 1 positions before the cut
        slot = torch.arange(W1)
        at = plan.cuts[:, :, None] - W1 + slot  # [B, M, W1] padded positions
        win_valid = (at >= pad[:, None, None])
        at_d = _dev(at.clamp(0, T - 1).reshape(B, M * W1), device)
        gather = lambda x: x.gather(1, at_d[:, :, None, None].expand(-1, -1, *x.shape[2:])).view(  # noqa: E731
            B * M, W1, *x.shape[2:])
        mask_d = _dev(win_valid.reshape(B * M, W1, 1, 1), device)
        window = (gather(ka).masked_fill(~mask_d, 0), gather(va).masked_fill(~mask_d, 0))
        return self._from_ttt(tt, B * M, seen=n.reshape(-1), window=window,
                              window_len=win_valid.sum(-1).reshape(-1))
