"""GRPO advantages and the PPO-clip loss (spec §2 steps 5-6): hand-computed values and plain-loop references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from refine_core.algorithm.grpo import (
    LOSS_AGG_MODES,
    aggregate_loss,
    group_advantages,
    kl_penalty,
    official_micro_batch_loss,
    policy_loss_stats,
    ppo_clip_token_losses,
    token_mean,
)

E = math.e


# ---------------------------------------------------------------------------------------------- advantages


def ref_advantages(
    rewards: list[float], ids: list[int], eps: float = 1e-6, singleton: str = "zero", norm_by_std: bool = True
) -> list[float]:
    """spec §2 step 5, one rollout at a time: A = (R - mean_U) / (std_U + eps), unbiased std (or R - mean_U)."""
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards, ids, strict=True):
        groups.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, ids, strict=True):
        members = groups[g]
        mean, std = (0.0, 1.0) if len(members) == 1 else (statistics.fmean(members), statistics.stdev(members))
        if len(members) == 1 and singleton == "zero":
            out.append(0.0)
        elif len(set(members)) == 1 and len(members) > 1:
            out.append(0.0)  # a constant group: exactly 0
        else:
            out.append((r - mean) / (std + eps) if norm_by_std else r - mean)  # verl: a singleton has mean 0, std 1
    return out


def test_advantages_hand_computed() -> None:
    # [1, 2, 3]: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-6)
    got = group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(got, torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-6))
    # [0, 4]: mean 2, unbiased std sqrt((4 + 4) / 1) = 2√2 -> ±2 / 2√2 = ±1/√2
    got = group_advantages(torch.tensor([0.0, 4.0]), torch.tensor([5, 5]))
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    assert got.dtype == torch.float32


def test_zero_std_groups_and_singletons() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3, 0.3, 2.5])
    ids = torch.tensor([4, 4, 4, 9, 2, 2, 8])  # a constant group of 3 (its float32 mean is not exactly 0.1)
    got = group_advantages(rewards, ids)
    assert got.tolist() == [0.0] * 7  # constant groups and singletons (ids 9, 8) -> exactly 0
    official = group_advantages(rewards, ids, singleton="official")
    assert official[:3].tolist() == [0.0] * 3 and official[4:6].tolist() == [0.0] * 2
    torch.testing.assert_close(official[[3, 6]], torch.tensor([0.7, 2.5]) / (1 + 1e-6))  # ≈ R


@pytest.mark.parametrize("singleton", ["zero", "official"])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_advantages_match_loop(singleton: str, norm_by_std: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, 3, 7, 100, 3, 3, 42, 7, 5, 5, 5, 5, 11, 3, 7, -1])  # any order; 100, 42, 11, -1 alone
    rewards = torch.rand(len(ids), generator=gen) * 2 - 0.5
    got = group_advantages(rewards, ids, singleton=singleton, norm_by_std=norm_by_std)
    want = ref_advantages(rewards.double().tolist(), ids.tolist(), singleton=singleton, norm_by_std=norm_by_std)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # float64 rewards stay float64 and match the loop to rounding.
    got64 = group_advantages(rewards.double(), ids, singleton=singleton, norm_by_std=norm_by_std)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    # M = 8 rollouts per document, documents interleaved: the z-scores of each group have mean 0 and std ≈ 1.
    doc_ids = torch.arange(4).repeat(8)
    adv = group_advantages(torch.rand(32, generator=gen), doc_ids)
    for d in range(4):
        assert abs(float(adv[doc_ids == d].mean())) < 1e-6
        assert float(adv[doc_ids == d].std()) == pytest.approx(1.0, abs=1e-4)


def test_advantages_without_std_normalisation_hand_computed() -> None:
    # norm_adv_by_std_in_grpo = False (Dr. GRPO): [1, 2, 6] -> mean 3 -> [-2, -1, 3]; a singleton 0.7 -> 0 ("zero")
    # or R - 0 = 0.7 ("official": verl's mean 0; there is no std to divide by); a constant group -> 0.
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.7, 0.5, 0.5], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 2, 2])
    assert group_advantages(rewards, ids, norm_by_std=False).tolist() == [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]
    official = group_advantages(rewards, ids, singleton="official", norm_by_std=False)
    assert official.tolist() == [-2.0, -1.0, 3.0, 0.7, 0.0, 0.0]
    # The same rewards with the std: std([1, 2, 6]) = sqrt((4 + 1 + 9) / 2) = sqrt(7).
    torch.testing.assert_close(
        group_advantages(rewards, ids)[:3], torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64) / (7**0.5 + 1e-6)
    )


def test_advantage_errors() -> None:
    with pytest.raises(ValueError, match="integers"):
        group_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[N\]"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="singleton"):
        group_advantages(torch.zeros(2), torch.tensor([0, 0]), singleton="one")


# ---------------------------------------------------------------------------------------------- PPO clip


def ref_ppo(
    logp: float,
    old: float,
    adv: float,
    eps: float = 0.2,
    dual: float | None = 3.0,
    low: float | None = None,
    high: float | None = None,
) -> tuple[float, bool, bool]:
    """spec §2 step 6.3 for one token: (loss, clipped, dual_clipped); verl's clip_ratio_low / high default to ε."""
    low, high = eps if low is None else low, eps if high is None else high
    ratio = math.exp(min(max(logp - old, -20.0), 20.0))
    l1, l2 = -adv * ratio, -adv * min(max(ratio, 1 - low), 1 + high)
    loss = max(l1, l2)
    dual_clipped = dual is not None and adv < 0 and loss > dual * -adv
    if dual is not None and adv < 0:
        loss = min(loss, dual * -adv)
    return loss, l2 > l1, dual_clipped


