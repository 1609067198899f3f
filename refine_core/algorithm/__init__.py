"""REFINE's algorithm as pure tensor functions: position selection, rewards, GRPO advantages, PPO-clip loss (spec §2).

Nothing here touches a model or does I/O; the trainer feeds these functions entropies, hidden states and log-probs.
"""

from refine_core.algorithm.grpo import (
    KL_KINDS,
    SINGLETON_MODES,
    PolicyLossTerms,
    group_advantages,
    kl_penalty,
    policy_loss_stats,
    ppo_clip_token_losses,
    token_mean,
)
from refine_core.algorithm.rewards import (
    REWARD_ALIASES,
    REWARD_KINDS,
    RewardBreakdown,
    canonical_reward_kind,
    compute_rewards,
    cosine_reward,
    exact_match_reward,
)
from refine_core.algorithm.selection import SELECTION_MODES, SelectedPositions, select_positions, smooth_entropy

__all__ = [
    "KL_KINDS",
    "REWARD_ALIASES",
    "REWARD_KINDS",
    "SELECTION_MODES",
    "SINGLETON_MODES",
    "PolicyLossTerms",
    "RewardBreakdown",
    "SelectedPositions",
    "canonical_reward_kind",
    "compute_rewards",
    "cosine_reward",
    "exact_match_reward",
    "group_advantages",
    "kl_penalty",
    "policy_loss_stats",
    "ppo_clip_token_losses",
    "select_positions",
    "smooth_entropy",
    "token_mean",
]
