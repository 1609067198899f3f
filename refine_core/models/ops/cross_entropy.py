"""Token-level cross-entropy and predictive entropy, computed in float32.

:func:`cross_entropy` uses fla's fused Triton kernel on CUDA when fla is available (it reads bf16 logits and
accumulates in float32 without materialising a float32 copy), and ``F.cross_entropy`` on float32 logits elsewhere.
:func:`token_entropy` is plain PyTorch everywhere, chunked over rows to bound its float32 working set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refine_core.models.ops import fla_backend
from refine_core.models.ops.norm import compute_dtype

_REDUCTIONS = ("mean", "sum", "none")
# token_entropy converts at most this many logits to float32 at a time (64 MiB per float32 temporary)
_ENTROPY_CHUNK_ELEMENTS = 1 << 24


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``labels`` under ``softmax(logits)``, in float32 (float64 for float64 logits).

    Labels are taken as given (no shifting). ``"mean"`` averages over the tokens whose label is not
    ``ignore_index`` (NaN if there are none, like ``F.cross_entropy``).

    Args:
        logits: ``[..., V]``.
        labels: ``[...]`` integer class ids, or ``ignore_index``.
        ignore_index: label value that contributes no loss and no gradient.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per-token losses (0 at ignored positions) for ``"none"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels must be logits.shape[:-1]={tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if logits.is_cuda and logits.dtype != torch.float64 and fla_backend.fla_enabled():
        losses = fla_backend.fla_cross_entropy(flat_logits, flat_labels, ignore_index)
        if reduction == "none":
            return losses.reshape(labels.shape)
        total = losses.sum()
        return total if reduction == "sum" else total / (flat_labels != ignore_index).sum()
    losses = F.cross_entropy(
        flat_logits.to(compute_dtype(logits.dtype)), flat_labels, ignore_index=ignore_index, reduction=reduction
    )
    return losses.reshape(labels.shape) if reduction == "none" else losses


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` at every position: ``logsumexp(l) - sum(softmax(l) * l)``.

    The leading dimensions are flattened to rows and processed in chunks of at most ``2**24 // V`` rows, so only
    one chunk is held in float32 at a time: a ``[B, 16384, 32000]`` bf16 input needs a few 64 MiB temporaries,
    never a full float32 copy (4 GiB per sequence). Differentiable.

    Args:
        logits: ``[..., V]``, any float dtype.

    Returns:
        ``[...]`` float32 (float64 for float64 logits).
    """
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    cd = compute_dtype(logits.dtype)
    step = max(1, _ENTROPY_CHUNK_ELEMENTS // V)
    pieces = []
    for start in range(0, rows.shape[0], step):
        x = rows[start : start + step].to(cd)
        log_p = torch.log_softmax(x, dim=-1)
        # -sum(p log p), with log p = x - lse, equals lse - sum(p x)
        pieces.append(-(log_p.exp() * log_p).sum(-1))
    entropy = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=cd)
    return entropy.reshape(logits.shape[:-1])