# (log ratio, advantage, expected loss, clipped, dual clipped, d loss / d logp)
HAND_CASES = [
    # A = 1, ρ = e: ℓ1 = -e ≈ -2.718, ℓ2 = -1.2 -> max = -1.2 (clipped, no gradient)
    (1.0, 1.0, -1.2, True, False, 0.0),
    # A = 1, ρ = 1/e ≈ 0.368: ℓ1 = -0.368, ℓ2 = -0.8 -> max = -0.368 (unclipped, gradient -A·ρ = -1/e)
    (-1.0, 1.0, -1 / E, False, False, -1 / E),
    # A = -1, ρ = e: ℓ1 = e, ℓ2 = 1.2 -> max = e ≈ 2.718 < 3·1 -> e (unclipped, gradient -A·ρ = e)
    (1.0, -1.0, E, False, False, E),
    # A = -1, ρ = e² ≈ 7.389: ℓ1 = 7.389, ℓ2 = 1.2 -> max = 7.389 > 3 -> dual clip to 3 (no gradient)
    (2.0, -1.0, 3.0, False, True, 0.0),
    # A = -1, ρ = 1/e: ℓ1 = 0.368, ℓ2 = 0.8 -> max = 0.8 (clipped, no gradient) < 3
    (-1.0, -1.0, 0.8, True, False, 0.0),
    # A = 2, ρ = 1 (on-policy, first mini-batch): ℓ = -2, gradient -A·ρ = -2
    (0.0, 2.0, -2.0, False, False, -2.0),
    # A = 0.5, log ratio 50 clamped to 20: ℓ1 = -0.5·e^20, ℓ2 = -0.5·1.2 = -0.6 -> -0.6 (clipped)
    (50.0, 0.5, -0.6, True, False, 0.0),
    # A = 1, log ratio -50 clamped to -20: ρ = e^-20 ≈ 2.06e-9, ℓ1 = -2.06e-9 > ℓ2 = -0.8 -> -e^-20, and the
    # clamp is saturated so no gradient flows
    (-50.0, 1.0, -math.exp(-20), False, False, 0.0),
]


def test_ppo_hand_computed_values_and_gradients() -> None:
    log_ratio = torch.tensor([[c[0] for c in HAND_CASES]])
    old = torch.full_like(log_ratio, -2.0)
    logp = (old + log_ratio).requires_grad_()
    adv = torch.tensor([[c[1] for c in HAND_CASES]], requires_grad=True)
    old_param = old.clone().requires_grad_()
    terms = ppo_clip_token_losses(logp, old_param, adv)
    torch.testing.assert_close(terms.losses.detach(), torch.tensor([[c[2] for c in HAND_CASES]]))
    assert terms.clipped.tolist() == [[c[3] for c in HAND_CASES]]
    assert terms.dual_clipped.tolist() == [[c[4] for c in HAND_CASES]]
    torch.testing.assert_close(terms.ratio, log_ratio.clamp(-20, 20).exp())
    terms.losses.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[c[5] for c in HAND_CASES]]))
    assert adv.grad is None and old_param.grad is None  # gradients flow only through logp
    assert not terms.ratio.requires_grad


def test_ppo_dual_clip_off_and_custom_bounds() -> None:
    logp, old, adv = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([-1.0])
    # Without the dual clip: ρ = e² ≈ 7.389, A = -1 -> ℓ = max(7.389, 1.2) = e²
    off = ppo_clip_token_losses(logp, old, adv, dual_clip=None)
    torch.testing.assert_close(off.losses, torch.tensor([[E**2]]))
    assert not bool(off.dual_clipped.any())
    # dual_clip = 5: min(e², 5) = 5; log_ratio_clamp = 1: ρ = e -> max(e, 1.2) = e < 3
    torch.testing.assert_close(ppo_clip_token_losses(logp, old, adv, dual_clip=5.0).losses, torch.tensor([[5.0]]))
    torch.testing.assert_close(ppo_clip_token_losses(logp, old, adv, log_ratio_clamp=1.0).losses, torch.tensor([[E]]))
    # clip_eps = 0.5, A = 1, ρ = e -> max(-e, -1.5) = -1.5
    torch.testing.assert_close(
        ppo_clip_token_losses(torch.tensor([[1.0]]), old, torch.tensor([1.0]), clip_eps=0.5).losses,
        torch.tensor([[-1.5]]),
    )


@pytest.mark.parametrize("dual", [3.0, None])
@pytest.mark.parametrize("bounds", [(None, None), (0.1, 0.28)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ppo_matches_loop(dual: float | None, bounds: tuple, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    logp = (-torch.rand(9, 5, generator=gen, dtype=torch.float64) * 4).to(dtype)
    old = logp + (torch.randn(9, 5, generator=gen, dtype=torch.float64) * 0.6).to(dtype)
    adv_rows = (torch.randn(9, generator=gen, dtype=torch.float64) * 2).to(dtype)
    adv_tokens = torch.randn(9, 5, generator=gen, dtype=torch.float64).to(dtype)
    low, high = bounds
    # float64 is exact to rounding against the loop; float32 inputs give float32 losses.
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {}
    for adv in (adv_rows, adv_tokens):
        terms = ppo_clip_token_losses(logp, old, adv, dual_clip=dual, clip_low=low, clip_high=high)
        assert terms.losses.dtype == dtype
        full = adv[:, None].expand(9, 5) if adv.dim() == 1 else adv
        want = [
            [
                ref_ppo(logp[n, i].item(), old[n, i].item(), full[n, i].item(), dual=dual, low=low, high=high)
                for i in range(5)
            ]
            for n in range(9)
        ]
        want_losses = torch.tensor([[w[0] for w in row] for row in want], dtype=torch.float64)
        torch.testing.assert_close(terms.losses.double(), want_losses, **tol)
        # The token-mean and the statistics keep float64 too (they returned float32 before: off by ~2e-7).
        mean = token_mean(terms.losses, torch.ones_like(terms.losses))
        assert mean.dtype == dtype
        torch.testing.assert_close(mean.double(), want_losses.mean(), **tol)
        stats = policy_loss_stats(terms, torch.ones_like(terms.losses))
        pairs = zip(logp.flatten().tolist(), old.flatten().tolist(), strict=True)
        ratios = [math.exp(min(max(a - b, -20.0), 20.0)) for a, b in pairs]
        ref_stats = {
            "ratio_mean": math.fsum(ratios) / 45,
            "approx_kl": -math.fsum(math.log(r) for r in ratios) / 45,
            "clip_frac": sum(w[1] for row in want for w in row) / 45,
            "dual_clip_frac": sum(w[2] for row in want for w in row) / 45,
        }
        for name, value in ref_stats.items():
            assert stats[name] == pytest.approx(value, rel=0, abs=1e-12 if dtype == torch.float64 else 1e-6), name
        assert terms.clipped.tolist() == [[w[1] for w in row] for row in want]
        assert terms.dual_clipped.tolist() == [[w[2] for w in row] for row in want]
        assert 0 < int(terms.clipped.sum()) < 45  # both branches exercised


def test_ppo_errors() -> None:
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, k\]"):
        ppo_clip_token_losses(x, x, torch.zeros(5))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_token_losses(x, x, torch.zeros(2), dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clip_token_losses(x, x, torch.zeros(2), clip_eps=0.0)
    with pytest.raises(ValueError, match=r"clip_low must be in \(0, 1\)"):
        ppo_clip_token_losses(x, x, torch.zeros(2), clip_low=1.0)
    with pytest.raises(ValueError, match=r"clip_high must be in \(0, 1\)"):
        ppo_clip_token_losses(x, x, torch.zeros(2), clip_high=-0.1)


def test_ppo_asymmetric_clip_hand_computed() -> None:
    # clip_ratio_low 0.1, clip_ratio_high 0.3 (DAPO's clip-higher): ρ is clipped to [0.9, 1.3].
    old = torch.zeros(1, 4)
    log_ratio = torch.tensor([[math.log(1.25), math.log(1.4), math.log(0.85), math.log(0.95)]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    terms = ppo_clip_token_losses(log_ratio, old, adv, clip_low=0.1, clip_high=0.3)
    # A = 1: ρ 1.25 < 1.3 -> -1.25 (unclipped; symmetric ε = 0.2 would clip it to -1.2); ρ 1.4 -> max(-1.4, -1.3)
    # = -1.3. A = -1: ρ 0.85 -> max(0.85, 0.9) = 0.9 (clipped); ρ 0.95 -> max(0.95, 0.95) = 0.95.
    torch.testing.assert_close(terms.losses, torch.tensor([[-1.25, -1.3, 0.9, 0.95]]))
    assert terms.clipped.tolist() == [[False, True, True, False]]
    symmetric = ppo_clip_token_losses(log_ratio, old, adv)
    torch.testing.assert_close(symmetric.losses, torch.tensor([[-1.2, -1.2, 0.85, 0.95]]))
    # Only one bound given: the other is clip_eps.
    torch.testing.assert_close(
        ppo_clip_token_losses(log_ratio, old, adv, clip_high=0.3).losses, torch.tensor([[-1.25, -1.3, 0.85, 0.95]])
    )


# ---------------------------------------------------------------------------------------------- aggregation


def test_token_mean_hand_and_masks() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3 = 7/3; the NaN sits under the mask and is ignored
    torch.testing.assert_close(token_mean(values, mask), torch.tensor(7 / 3))
    torch.testing.assert_close(token_mean(values, mask.bool(), total_tokens=7), torch.tensor(1.0))
    assert token_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="total_tokens must be > 0"):
        token_mean(values, mask, total_tokens=0)


def test_token_mean_micro_batch_invariance() -> None:
    gen = torch.Generator().manual_seed(6)
    logp = (-torch.rand(7, 5, generator=gen) * 3).requires_grad_()
    old = logp.detach() + torch.randn(7, 5, generator=gen) * 0.3
    adv = torch.randn(7, generator=gen)
    mask = (torch.rand(7, 5, generator=gen) > 0.3).long()
    mask[0] = 1  # rows hold different numbers of tokens
    whole = token_mean(ppo_clip_token_losses(logp, old, adv).losses, mask)
    (grad_whole,) = torch.autograd.grad(whole, logp)

    total = int(mask.sum())
    splits = [slice(0, 2), slice(2, 3), slice(3, 7)]  # uneven micro-batches
    micro = [token_mean(ppo_clip_token_losses(logp[s], old[s], adv[s]).losses, mask[s], total) for s in splits]
    summed = sum(micro)
    (grad_micro,) = torch.autograd.grad(summed, logp)
    torch.testing.assert_close(summed, whole)
    torch.testing.assert_close(grad_micro, grad_whole)

    # The official aggregation (token-mean per micro-batch, then / n_micro) differs when token counts differ ...
    per_micro = [token_mean(ppo_clip_token_losses(logp[s], old[s], adv[s]).losses, mask[s]) for s in splits]
    assert abs(float(sum(per_micro).detach()) / len(splits) - float(whole.detach())) > 1e-3
    # ... and agrees when every micro-batch has the same token count (full masks, equal sizes: spec §2 step 6.3).
    full = torch.ones(6, 5)
    losses = ppo_clip_token_losses(logp[:6], old[:6], adv[:6]).losses
    even = [token_mean(losses[s], full[s]) for s in (slice(0, 2), slice(2, 4), slice(4, 6))]
    torch.testing.assert_close(sum(even) / 3, token_mean(losses, full))


def ref_agg_loss(losses: list[list[float]], mask: list[list[int]], mode: str) -> float:
    """verl 0.5 ``core_algos.agg_loss``, one row and one token at a time (no 1e-8 guard: rows here are non-empty)."""
    rows = [math.fsum(v * m for v, m in zip(lr, mr, strict=True)) for lr, mr in zip(losses, mask, strict=True)]
    if mode == "token-mean":
        return math.fsum(rows) / sum(map(sum, mask))
    if mode == "seq-mean-token-sum":
        return math.fsum(rows) / len(rows)
    if mode == "seq-mean-token-mean":
        return math.fsum(r / sum(mr) for r, mr in zip(rows, mask, strict=True)) / len(rows)
    return math.fsum(rows) / len(mask[0])  # seq-mean-token-sum-norm: / the response length, no row count


def ref_official_loss(losses: list[list[float]], mask: list[list[int]], mode: str, micro: int) -> float:
    """The official gradient accumulation: agg_loss per micro-batch of ``micro`` rows, each / n_micro, summed."""
    parts = [(losses[i : i + micro], mask[i : i + micro]) for i in range(0, len(losses), micro)]
    return math.fsum(ref_agg_loss(lo, ma, mode) / len(parts) for lo, ma in parts)


def test_aggregate_loss_hand_computed() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Row sums 6 and 4 over 3 and 1 tokens (the NaN is masked out).
    assert aggregate_loss(losses, mask, "token-mean").item() == 10 / 4
    assert aggregate_loss(losses, mask, "seq-mean-token-sum").item() == (6 + 4) / 2
    assert aggregate_loss(losses, mask, "seq-mean-token-mean").item() == (6 / 3 + 4 / 1) / 2
    assert aggregate_loss(losses, mask, "seq-mean-token-sum-norm").item() == 10 / 3  # / k, no row count
    # Fixed denominators: this part of a batch of 8 rows, 20 tokens and horizon 12.
    assert aggregate_loss(losses, mask, "token-mean", num_tokens=20).item() == 10 / 20
    assert aggregate_loss(losses, mask, "seq-mean-token-sum", num_sequences=8).item() == 10 / 8
    assert aggregate_loss(losses, mask, "seq-mean-token-mean", num_sequences=8).item() == 6 / 8
    assert aggregate_loss(losses, mask, "seq-mean-token-sum-norm", horizon=12).item() == 10 / 12
    assert aggregate_loss(losses, mask).dtype == torch.float64
    assert aggregate_loss(losses.float(), mask).dtype == torch.float32
    assert aggregate_loss(losses.bfloat16(), mask).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'token_mean'"):
        aggregate_loss(losses, mask, "token_mean")
    with pytest.raises(ValueError, match="num_sequences must be > 0"):
        aggregate_loss(losses, mask, "seq-mean-token-sum", num_sequences=0)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_matches_verl_loop_and_adds_up_over_parts(mode: str) -> None:
    gen = torch.Generator().manual_seed(8)
    losses = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(10, 5, generator=gen) > 0.4).long()
    mask[:, 0] = 1  # every row has a token; rows differ in length
    want = ref_agg_loss(losses.tolist(), mask.tolist(), mode)
    torch.testing.assert_close(
        aggregate_loss(losses, mask, mode), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12
    )
    # Uneven parts with the whole batch's denominators add up to the whole (for sum-norm: a fixed horizon).
    counts = {"num_sequences": 10, "num_tokens": int(mask.sum()), "horizon": 5}
    parts = [slice(0, 3), slice(3, 4), slice(4, 10)]
    summed = sum(aggregate_loss(losses[s], mask[s], mode, **counts) for s in parts)
    torch.testing.assert_close(summed, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_official_micro_batch_loss_matches_the_accumulation_loop(mode: str) -> None:
    gen = torch.Generator().manual_seed(9)
    losses = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(12, 5, generator=gen) > 0.4).long()
    mask[:, 0] = 1
    want = ref_official_loss(losses.tolist(), mask.tolist(), mode, micro=2)
    # Our memory micro-batches (4 + 8 rows) are cut into official micro-batches of 2 rollouts.
    got = sum(
        official_micro_batch_loss(losses[s], mask[s], mode, first_row=s.start, micro_size=2, num_micro_batches=6)
        for s in (slice(0, 4), slice(4, 12))
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    # With unequal token counts per micro-batch the official value is not the mini-batch aggregate ...
    whole = aggregate_loss(losses, mask, mode, horizon=5 * 12)
    if mode in ("token-mean", "seq-mean-token-sum-norm"):  # the seq-mean modes are means over equal row counts
        assert abs(float(got) - float(whole)) > 1e-6
    # ... and with full masks it is, except sum-norm, which the official code scales by the micro-batch size.
    full = torch.ones_like(mask)
    official = official_micro_batch_loss(losses, full, mode, first_row=0, micro_size=2, num_micro_batches=6)
    ours = aggregate_loss(losses, full, mode, horizon=5 * 12)
    factor = 2.0 if mode == "seq-mean-token-sum-norm" else 1.0
    torch.testing.assert_close(official, factor * ours, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="micro-batch boundary"):
        official_micro_batch_loss(losses[1:], mask[1:], mode, first_row=1, micro_size=2, num_micro_batches=6)


def test_policy_loss_stats() -> None:
    log_ratio = torch.tensor([[c[0] for c in HAND_CASES[:6]]])  # ratios e, 1/e, e, e², 1/e, 1
    adv = torch.tensor([[c[1] for c in HAND_CASES[:6]]])
    terms = ppo_clip_token_losses(log_ratio, torch.zeros_like(log_ratio), adv)
    stats = policy_loss_stats(terms, torch.ones_like(log_ratio))
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 6)
    assert stats["ratio_max"] == pytest.approx(E**2) and stats["ratio_min"] == pytest.approx(1 / E)
    assert stats["ratio_mean"] == pytest.approx((2 * E + 2 / E + E**2 + 1) / 6)
    assert stats["approx_kl"] == pytest.approx(-(1 - 1 + 1 + 2 - 1 + 0) / 6, abs=1e-6)
    masked = policy_loss_stats(terms, torch.tensor([[0, 1, 1, 0, 0, 1]]))  # ratios 1/e, e, 1: nothing clipped
    assert masked["clip_frac"] == 0.0 and masked["dual_clip_frac"] == 0.0
    assert masked["ratio_max"] == pytest.approx(E) and masked["ratio_mean"] == pytest.approx((1 / E + E + 1) / 3)
    empty = policy_loss_stats(terms, torch.zeros_like(log_ratio))
    assert empty["clip_frac"] == 0.0 and math.isnan(empty["ratio_mean"])


# ---------------------------------------------------------------------------------------------- KL


def test_kl_penalty_hand_values() -> None:
    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[math.log(2.0), -1.0]])
    # token 1: logp - ref = -ln 2; k2 = ½ ln² 2; k3 = e^{ln 2} - ln 2 - 1 = 1 - ln 2 ≈ 0.3069. token 2: all 0.
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[-math.log(2.0), 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5 * math.log(2.0) ** 2, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref), torch.tensor([[1 - math.log(2.0), 0.0]]))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "full")


def test_kl_k3_clamp_and_finite_gradients() -> None:
    logp = torch.tensor([[-200.0, 0.0, -5.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -200.0, -4.0]], requires_grad=True)
    kl = kl_penalty(logp, ref, "k3")
    # ref - logp = 200 -> e^200 overflows float32 without the pre-clamp -> 10; -200 -> 200 - 1 -> 10;
    # 1 -> e - 2 ≈ 0.718
    torch.testing.assert_close(kl.detach(), torch.tensor([[10.0, 10.0, E - 2]]))
    kl.sum().backward()
    # d k3 / d logp = 1 - e^{ref - logp} = 1 - e inside the clamp, 0 where clamped; never NaN
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1 - E]]))
    assert ref.grad is None
