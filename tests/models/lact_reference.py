"""Slow, float64 reference of upstream LaCT (a1600012888/LaCT, ``lact_llm/lact_model``), used only by tests.

Transcribed by hand from upstream ``modeling_lact.py`` (LaCTForCausalLM / LaCTModel / LaCTBlock),
``layer_lact_swiglu.py`` (LaCTSWIGLULayer.forward) and ``ttt_operation.py`` (block_causal_lact_swiglu,
prenorm_block_causal_lact_swiglu), plus fla's RMSNorm / RotaryEmbedding / GatedMLP.  Training forward only:
no padding mask, no cache, no cu_seqlens.  Everything is float64 with no autocast / bf16 casts, except the RoPE
angle table which (like fla) is built from fp32 positions and fp32 inverse frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# configuration_lact_swiglu.py: LaCTSWIGLUConfig.__init__ defaults (only the fields the forward reads).
_DEFAULTS = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    num_attn_heads=32,
    num_lact_heads=4,
    inter_multi=1,
    qkv_bias=False,
    attn_qk_norm=False,
    lact_chunk_size=2048,
    use_muon=False,
    lr_dim=1,
    qkv_silu=True,
    no_v_silu=False,
    lr_parameterization="mamba",
    learnable_ttt_scale=True,
    use_momentum=True,
    ttt_loss_type="dot_product",
    ttt_prenorm=False,
    ttt_nope=False,
    w0_w2_low_rank=-1,
    window_size=2048,
    rope_theta=10000.0,
    hidden_act="swish",
    norm_eps=1e-6,
    vocab_size=32000,
)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fla rms_norm_ref: x * 1/sqrt(mean(x^2) + eps) * weight (no bias)
    return x / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight


def _l2_norm(x: torch.Tensor) -> torch.Tensor:
    # ttt_operation.py l2_norm: x / (||x|| + 1e-5)
    return x / (x.norm(dim=-1, keepdim=True) + 1e-5)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """fla RotaryEmbedding (GPT-NeoX, non-interleaved, full head dim, offset 0) on x: [B, T, H, D]."""
    T, D = x.shape[1], x.shape[-1]
    # _compute_inv_freq / _update_cos_sin_cache: fp32 inv_freq, fp32 positions, outer product and cos/sin in fp32.
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos = torch.cos(freqs).to(torch.float64).to(x.device)  # [T, D/2]
    sin = torch.sin(freqs).to(torch.float64).to(x.device)
    # rotary_embedding_ref: cos/sin repeated '... d -> ... 1 (2 d)'; rotate_half = cat(-x2, x1)
    cos = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    sin = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _silu_backprop(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # ttt_operation.py silu_backprop: dy * sigma * (1 + x * (1 - sigma))
    sigma = torch.sigmoid(x)
    return dy * sigma * (1 + x * (1 - sigma))


def _newton_schulz5(G: torch.Tensor) -> torch.Tensor:
    """ttt_operation.py zeropower_via_newtonschulz5 on G: [b, d, d'].

    Upstream casts G to bfloat16 (``X = G.bfloat16()``); this reference deliberately stays in float64.
    """
    X = G
    if G.size(1) > G.size(2):
        X = X.transpose(1, 2)
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)  # Frobenius norm per batch item
    for a, b, c in [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ]:
        A = X @ X.transpose(1, 2)
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(1) > G.size(2):
        X = X.transpose(1, 2)
    return X


def _block_causal_lact_swiglu(w0, w1, w2, q, k, v, lr0, lr1, lr2, chunk_size, use_muon, momentum, prenorm):
    """ttt_operation.py block_causal_lact_swiglu (prenorm=False) / prenorm_block_causal_lact_swiglu (prenorm=True).

    w0, w2: [b, dh, dk]; w1: [b, dv, dh]; q, k: [b, l, dk]; v: [b, l, dv]; lr*: [b, l, 1]; momentum: [b, l, 1] or
    None.  Returns [b, l, dv].  f(x) = w1 @ (silu(w0 @ x) * (w2 @ x)).
    """
    # norms of the initial fast weights, per output row (norm over dim=2, the input dim)
    w0_norm = w0.norm(dim=2, keepdim=True)
    w1_norm = w1.norm(dim=2, keepdim=True)
    w2_norm = w2.norm(dim=2, keepdim=True)
    # prenorm only: the un-normalised accumulators w*_main receive the updates; w* = renorm(w*_main) is applied.
    w0_main, w1_main, w2_main = w0, w1, w2
    if momentum is not None:
        dw0_momentum, dw1_momentum, dw2_momentum = torch.zeros_like(w0), torch.zeros_like(w1), torch.zeros_like(w2)

    q = q.transpose(1, 2)  # [b, dk, l]
    v = v.transpose(1, 2)  # [b, dv, l]
    output = torch.zeros_like(v)

    e_index = 0
    seq_len = k.shape[1]
    # NB upstream range: the last chunk (even when complete) is never used for an update, only applied below.
    for i in range(0, seq_len - chunk_size, chunk_size):
        s_index, e_index = i, i + chunk_size
        ki = k[:, s_index:e_index, :]  # [b, l, dk]
        vi = v[:, :, s_index:e_index]  # [b, dv, l]
        qi = q[:, :, s_index:e_index]  # [b, dk, l]
        lr0i, lr1i, lr2i = lr0[:, s_index:e_index, :], lr1[:, s_index:e_index, :], lr2[:, s_index:e_index, :]

        # apply the current fast weights to the queries of this chunk (apply, then update)
        h = torch.bmm(w2, qi)
        gate = F.silu(torch.bmm(w0, qi))
        output[:, :, s_index:e_index] = torch.bmm(w1, gate * h)

        # forward with keys, then manual backward of the dot-product loss -<f(k), v>
        gate_before_act = torch.bmm(w0, ki.transpose(1, 2))  # [b, dh, l]
        hidden_before_mul = torch.bmm(w2, ki.transpose(1, 2))  # [b, dh, l]
        hidden = F.silu(gate_before_act) * hidden_before_mul
        dhidden = torch.bmm(w1.transpose(1, 2), vi)  # [b, dh, l]
        dhidden_before_mul = dhidden * F.silu(gate_before_act)
        dgate = dhidden * hidden_before_mul
        dgate_before_act = _silu_backprop(dgate, gate_before_act)

        # per-token learning rates scale the token axis of each outer-product update
        dw1 = torch.bmm(vi, hidden.transpose(1, 2) * lr1i)  # [b, dv, dh]
        dw0 = torch.bmm(dgate_before_act, ki * lr0i)  # [b, dh, dk]
        dw2 = torch.bmm(dhidden_before_mul, ki * lr2i)  # [b, dh, dk]

        if momentum is not None:
            # chunk-mean of the sigmoid gate, [b, 1, 1]; momentum buffers hold the PRE-muon update
            m_i = momentum[:, s_index:e_index, :].mean(dim=1, keepdim=True)
            dw0 = dw0 + dw0_momentum * m_i
            dw1 = dw1 + dw1_momentum * m_i
            dw2 = dw2 + dw2_momentum * m_i
            dw0_momentum, dw1_momentum, dw2_momentum = dw0, dw1, dw2

        if use_muon:
            dw1 = _newton_schulz5(dw1)
            dw0 = _newton_schulz5(dw0)
            dw2 = _newton_schulz5(dw2)

        # post-norm: w = renorm(w + dw); pre-norm: w_main += dw; w = renorm(w_main)
        w0_main, w1_main, w2_main = w0_main + dw0, w1_main + dw1, w2_main + dw2
        w0 = w0_main / (w0_main.norm(dim=2, keepdim=True) + 1e-5) * w0_norm
        w1 = w1_main / (w1_main.norm(dim=2, keepdim=True) + 1e-5) * w1_norm
        w2 = w2_main / (w2_main.norm(dim=2, keepdim=True) + 1e-5) * w2_norm
        if not prenorm:
            w0_main, w1_main, w2_main = w0, w1, w2

    # last chunk: apply only
    qi = q[:, :, e_index:seq_len]
    h = torch.bmm(w2, qi)
    gate = F.silu(torch.bmm(w0, qi))
    output[:, :, e_index:seq_len] = torch.bmm(w1, gate * h)
    return output.transpose(1, 2)


def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size) -> torch.Tensor:
    """flash_attn_func(causal=True, window_size=(W-1, 0)) on [B, T, H, d]: query i sees keys i-W < j <= i."""
    T, d = q.shape[1], q.shape[-1]
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    allowed = j <= i
    if window_size is not None:
        allowed = allowed & (j > i - window_size)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def _lact_layer(p: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """layer_lact_swiglu.py LaCTSWIGLULayer.forward; p holds 'attn.*' params with the prefix stripped."""
    B, T, D = x.shape
    nh_attn, nh_fw = cfg["num_attn_heads"], cfg["num_lact_heads"]
    head_dim = D // nh_attn

    q, k, v = F.linear(x, p["qkv.weight"], p.get("qkv.bias")).chunk(3, dim=-1)
    if cfg["attn_qk_norm"]:
        # RMSNorm(hidden_size) over the full hidden dim, fla default eps 1e-5 (not config.norm_eps)
        q, k = _rms_norm(q, p["q_norm.weight"], 1e-5), _rms_norm(k, p["k_norm.weight"], 1e-5)
    # _rescale_qk: per-channel affine on the (normed) q, k; fast_v is the raw v
    fast_q = q * p["qk_scale"][:, 0] + p["qk_offset"][:, 0]
    fast_k = k * p["qk_scale"][:, 1] + p["qk_offset"][:, 1]
    fast_v = v

    # sliding-window attention branch, RoPE over attention heads
    theta = cfg["rope_theta"]
    qa = _rope(q.reshape(B, T, nh_attn, head_dim), theta)
    ka = _rope(k.reshape(B, T, nh_attn, head_dim), theta)
    o = _window_attention(qa, ka, v.reshape(B, T, nh_attn, head_dim), cfg["window_size"]).reshape(B, T, D)

    # TTT branch: 'b s (n_h d) -> (b n_h) s d'
    def to_fw(t):
        return t.reshape(B, T, nh_fw, -1).transpose(1, 2).reshape(B * nh_fw, T, -1)

    def from_fw(t):
        return t.reshape(B, nh_fw, T, -1).transpose(1, 2).reshape(B, T, -1)

    fast_q, fast_k, fast_v = to_fw(fast_q), to_fw(fast_k), to_fw(fast_v)
    if cfg["qkv_silu"]:
        fast_q, fast_k = F.silu(fast_q), F.silu(fast_k)
        if not cfg["no_v_silu"]:
            fast_v = F.silu(fast_v)
    # l2-norm per fast-weight head FIRST, then RoPE
    fast_q, fast_k = _l2_norm(fast_q), _l2_norm(fast_k)
    if not cfg["ttt_nope"]:
        # RoPE is applied with the ATTENTION head split (num_attn_heads x head_dim), not the fw-head split.
        fast_q = to_fw(_rope(from_fw(fast_q).reshape(B, T, nh_attn, head_dim), theta).reshape(B, T, D))
        fast_k = to_fw(_rope(from_fw(fast_k).reshape(B, T, nh_attn, head_dim), theta).reshape(B, T, D))

    if cfg["w0_w2_low_rank"] > 0:
        # LowRankFastWeight.forward with add_identity=True: w_left @ w_right + 0.5 * eye(d_h, d_in)
        def low_rank(name):
            W = p[f"{name}.w_left"] @ p[f"{name}.w_right"]
            return W + 0.5 * torch.eye(W.shape[1], W.shape[2], dtype=W.dtype, device=W.device)[None]

        w0, w2 = low_rank("w0"), low_rank("w2")
    else:
        w0, w2 = p["w0"], p["w2"]
    w0, w1, w2 = w0.repeat(B, 1, 1), p["w1"].repeat(B, 1, 1), w2.repeat(B, 1, 1)  # [nh, ...] -> [b*nh, ...]

    assert cfg["lr_parameterization"] == "mamba" and cfg["lr_dim"] == 1
    base_lr_inv = 0.001 + math.log(-math.expm1(-0.001))  # inv_softplus(base_lr=0.001)
    lr = F.softplus(F.linear(x, p["lr_proj.weight"], p["lr_proj.bias"]) + base_lr_inv)
    lr0, lr1, lr2 = to_fw(lr).chunk(3, dim=-1)  # per head: [lr_w0, lr_w1, lr_w2], each [b*nh, s, 1]

    momentum = None
    if cfg["use_momentum"]:
        momentum = to_fw(torch.sigmoid(F.linear(x, p["momentum_proj.0.weight"], p["momentum_proj.0.bias"])))

    fw_x = _block_causal_lact_swiglu(
        w0, w1, w2, fast_q, fast_k, fast_v, lr0, lr1, lr2,
        chunk_size=cfg["lact_chunk_size"], use_muon=cfg["use_muon"], momentum=momentum, prenorm=cfg["ttt_prenorm"],
    )  # fmt: skip

    # ttt_norm: RMSNorm(fw_head_dim) with fla default eps 1e-5 (not config.norm_eps)
    ttt = _rms_norm(fw_x, p["ttt_norm.weight"], 1e-5)
    if cfg["learnable_ttt_scale"]:
        ttt = ttt * to_fw(F.silu(F.linear(x, p["ttt_scale_proj.weight"], p["ttt_scale_proj.bias"])))
    o = o + from_fw(ttt)
    return F.linear(o, p["o_proj.weight"])


def reference_lact_logits(
    state_dict: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B,T,V], final-normed hidden [B,T,D]) of upstream LaCTForCausalLM, computed in float64."""
    cfg = {**_DEFAULTS, **config}
    assert cfg["ttt_loss_type"] == "dot_product" and cfg["hidden_act"] == "swish"
    sd = {name: t.detach().to(torch.float64) for name, t in state_dict.items()}
    eps = cfg["norm_eps"]

    # modeling_lact.py LaCTModel.forward
    h = F.embedding(input_ids, sd["model.embeddings.weight"])
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        attn = {name[len(pre + "attn.") :]: t for name, t in sd.items() if name.startswith(pre + "attn.")}
        # LaCTBlock.forward: pre-norm residual blocks (fused prenorm RMSNorm == add then norm)
        h = h + _lact_layer(attn, cfg, _rms_norm(h, sd[pre + "attn_norm.weight"], eps))
        m = _rms_norm(h, sd[pre + "mlp_norm.weight"], eps)
        # fla GatedMLP: down(silu(gate(x)) * up(x))
        m = F.silu(F.linear(m, sd[pre + "mlp.gate_proj.weight"])) * F.linear(m, sd[pre + "mlp.up_proj.weight"])
        h = h + F.linear(m, sd[pre + "mlp.down_proj.weight"])
    h = _rms_norm(h, sd["model.norm.weight"], eps)

    # LaCTForCausalLM.forward: lm_head (tied to the embeddings only if no lm_head.weight is given)
    lm_head = sd.get("lm_head.weight", sd["model.embeddings.weight"])
    return F.linear(h, lm_head), h
