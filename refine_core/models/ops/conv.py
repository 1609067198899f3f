"""Depthwise causal short convolution with a decoding cache, as fla's ``ShortConvolution``, in plain PyTorch.

fla 0.6.0 (``fla/modules/causal_conv1d/ops.py``) computes ``y_t = act(bias + sum_j weight[:, 0, j] * x_{t-W+1+j})``
in float32 and stores ``y`` in ``x.dtype``. Its cache (``conv_state``) is ``[N, D, W]`` and holds the last ``W``
inputs, oldest first: ``cache[..., W-1]`` is the newest token (``causal_conv1d_states_fwd_kernel`` writes it, and
``causal_conv1d_update_kernel`` shifts it left by one and appends the new token before convolving all ``W``
columns). Slot 0 is never read by the next step but is kept for layout compatibility with fla checkpoints/caches.
This module uses exactly that layout, so prefill followed by token-by-token decoding equals the full sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refine_core.models.ops import fla_backend
from refine_core.models.ops.norm import compute_dtype

_CONV_ACTIVATIONS = ("silu", "swish", None)


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    cache: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution over time, optionally continuing from a cache.

    Args:
        x: ``[B, T, D]`` input.
        weight: ``[D, 1, W]`` kernel (``nn.Conv1d(D, D, W, groups=D)`` layout, as fla's ``ShortConvolution.weight``).
        bias: optional ``[D]``.
        activation: ``"silu"`` / ``"swish"`` (the same) or ``None``.
        cache: optional ``[B, D, W]``, the last ``W`` inputs before ``x``, newest at ``[..., W-1]``; zeros (what a
            fresh sequence sees) when ``None``. It is not modified.
        output_final_state: return the cache after ``x`` (``[B, D, W]``, in ``x.dtype``), else ``None``.

    Returns:
        ``(y, new_cache)``: ``y`` is ``[B, T, D]`` in ``x.dtype``.
    """
    if activation not in _CONV_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {_CONV_ACTIVATIONS}")
    B, T, D = x.shape
    if weight.dim() != 3 or weight.shape[0] != D or weight.shape[1] != 1:
        raise ValueError(f"weight must be [D={D}, 1, W], got {tuple(weight.shape)}")
    W = weight.shape[-1]
    if cache is not None and cache.shape != (B, D, W):
        raise ValueError(f"cache must be [B={B}, D={D}, W={W}], got {tuple(cache.shape)}")

    if T > 1 and fla_backend.use_fla_fused(x):
        # One Triton kernel forward and backward instead of the float32 transposes, cat and conv1d below. Decoding
        # (T == 1) stays here: fla's update kernel writes the cache in place, ours returns a new one.
        return fla_backend.fla_short_conv(x, weight, bias, activation, cache, output_final_state)
    cd = compute_dtype(x.dtype)
    past = cache.to(cd) if cache is not None else x.new_zeros(B, D, W, dtype=cd)
    buf = torch.cat([past, x.to(cd).transpose(1, 2)], dim=-1)  # [B, D, W + T]
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    if T == 1:
        # decode: a multiply-add over the W newest inputs is much cheaper than a conv1d launch
        y = (buf[..., 1:] * w[:, 0]).sum(-1, keepdim=True)  # [B, D, 1]
        if b is not None:
            y = y + b[:, None]
    else:
        # the first column is the input just before the window of the first output; conv1d never reads it
        y = F.conv1d(buf[..., 1:], w, b, groups=D)  # [B, D, T]
    if activation is not None:
        y = F.silu(y)
    # contiguous: a view would keep the whole [B, D, W + T] buffer alive
    new_cache = buf[..., -W:].to(x.dtype).contiguous() if output_final_state else None
    return y.transpose(1, 2).to(x.dtype), new_cache


def conv_cache_at(x: torch.Tensor, cache: torch.Tensor | None, cuts: torch.Tensor, width: int) -> torch.Tensor:
    """The cache :func:`short_conv` would return after reading only ``x[b, :cuts[b, j]]``, for every row and cut.

    That cache is the last ``width`` inputs before the cut, oldest first; inputs before the start of ``x`` come from
    ``cache`` (zeros when ``None``). A gather, differentiable with respect to ``x`` (REFINE's branch rollouts
    continue from these caches with gradients into the document pass).

    Args:
        x: ``[B, T, D]`` convolution input.
        cache: ``[B, D, W]`` cache before ``x``, or ``None``.
        cuts: ``[B, M]`` positions in ``[0, T]``.
        width: the kernel width ``W``.

    Returns:
        ``[B * M, D, W]`` in ``x.dtype``, rows ordered ``(b, j)``.
    """
    B, T, D = x.shape
    M = cuts.shape[1]
    index = cuts.to(x.device, torch.long)[..., None] - width + torch.arange(width, device=x.device)  # [B, M, W]
    from_x = x.gather(1, index.clamp(min=0).reshape(B, M * width, 1).expand(B, M * width, D))
    past = cache.transpose(1, 2).to(x.dtype) if cache is not None else x.new_zeros(B, width, D)
    from_past = past.gather(1, (index + width).clamp(0, width - 1).reshape(B, M * width, 1).expand(B, M * width, D))
    window = torch.where((index >= 0).reshape(B, M * width, 1), from_x, from_past)  # [B, M * W, D]
    return window.view(B * M, width, D).transpose(1, 2).contiguous()
