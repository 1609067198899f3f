"""Next-token-prediction loss, pad-masked and computed in chunks so that ``[B, T, V]`` logits never exist at once.

For a 16K-token document and a 32K vocabulary the float32 logits alone are 2 GiB per sequence; the chunked loss
computes ``lm_head`` and the cross-entropy a slice of positions at a time and recomputes each slice in the
backward pass (activation checkpointing), so peak memory is one slice.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from refine_core.models.ops import cross_entropy

IGNORE_INDEX = -100


def ntp_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_pad: bool = True) -> torch.Tensor:
    """Labels ``[B, T-1]`` for predicting token ``t+1`` from position ``t``; ignored entries are ``-100``.

    With ``mask_pad`` a target counts only when both its input position and the target token are real, so a
    left-padded sequence has exactly the loss terms of the same sequence without padding. ``mask_pad=False``
    counts every position, which reproduces the official code's DeltaNet loss with pad tokens (spec §10.4).
    """
    labels = input_ids[:, 1:].clone()
    if mask_pad and attention_mask is not None:
        valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        labels = labels.masked_fill(~valid, IGNORE_INDEX)
    return labels


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def lm_loss_sum(
    hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Sum of cross-entropy over non-ignored labels, computing logits ``chunk_tokens`` positions at a time.

    Args:
        hidden_states: ``[B, T, D]`` final-normed states whose position ``t`` predicts ``labels[:, t]``.
        lm_head_weight: ``[V, D]``.
        labels: ``[B, T]`` with ``-100`` for ignored positions.
        chunk_tokens: positions per slice (over the flattened batch).

    Returns:
        A scalar float32 tensor: the summed loss (divide by the number of counted tokens for a mean).
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    for start in range(0, flat.numel(), chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], flat[start : start + chunk_tokens]
        # Skip an all-pad slice on the CPU; on the GPU asking would make the host wait for the queue, so the slice
        # is computed (its ignored labels add 0).
        if not y.is_cuda and not bool((y != IGNORE_INDEX).any()):
            continue
        if needs_grad and flat.numel() > chunk_tokens:
            total = total + checkpoint(_chunk_ce_sum, h, lm_head_weight, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, lm_head_weight, y)
    return total


def count_targets(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
