"""Rollout rewards: hidden-state cosine, token exact match, and their sum (spec §2 step 4).

Every rollout of k tokens is scored against the document's true next k tokens. All rewards are computed in float32
whatever the input dtype (spec §10.18: the official code takes the cosine in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REWARD_KINDS = ("cosine", "exact_match", "hybrid")
# The official code's names for the same rewards (`+algorithm.ttt_reward_type`).
REWARD_ALIASES = {"cosine_similarity": "cosine", "binary": "exact_match"}

def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 and fp16 are promoted, spec §10.18); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))



@dataclass(frozen=True)
class RewardBreakdown:
    """Per-rollout rewards; both parts are always computed so they can be logged whatever the reward.

    Attributes:
        reward: ``[N]`` float32, the reward used for the advantages.
        cosine: ``[N]`` float32, mean cosine similarity over the k positions.
        exact_match: ``[N]`` float32, fraction of the k tokens equal to the ground truth.
    """

    reward: torch.Tensor
    cosine: torch.Tensor
    exact_match: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Batch means for logging: ``reward_mean``, ``cosine_mean``, ``exact_match_mean``."""
        return {
            "reward_mean": float(self.reward.mean()),
            "cosine_mean": float(self.cosine.mean()),
            "exact_match_mean": float(self.exact_match.mean()),
        }


def canonical_reward_kind(kind: str) -> str:
    """Map a reward name (ours or the official alias) to one of ``REWARD_KINDS``; raise ``ValueError`` otherwise."""
    name = REWARD_ALIASES.get(kind, kind)
    if name not in REWARD_KINDS:
        known = sorted((*REWARD_KINDS, *REWARD_ALIASES))
        raise ValueError(f"unknown reward kind {kind!r}; use one of {known}.")
    return name


def cosine_reward(rollout_hidden: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over the k positions of cos(Hy_i, Hgt_i) (spec §2 step 4, ``cosine_similarity``).

    Args:
        rollout_hidden: ``[N, k, D]`` final-normed last-layer states after reading each rollout token.
        target_hidden: ``[N, k, D]`` the same states after reading each true token.

    Returns:
        ``[N]`` float32 in [-1, 1]. A zero vector has cosine 0 (eps 1e-8, as ``F.cosine_similarity``).
    """
    if rollout_hidden.dim() != 3 or rollout_hidden.shape != target_hidden.shape:
        raise ValueError(
            "rollout_hidden and target_hidden must both be [N, k, D], got "
            f"{tuple(rollout_hidden.shape)} and {tuple(target_hidden.shape)}."
        )
    cos = F.cosine_similarity(_wide(rollout_hidden), _wide(target_hidden), dim=-1, eps=1e-8)  # [N, k]
    return cos.mean(dim=-1)


def exact_match_reward(rollout_tokens: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where the rollout token equals the true token (spec §2 step 4, ``binary``).

    Args:
        rollout_tokens: ``[N, k]`` generated token ids.
        target_tokens: ``[N, k]`` true next-k token ids.

    Returns:
        ``[N]`` float32 in {0, 1/k, ..., 1}.
    """
    if rollout_tokens.dim() != 2 or rollout_tokens.shape != target_tokens.shape:
        raise ValueError(
            "rollout_tokens and target_tokens must both be [N, k], got "
            f"{tuple(rollout_tokens.shape)} and {tuple(target_tokens.shape)}."
        )
    return (rollout_tokens == target_tokens).float().mean(dim=-1)


def compute_rewards(
    kind: str,
    rollout_hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    rollout_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
) -> RewardBreakdown:
    """Score N rollouts with the configured reward; ``hybrid`` = cosine + exact match, range [-1, 2] (spec §2 step 4).

    Args:
        kind: ``"cosine"`` | ``"exact_match"`` | ``"hybrid"`` (or the official ``"cosine_similarity"``/``"binary"``).
        rollout_hidden: ``[N, k, D]``.
        target_hidden: ``[N, k, D]``.
        rollout_tokens: ``[N, k]``.
        target_tokens: ``[N, k]``.

    Returns:
        :class:`RewardBreakdown` with ``[N]`` float32 fields.
    """
    name = canonical_reward_kind(kind)
    if rollout_hidden.shape[:2] != rollout_tokens.shape:
        raise ValueError(
            f"hidden states {tuple(rollout_hidden.shape)} and tokens {tuple(rollout_tokens.shape)} disagree on [N, k]."
        )
    cosine = cosine_reward(rollout_hidden, target_hidden)
    exact = exact_match_reward(rollout_tokens, target_tokens)
    reward = {"cosine": cosine, "exact_match": exact, "hybrid": cosine + exact}[name]
    return RewardBreakdown(reward=reward, cosine=cosine, exact_match=exact)
