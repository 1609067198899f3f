"""The (gated) delta rule: PyTorch chunked and recurrent implementations, and the public dispatcher.

Recurrence, per batch element and head, with the state ``S`` of shape ``[K, V]`` (key-first, as fla's DeltaNet)::

    S_t = exp(g_t) * S_{t-1}                            (gated variant only; g_t <= 0 is a log decay)
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T
    o_t = scale * S_t^T q_t

This is fla 0.6.0's ``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` (``fla/ops/delta_rule/``) and
``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` (``fla/ops/gated_delta_rule/``), whose pure-torch
references are ``delta_rule_recurrence`` and ``naive_recurrent_gated_delta_rule`` in the ``naive.py`` files there.

Chunked form (WY / UT transform). Inside a chunk of ``C`` tokens, with ``G_t`` the inclusive cumulative sum of ``g``
from the chunk start (0 without gating), ``gamma_t = exp(G_t)`` and ``S0`` the state at the chunk start, the state
corrections ``delta_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`` solve the unit-lower-triangular system::

    (I + A) delta = beta*V - (beta*gamma*K) S0,     A[t, s] = beta_t (k_t . k_s) exp(G_t - G_s)   for s < t

so ``delta = U - W S0`` with ``U = (I + A)^-1 beta*V`` and ``W = (I + A)^-1 beta*gamma*K`` (both need no state and
are computed for all chunks at once). Then::

    O         = (gamma*Q) S0 + (Q K^T * exp(G_t - G_s) for s <= t) delta
    S_{chunk} = exp(G_C) S0 + (exp(G_C - G_s) * K)^T delta

Only the last two matrix products per chunk depend on the carried state, so the Python loop runs over chunks, not
tokens. Decays enter only as differences ``G_t - G_s`` with ``s <= t`` inside one chunk (never ``exp(-G)``), and the
upper triangle is masked to -inf *before* ``exp``, so nothing overflows and no inf/NaN reaches the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refine_core.models.ops import fla_backend
from refine_core.models.ops.norm import compute_dtype, l2_normalize

_MODES = ("auto", "chunk", "recurrent")
# fla's layers switch to the recurrent kernel for at most this many new tokens (fla/layers/delta_net.py)
_RECURRENT_MAX_LEN = 64


def check_delta_rule_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B={B}, T={T}, H={H}, V], got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B={B}, T={T}, H={H}], got {tuple(beta.shape)}")
    if g is not None and g.shape != q.shape[:3]:
        raise ValueError(f"g must be [B={B}, T={T}, H={H}], got {tuple(g.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B={B}, H={H}, K={K}, V={v.shape[-1]}] (key-first), "
            f"got {tuple(initial_state.shape)}"
        )


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None,
    use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast to the compute dtype, l2-normalise q/k if asked (as fla, before scaling), and fold the scale into q."""
    cd = compute_dtype(q.dtype)
    q, k, v, beta = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    return q, k, v, beta, (g.to(cd) if g is not None else None)


