"""Slow, obviously correct references for the ops, used as oracles by the tests.

They loop over time one token at a time, write the recurrence exactly as it is defined, and compute in whatever
dtype they are given (the tests use float64). Nothing in the models calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gated) delta rule, token by token.

    For each t (per batch and head), with ``S`` the ``[K, V]`` state::

        S = exp(g_t) * S                                  (only if g is given)
        S = S + beta_t * k_t (v_t - S^T k_t)^T
        o_t = scale * S^T q_t

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        beta: ``[B, T, H]``.
        g: optional ``[B, T, H]`` log decay.
        scale: defaults to ``K ** -0.5``.
        initial_state: optional ``[B, H, K, V]``; zeros when ``None``.

    Returns:
        ``(o, final_state)``: ``[B, T, H, V]`` and ``[B, H, K, V]``, in the inputs' dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    S = initial_state.clone() if initial_state is not None else q.new_zeros(B, H, K, V)
    outputs = []
    for t in range(T):
        if g is not None:
            S = torch.exp(g[:, t])[:, :, None, None] * S
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t]  # [B, H, K], [B, H, V], [B, H, K]
        prediction = torch.einsum("bhkv,bhk->bhv", S, k_t)  # S^T k_t
        delta = beta[:, t, :, None] * (v_t - prediction)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, delta)
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, S


def naive_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    cache: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution, one token at a time through a rolling window of the last ``W`` inputs.

    Args:
        x: ``[B, T, D]``.
        weight: ``[D, 1, W]``.
        bias: optional ``[D]``.
        activation: ``"silu"`` / ``"swish"`` or ``None``.
        cache: optional ``[B, D, W]`` window before ``x`` (newest last); zeros when ``None``.

    Returns:
        ``(y, window)``: ``[B, T, D]`` and the ``[B, D, W]`` window after the last token.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    window = cache.clone() if cache is not None else x.new_zeros(B, D, W)
    outputs = []
    for t in range(T):
        window = torch.cat([window[..., 1:], x[:, t, :, None]], dim=-1)
        y_t = (window * weight[:, 0]).sum(-1)
        if bias is not None:
            y_t = y_t + bias
        if activation is not None:
            y_t = F.silu(y_t)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), window
