"""GRPO advantages and the PPO-clip policy loss on rollout tokens (spec §2 steps 5-6).

Typical use for one micro-batch of rollouts inside a mini-batch of ``total`` response tokens::

    adv = group_advantages(rewards, group_ids)                               # once per step, [N]
    terms = ppo_clip_token_losses(logp, old_logp, adv[idx])                  # [n, k]
    loss = token_mean(terms.losses, mask, total_tokens=total)                # sums to the mini-batch token-mean
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINGLETON_MODES = ("zero", "official")
KL_KINDS = ("k1", "k2", "k3")

def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 and fp16 are promoted, spec §10.18); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))



def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, singleton: str = "zero"
) -> torch.Tensor:
    """GRPO z-score of each reward within its group: (R - mean_U) / (std_U + eps) (spec §2 step 5).

    The std is unbiased (n - 1). A group whose rewards are all equal gets advantage 0 exactly (computing its mean
    can be off by an ulp, which divided by eps alone would give noise of order 1).

    Args:
        rewards: ``[N]`` scalar reward per rollout.
        group_ids: ``[N]`` integer group id per rollout (the document's uid with G = 1, spec §10.2), any order.
        eps: added to the std.
        singleton: a group of one rollout has no spread. ``"zero"`` (default) gives it advantage 0, so it adds no
            policy gradient; ``"official"`` follows verl's ``compute_grpo_outcome_advantage``, which uses mean 0 and
            std 1 there, i.e. A = R / (1 + eps) ≈ R.

    Returns:
        ``[N]`` float32 advantages.
    """
    if singleton not in SINGLETON_MODES:
        raise ValueError(f"unknown singleton mode {singleton!r}; use one of {SINGLETON_MODES}.")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}."
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}.")
    values = _wide(rewards.detach())
    if not bool(torch.isfinite(values).all()):
        raise ValueError("rewards contain NaN or inf; check the reward inputs (hidden states, tokens).")
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [N] dense group index
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.bincount(inverse, minlength=num_groups).float()  # [U]
    sums = values.new_zeros(num_groups).index_add_(0, inverse, values)
    deviation = values - (sums / counts)[inverse]  # [N]
    squares = values.new_zeros(num_groups).index_add_(0, inverse, deviation.square())
    std = (squares / (counts - 1).clamp_min(1)).sqrt()  # [U]; unbiased, spec §2 step 5
    advantages = deviation / (std[inverse] + eps)

    high = values.new_full((num_groups,), float("-inf")).scatter_reduce(0, inverse, values, "amax")
    low = values.new_full((num_groups,), float("inf")).scatter_reduce(0, inverse, values, "amin")
    advantages = torch.where((high == low)[inverse], 0.0, advantages)

    alone = (counts == 1)[inverse]
    if singleton == "official":
        # verl: a group of size 1 gets mean 0, std 1.
        advantages = torch.where(alone, values / (1.0 + eps), advantages)
    else:
        advantages = torch.where(alone, 0.0, advantages)
    return advantages


@dataclass(frozen=True)
class PolicyLossTerms:
    """Per-token PPO-clip losses and what happened at each token.

    Attributes:
        losses: ``[N, k]`` float32, differentiable w.r.t. ``logp``.
        ratio: ``[N, k]`` float32, detached, exp(clamped log-ratio).
        clipped: ``[N, k]`` bool, the clipped term was the max (verl's ``pg_clipfrac`` condition).
        dual_clipped: ``[N, k]`` bool, A < 0 and the dual-clip bound was the min (verl's ``pg_clipfrac_lower``).
    """

    losses: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor


def ppo_clip_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    log_ratio_clamp: float = 20.0,
) -> PolicyLossTerms:
    """Dual-clip PPO loss per response token (spec §2 step 6.3, verl ``compute_policy_loss``).

    ρ = exp(clamp(logp - old_logp, ±log_ratio_clamp)); ℓ = max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)); where A < 0,
    ℓ = min(ℓ, dual_clip·(-A)). Gradients flow only through ``logp``: ``old_logp`` and ``advantages`` are detached.

    Args:
        logp: ``[N, k]`` log-probs of the rollout tokens under the current policy (with grad).
        old_logp: ``[N, k]`` log-probs under the policy that generated them.
        advantages: ``[N]`` (broadcast over the k tokens) or ``[N, k]``.
        clip_eps: ε.
        dual_clip: c > 1, the dual-clip bound for negative advantages; ``None`` disables it.
        log_ratio_clamp: bound on |logp - old_logp| before the exp.

    Returns:
        :class:`PolicyLossTerms` with ``[N, k]`` fields.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape:
        raise ValueError(f"logp and old_logp must both be [N, k], got {tuple(logp.shape)} and {tuple(old_logp.shape)}.")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must be [N] or [N, k] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}."
        )
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}.")
    adv = _wide(advantages.detach())
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    log_ratio = (_wide(logp) - _wide(old_logp.detach())).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    losses = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is None:
        dual_clipped = torch.zeros_like(clipped)
    else:
        bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (losses > bound)
        losses = torch.where(adv < 0, torch.minimum(losses, bound), losses)
    return PolicyLossTerms(losses=losses, ratio=ratio.detach(), clipped=clipped, dual_clipped=dual_clipped)


