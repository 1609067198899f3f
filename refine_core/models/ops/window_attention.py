"""Causal sliding-window softmax attention over left-padded rows, continuing from a cached window of keys.

LaCT's attention branch (models-notes §2.2) lets token ``t`` see the keys at positions ``(t - W, t]`` (flash-attn's
``window_size=(W - 1, 0)``). Upstream calls flash-attn, which has no CPU build and no wheel here; this is the same
function on ``F.scaled_dot_product_attention``, exact on any device:

* Which key a query may see is decided by *positions*, not by indices, so left padding, a cached window of earlier
  keys in front of the new ones, and rows at different positions in one batch all work through one boolean mask.
* Long rows are cut into query blocks of ``W`` tokens; a block reads only the cached keys and the new keys of its
  own and the previous block, so the cost is ``O(T·W)``, not ``O(T²)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    window: int,
    prefix: int = 0,
    block: int | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over the valid keys within ``window`` positions behind it (itself included).

    Args:
        q: ``[B, T, H, d]`` queries of the new tokens.
        k, v: ``[B, P + T, H, d]``: ``P = prefix`` cached keys (e.g. the window kept by a decoding cache), then the
            keys of the same ``T`` new tokens as ``q``.
        q_pos, k_pos: ``[B, T]`` and ``[B, P + T]`` integer positions (the real-token index of each token).
        k_valid: ``[B, P + T]`` bool, False for padding and empty cache slots: never attended to.
        window: ``W``; query at position ``p`` sees keys at positions ``p - W < k_pos <= p``.
        prefix: ``P``.
        block: queries per block (default ``W``).

    Returns:
        ``[B, T, H, d]``. A query with no valid key in reach (a pad) gets its own value, never NaN.
    """
    B, T, H, d = q.shape
    if k.shape[1] != prefix + T or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"keys/values must be [B, prefix + T = {prefix + T}, ...], got {tuple(k.shape)}")
    block = block or window
    outputs = []
    for i0 in range(0, T, block):
        i1 = min(i0 + block, T)
        lo = max(0, i0 - window + 1)  # earlier new keys are out of every query's reach in this block
        keys = torch.cat([torch.arange(prefix, device=q.device), prefix + torch.arange(lo, i1, device=q.device)])
        kp, kv = k_pos.index_select(1, keys), k_valid.index_select(1, keys)
        qp = q_pos[:, i0:i1]
        allowed = kv[:, None, :] & (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] > qp[:, :, None] - window)
        # A pad query may see nothing: let every query see its own key so that no softmax row is empty.
        own = (keys[None, :] == prefix + torch.arange(i0, i1, device=q.device)[:, None])[None]
        allowed = allowed | own
        out = F.scaled_dot_product_attention(
            q[:, i0:i1].transpose(1, 2),
            k.index_select(1, keys).transpose(1, 2),
            v.index_select(1, keys).transpose(1, 2),
            attn_mask=allowed[:, None],
        )
        outputs.append(out.transpose(1, 2))
    return torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-NeoX rotary embedding of ``x`` ``[B, T, H, d]`` at integer ``positions`` ``[B, T]`` (fla's
    ``RotaryEmbedding``, non-interleaved: the two halves of each head rotate together; cos/sin from float32
    positions, then cast to ``x``'s dtype as fla does)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, d/2], float32 as fla builds its tables
    cos = torch.cos(freqs).to(x.dtype)[:, :, None, :].repeat(1, 1, 1, 2)
    sin = torch.sin(freqs).to(x.dtype)[:, :, None, :].repeat(1, 1, 1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin
