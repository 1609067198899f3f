"""GRPO advantages and the PPO-clip policy loss on rollout tokens (spec §2 steps 5-6).

Typical use for one micro-batch of rollouts inside a mini-batch of ``total`` response tokens::

    adv = group_advantages(rewards, group_ids)                               # once per step, [N]
    terms = ppo_clip_token_losses(logp, old_logp, adv[idx])                  # [n, k]
    loss = token_mean(terms.losses, mask, total_tokens=total)                # sums to the mini-batch token-mean

Every option of the official verl trainer (``core_algos.py`` of verl 0.5, which ReFINE forks) is here under its
own name: ``norm_adv_by_std_in_grpo`` (:func:`group_advantages`, ``norm_by_std``), ``clip_ratio`` /
``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio_c`` (:func:`ppo_clip_token_losses`) and ``loss_agg_mode``
(:func:`aggregate_loss`). ``docs/algorithm-options.md`` maps them to the config.

Precision: statistics keep float64 inputs in float64 (so a float64 reference comparison is exact to rounding);
bf16 / fp16 inputs are computed in float32, as the losses that feed the optimizer always were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINGLETON_MODES = ("zero", "official")
KL_KINDS = ("k1", "k2", "k3")
# verl's ``actor.loss_agg_mode`` values (core_algos.agg_loss).
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 and fp16 are promoted, spec §10.18); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))



def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    singleton: str = "zero",
    norm_by_std: bool = True,
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
        norm_by_std: verl's ``norm_adv_by_std_in_grpo``. ``True`` (the paper, spec §2 step 5) divides by
            std + eps; ``False`` only centres, A = R - mean_U (Dr. GRPO); an ``"official"`` singleton then gets R.

    Returns:
        ``[N]`` advantages, float32 (float64 rewards give float64).
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
    advantages = deviation / (std[inverse] + eps) if norm_by_std else deviation

    high = values.new_full((num_groups,), float("-inf")).scatter_reduce(0, inverse, values, "amax")
    low = values.new_full((num_groups,), float("inf")).scatter_reduce(0, inverse, values, "amin")
    advantages = torch.where((high == low)[inverse], 0.0, advantages)

    alone = (counts == 1)[inverse]
    if singleton == "official":
        # verl: a group of size 1 gets mean 0, std 1.
        advantages = torch.where(alone, values / (1.0 + eps) if norm_by_std else values, advantages)
    else:
        advantages = torch.where(alone, 0.0, advantages)
    return advantages


@dataclass(frozen=True)
class PolicyLossTerms:
    """Per-token PPO-clip losses and what happened at each token.

    Attributes:
        losses: ``[N, k]`` float32 (float64 for float64 inputs), differentiable w.r.t. ``logp``.
        ratio: ``[N, k]`` same dtype, detached, exp(clamped log-ratio).
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
    clip_low: float | None = None,
    clip_high: float | None = None,
) -> PolicyLossTerms:
    """Dual-clip PPO loss per response token (spec §2 step 6.3, verl ``compute_policy_loss``).

    ρ = exp(clamp(logp - old_logp, ±log_ratio_clamp)); ℓ = max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high)); where A < 0,
    ℓ = min(ℓ, dual_clip·(-A)). Gradients flow only through ``logp``: ``old_logp`` and ``advantages`` are detached.

    Args:
        logp: ``[N, k]`` log-probs of the rollout tokens under the current policy (with grad).
        old_logp: ``[N, k]`` log-probs under the policy that generated them.
        advantages: ``[N]`` (broadcast over the k tokens) or ``[N, k]``.
        clip_eps: ε (verl ``clip_ratio``), the default of both bounds.
        dual_clip: c > 1 (verl ``clip_ratio_c``), the dual-clip bound for negative advantages; ``None`` disables it.
        log_ratio_clamp: bound on |logp - old_logp| before the exp.
        clip_low, clip_high: ε_low and ε_high (verl ``clip_ratio_low`` / ``clip_ratio_high``, asymmetric clipping
            as in DAPO's clip-higher); ``None`` means ``clip_eps``.

    Returns:
        :class:`PolicyLossTerms` with ``[N, k]`` fields.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape:
        raise ValueError(f"logp and old_logp must both be [N, k], got {tuple(logp.shape)} and {tuple(old_logp.shape)}.")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must be [N] or [N, k] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}."
        )
    low = clip_eps if clip_low is None else clip_low
    high = clip_eps if clip_high is None else clip_high
    for name, value in (("clip_eps", clip_eps), ("clip_low", low), ("clip_high", high)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}.")
    adv = _wide(advantages.detach())
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    log_ratio = (_wide(logp) - _wide(old_logp.detach())).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1.0 - low, 1.0 + high)
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
        A scalar tensor in the input's dtype when that is float32 or wider, float32 for bf16 / fp16.
    """
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match values {tuple(values.shape)}.")
    keep = mask != 0
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    if total_tokens is None:
        return _wide(total) / keep.sum().clamp_min(1)
    if float(total_tokens) <= 0:
        raise ValueError(f"total_tokens must be > 0, got {float(total_tokens)}; pass the mini-batch's token count.")
    return _wide(total) / total_tokens