def chunk_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY-form) delta rule in PyTorch, differentiable by autograd; see the module docstring for the math.

    Arguments and returns as :func:`delta_rule`. ``T`` need not be a multiple of ``chunk_size``: the tail is padded
    with ``beta = 0, k = 0, g = 0``, which leaves the state untouched. Computes in float32 (float64 for float64
    inputs); the final state is in that dtype.
    """
    check_delta_rule_inputs(q, k, v, beta, g, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g, scale, use_qk_l2norm)

    C = chunk_size
    pad = -T % C
    N = (T + pad) // C

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]``, zero-padded at the end of time."""
        x = x.movedim(1, 2)  # [B, H, T, *D]
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta)  # [B,H,N,C,K] x2, [B,H,N,C,V], [B,H,N,C]

    kk = k @ k.transpose(-1, -2)  # [B, H, N, C, C]
    qk = q @ k.transpose(-1, -2)  # [B, H, N, C, C]
    beta_k = beta[..., None] * k  # [B, H, N, C, K]
    if g is None:
        a = (beta[..., None] * kk).tril(-1)
        p = qk.tril()
        w_rhs, q_start, k_end, chunk_decay = beta_k, q, k, None
    else:
        G = chunked(g).cumsum(-1)  # [B, H, N, C]
        lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [B, H, N, C, C]
        a = (beta[..., None] * kk * decay).tril(-1)
        p = qk * decay
        gamma = G.exp()[..., None]  # [B, H, N, C, 1] decay from the chunk start
        w_rhs = beta_k * gamma
        q_start = q * gamma  # queries read the chunk-start state decayed to their position
        k_end = k * (G[..., -1:] - G).exp()[..., None]  # keys decayed to the chunk end
        chunk_decay = G[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    # one triangular solve for both right-hand sides; the unit diagonal of I + A is implicit
    uw = torch.linalg.solve_triangular(
        a, torch.cat([beta[..., None] * v, w_rhs], dim=-1), upper=False, unitriangular=True
    )
    u, w = uw.split([V, K], dim=-1)  # [B, H, N, C, V], [B, H, N, C, K]

    state = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(B, H, K, V)  # [B, H, K, V]
    outputs = []
    for n in range(N):
        # the products reuse state and delta, which autograd saves once each (stacking them would copy both)
        delta = u[:, :, n] - w[:, :, n] @ state  # [B, H, C, V]
        outputs.append(q_start[:, :, n] @ state + p[:, :, n] @ delta)  # [B, H, C, V]
        update = k_end[:, :, n].transpose(-1, -2) @ delta  # [B, H, K, V]
        state = state + update if chunk_decay is None else state * chunk_decay[:, :, n] + update
    o = torch.cat(outputs, dim=2) if outputs else v.new_zeros(B, H, 0, V)  # [B, H, N * C, V]
    o = o[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (state if output_final_state else None)


def recurrent_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token delta rule in PyTorch (vectorised over batch and heads), for decoding a few tokens.

    Arguments and returns as :func:`delta_rule`. Differentiable by autograd. Computes in float32 (float64 for
    float64 inputs); the final state is in that dtype.
    """
    check_delta_rule_inputs(q, k, v, beta, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g, scale, use_qk_l2norm)
    state = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(B, H, K, V)
    outputs = []
    for t in range(T):
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t, :, None, :]  # [B, H, 1, K]
        delta = beta[:, t, :, None] * (v[:, t] - (k_t @ state).squeeze(-2))  # [B, H, V]
        state = state + k_t.transpose(-1, -2) * delta[:, :, None, :]
        outputs.append((q[:, t, :, None, :] @ state).squeeze(-2))  # [B, H, V]
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    mode: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (gated) delta rule: fla's kernels on CUDA for bf16/fp16, the PyTorch implementations otherwise.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        beta: ``[B, T, H]``, already through the sigmoid (``2 * sigmoid`` for negative eigenvalues); 0 at padded
            positions, where it (with ``k = 0``) leaves the state untouched.
        g: optional ``[B, T, H]`` log-space decay (``<= 0``); ``None`` is plain DeltaNet, given is GatedDeltaNet.
        scale: query scale, default ``K ** -0.5``.
        initial_state: optional ``[B, H, K, V]`` float32 state (key-first, fla's DeltaNet layout).
        output_final_state: return the state after the last token.
        use_qk_l2norm: l2-normalise q and k first (fla's ``use_qk_l2norm_in_kernel``, eps 1e-6 inside the sqrt).
        mode: ``"recurrent"`` (token loop / fla ``fused_recurrent_*``), ``"chunk"`` (chunked / fla ``chunk_*``), or
            ``"auto"``: recurrent when ``T <= 64`` and no gradient is needed, else chunked.
        chunk_size: chunk length of the chunked form (fla accepts 16, 32 or 64).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``v.dtype``; ``final_state`` is ``[B, H, K, V]`` (float32,
        or float64 for float64 inputs) when ``output_final_state``, else ``None``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not one of {_MODES}")
    check_delta_rule_inputs(q, k, v, beta, g, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, g, initial_state)
    )
    recurrent = mode == "recurrent" or (mode == "auto" and q.shape[1] <= _RECURRENT_MAX_LEN and not needs_grad)
    kwargs = {
        "scale": scale,
        "initial_state": initial_state,
        "output_final_state": output_final_state,
        "use_qk_l2norm": use_qk_l2norm,
    }
    if fla_backend.use_fla_delta_rule(q, k, v, gated=g is not None, recurrent=recurrent, needs_grad=needs_grad):
        return fla_backend.fla_delta_rule(q, k, v, beta, g, recurrent=recurrent, chunk_size=chunk_size, **kwargs)
    if recurrent:
        return recurrent_delta_rule_torch(q, k, v, beta, g, **kwargs)
    return chunk_delta_rule_torch(q, k, v, beta, g, chunk_size=chunk_size, **kwargs)