def token_mean(
    values: torch.Tensor, mask: torch.Tensor, total_tokens: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """sum(values · mask) / total_tokens: a token-mean whose denominator the caller may fix (spec §2 step 6.3).

    Why pass the denominator: the official code takes the token-mean of each micro-batch of 2 rollouts and divides
    by the number of micro-batches, which equals the mini-batch token-mean only when every micro-batch holds the
    same number of tokens. Dividing each micro-batch's sum by the token count of the whole mini-batch makes the
    summed micro-batch losses (and gradients) exactly the mini-batch token-mean, whatever the micro-batch size.

    Args:
        values: ``[N, k]`` per-token values.
        mask: ``[N, k]`` 0/1 or bool; masked entries are ignored even if NaN.
        total_tokens: the denominator; ``None`` means ``mask.sum()`` (0 tokens then gives 0).

    Returns:
        A scalar tensor (float32 for float32 or lower-precision inputs).
    """
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match values {tuple(values.shape)}.")
    keep = mask != 0
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    if total_tokens is None:
        return total.float() / keep.sum().clamp_min(1)
    if float(total_tokens) <= 0:
        raise ValueError(f"total_tokens must be > 0, got {float(total_tokens)}; pass the mini-batch's token count.")
    return total.float() / total_tokens


def policy_loss_stats(terms: PolicyLossTerms, mask: torch.Tensor) -> dict[str, float]:
    """Masked diagnostics of a PPO loss: clip fractions and ratio summary (NaN ratios if the mask is empty).

    Args:
        terms: the output of :func:`ppo_clip_token_losses`.
        mask: ``[N, k]`` 0/1 or bool response mask.

    Returns:
        ``clip_frac``, ``dual_clip_frac``, ``ratio_mean``, ``ratio_max``, ``ratio_min``, ``approx_kl``
        (mean of -log ρ, verl's ``ppo_kl``).
    """
    keep = mask != 0
    if not bool(keep.any()):
        nan = float("nan")
        return {
            "clip_frac": 0.0,
            "dual_clip_frac": 0.0,
            "ratio_mean": nan,
            "ratio_max": nan,
            "ratio_min": nan,
            "approx_kl": nan,
        }
    ratio = terms.ratio.detach()[keep]
    return {
        "clip_frac": float(terms.clipped[keep].float().mean()),
        "dual_clip_frac": float(terms.dual_clipped[keep].float().mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_max": float(ratio.max()),
        "ratio_min": float(ratio.min()),
        "approx_kl": float(-ratio.log().mean()),
    }


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate to a reference policy (off in every paper run, spec §2 step 6.3; verl ``kl_penalty``).

    ``k1`` = logp - ref; ``k2`` = ½(logp - ref)²; ``k3`` (verl ``low_var_kl``) = exp(ref - logp) - (ref - logp) - 1,
    clamped to [-10, 10]. Gradients flow only through ``logp``.

    Args:
        logp: ``[N, k]`` current log-probs.
        ref_logp: ``[N, k]`` reference log-probs.
        kind: one of ``KL_KINDS``.

    Returns:
        ``[N, k]`` float32.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_KINDS}.")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must match logp {tuple(logp.shape)}.")
    diff = _wide(logp) - _wide(ref_logp.detach())
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    # Clamping the log-ratio first (as newer verl does) changes no value, since |x| > 20 already gives k3 > 10, but
    # keeps exp() finite so the backward pass of the outer clamp cannot produce 0·inf = NaN.
    log_ratio = (-diff).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