def policy_loss_stats(terms: PolicyLossTerms, mask: torch.Tensor) -> dict[str, float]:
    """Masked diagnostics of a PPO loss: clip fractions and ratio summary (NaN ratios if the mask is empty).

    Computed in the ratio's dtype (float64 stays float64), so the statistics are as exact as the loss.

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
    ratio = _wide(terms.ratio.detach()[keep])
    return {
        "clip_frac": float(terms.clipped[keep].to(ratio.dtype).mean()),
        "dual_clip_frac": float(terms.dual_clipped[keep].to(ratio.dtype).mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_max": float(ratio.max()),
        "ratio_min": float(ratio.min()),
        "approx_kl": float(-ratio.log().mean()),
    }


def aggregate_loss(
    losses: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    num_sequences: int | float | None = None,
    num_tokens: int | float | None = None,
    horizon: int | float | None = None,
) -> torch.Tensor:
    """verl's ``agg_loss``: one scalar from per-token losses, with denominators the caller may fix.

    With every denominator left ``None`` this is verl 0.5's ``agg_loss`` on this batch alone:

    * ``token-mean``: Σ ℓ·m / Σ m (the paper, spec §3);
    * ``seq-mean-token-sum``: mean over rows of Σ_t ℓ·m;
    * ``seq-mean-token-mean``: mean over rows of (Σ_t ℓ·m / Σ_t m);
    * ``seq-mean-token-sum-norm``: Σ ℓ·m / horizon, horizon = the padded response length (Dr. GRPO's constant;
      verl divides by no row count, so its value grows with the number of rows aggregated at once).

    Passing the *whole* batch's ``num_sequences`` / ``num_tokens`` for a part of it makes the parts' values add up to
    the whole batch's (each mode is a sum of per-row terms over a fixed denominator), which is how micro-batches of
    one mini-batch add up to the mini-batch's loss whatever their size (spec §2 step 6.3; see :func:`token_mean`).

    Args:
        losses: ``[N, k]`` per-token losses.
        mask: ``[N, k]`` 0/1 or bool; masked entries are ignored even if NaN. A row with no tokens adds 0 in
            ``seq-mean-token-mean`` (verl would give NaN).
        mode: one of ``LOSS_AGG_MODES``.
        num_sequences: the row count of the mean over rows (default ``N``).
        num_tokens: the token count of ``token-mean`` (default ``mask.sum()``; 0 tokens give 0).
        horizon: the divisor of ``seq-mean-token-sum-norm`` (default ``k``).

    Returns:
        A scalar tensor in the input's dtype when that is float32 or wider, float32 for bf16 / fp16.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {LOSS_AGG_MODES}.")
    if mask.shape != losses.shape or losses.dim() != 2:
        raise ValueError(f"losses and mask must both be [N, k], got {tuple(losses.shape)} and {tuple(mask.shape)}.")
    for name, value in (("num_sequences", num_sequences), ("num_tokens", num_tokens), ("horizon", horizon)):
        if value is not None and float(value) <= 0:
            raise ValueError(f"{name} must be > 0, got {float(value)}; pass the whole batch's count.")
    keep = mask != 0
    values = _wide(torch.where(keep, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)))
    row_sums = values.sum(dim=-1)  # [N]
    if mode == "token-mean":
        return token_mean(losses, mask, num_tokens)
    if mode == "seq-mean-token-sum-norm":
        return row_sums.sum() / (losses.shape[-1] if horizon is None else horizon)
    if mode == "seq-mean-token-mean":
        row_sums = row_sums / keep.sum(dim=-1).clamp_min(1)
    rows = losses.shape[0] if num_sequences is None else num_sequences
    return row_sums.sum() / max(rows, 1)


def official_micro_batch_loss(
    losses: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    first_row: int,
    micro_size: int,
    num_micro_batches: int,
    horizon: int | float | None = None,
) -> torch.Tensor:
    """This part's share of the official loss: verl's ``agg_loss`` on each micro-batch of ``micro_size`` rollouts,
    divided by the number of micro-batches (gradient accumulation, spec §2 step 6.3).

    ``losses`` are rows ``first_row ..`` of a mini-batch that the official code splits into consecutive
    micro-batches of ``micro_size`` rows (``ppo_micro_batch_size_per_gpu``, 2 in every paper run). Each micro-batch
    has to lie inside one part, so ``first_row`` must be a multiple of ``micro_size``; a shorter last group is the
    mini-batch's shorter last micro-batch, as in verl's split. With equal token counts per micro-batch this equals
    :func:`aggregate_loss` over the whole mini-batch for every mode except ``seq-mean-token-sum-norm``, which here
    is ``micro_size`` times the Dr. GRPO value.

    Args:
        losses, mask: ``[n, k]``.
        mode: one of ``LOSS_AGG_MODES``.
        first_row: index of row 0 of ``losses`` in the (per-rank) mini-batch.
        micro_size: rollouts per official micro-batch.
        num_micro_batches: micro-batches in the mini-batch (summed over ranks under DDP, whose gradient mean the
            caller undoes).
        horizon: see :func:`aggregate_loss`.

    Returns:
        A scalar tensor (see :func:`aggregate_loss` for the dtype).
    """
    if micro_size < 1 or num_micro_batches < 1:
        raise ValueError(f"micro_size and num_micro_batches must be >= 1, got {micro_size}, {num_micro_batches}.")
    if first_row % micro_size:
        raise ValueError(
            f"first_row={first_row} is not at a micro-batch boundary of size {micro_size}: make the memory "
            "micro-batch a multiple of the official micro-batch (refine.ppo_micro_batch_size)."
        )
    parts = [
        aggregate_loss(losses[lo : lo + micro_size], mask[lo : lo + micro_size], mode, horizon=horizon)
        for lo in range(0, losses.shape[0], micro_size)
    ]
    return torch.stack(parts).sum() / num_micro_batches


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
