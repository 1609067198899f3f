"""Rollout rewards (spec §2 step 4): hand-computed values and plain-loop references, always float32."""

from __future__ import annotations

import math

import pytest
import torch

from refine_core.algorithm.rewards import (
    RewardBreakdown,
    canonical_reward_kind,
    compute_rewards,
    cosine_reward,
    exact_match_reward,
)


def ref_cosine(rollout: torch.Tensor, target: torch.Tensor) -> list[float]:
    """R = (1/k) Σ_i <Hy_i, Hgt_i> / (|Hy_i| |Hgt_i|), one rollout and one position at a time."""
    out = []
    for n in range(rollout.shape[0]):
        total = 0.0
        for i in range(rollout.shape[1]):
            a, b = rollout[n, i].double().tolist(), target[n, i].double().tolist()
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            total += dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
        out.append(total / rollout.shape[1])
    return out


def ref_exact_match(rollout: torch.Tensor, target: torch.Tensor) -> list[float]:
    rows = zip(rollout.tolist(), target.tolist(), strict=True)
    return [sum(int(y == g) for y, g in zip(ys, gs, strict=True)) / len(ys) for ys, gs in rows]


def test_cosine_identical_and_opposite() -> None:
    hidden = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cosine_reward(hidden, hidden), torch.ones(3))
    torch.testing.assert_close(cosine_reward(hidden, -hidden), -torch.ones(3))
    torch.testing.assert_close(cosine_reward(hidden, 3.0 * hidden), torch.ones(3))  # scale-free


def test_cosine_hand_computed() -> None:
    rollout = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    # position 1: orthogonal -> 0; position 2: cos 45° = 1/√2; mean = 1/(2√2) ≈ 0.35355
    torch.testing.assert_close(cosine_reward(rollout, target), torch.tensor([1 / (2 * math.sqrt(2))]))
    # A zero vector gives cosine 0, not NaN (eps 1e-8, as F.cosine_similarity).
    zero = torch.zeros(1, 2, 2)
    torch.testing.assert_close(cosine_reward(zero, target), torch.zeros(1))


def test_cosine_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    rollout, target = torch.randn(7, 5, 12, generator=gen), torch.randn(7, 5, 12, generator=gen)
    got = cosine_reward(rollout, target)
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(ref_cosine(rollout, target), dtype=torch.float64))


def test_cosine_is_fp32_for_bf16_inputs() -> None:
    gen = torch.Generator().manual_seed(2)
    rollout = torch.randn(4, 5, 64, generator=gen).bfloat16()
    target = (rollout.float() + 0.3 * torch.randn(4, 5, 64, generator=gen)).bfloat16()
    got = cosine_reward(rollout, target)
    assert got.dtype == torch.float32
    # Exact to float32 precision for the bf16 values as given (spec §10.18), not bf16-rounded.
    want = torch.tensor(ref_cosine(rollout, target), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    breakdown = compute_rewards("hybrid", rollout, target, torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 5))
    assert all(t.dtype == torch.float32 for t in (breakdown.reward, breakdown.cosine, breakdown.exact_match))


def test_exact_match_rates_for_k5() -> None:
    target = torch.arange(5).expand(6, 5)
    rollout = target.clone()
    for n in range(6):
        rollout[n, n:] = 99  # row n matches its first n tokens
    got = exact_match_reward(rollout, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))


def test_exact_match_matches_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    rollout, target = torch.randint(0, 3, (20, 5), generator=gen), torch.randint(0, 3, (20, 5), generator=gen)
    torch.testing.assert_close(exact_match_reward(rollout, target), torch.tensor(ref_exact_match(rollout, target)))


def test_compute_rewards_kinds_and_aliases() -> None:
    gen = torch.Generator().manual_seed(4)
    hy, hgt = torch.randn(6, 5, 8, generator=gen), torch.randn(6, 5, 8, generator=gen)
    y, g = torch.randint(0, 2, (6, 5), generator=gen), torch.randint(0, 2, (6, 5), generator=gen)
    cos, em = cosine_reward(hy, hgt), exact_match_reward(y, g)
    for kind, want in [
        ("cosine", cos),
        ("cosine_similarity", cos),
        ("exact_match", em),
        ("binary", em),
        ("hybrid", cos + em),
    ]:
        got = compute_rewards(kind, hy, hgt, y, g)
        assert isinstance(got, RewardBreakdown)
        torch.testing.assert_close(got.reward, want)
        torch.testing.assert_close(got.cosine, cos)  # both parts always computed, for logging
        torch.testing.assert_close(got.exact_match, em)
    hybrid = compute_rewards("hybrid", hy, hgt, y, g)
    assert set(hybrid.summary()) == {"reward_mean", "cosine_mean", "exact_match_mean"}
    assert hybrid.summary()["reward_mean"] == pytest.approx(float(cos.mean() + em.mean()), abs=1e-6)
    assert canonical_reward_kind("binary") == "exact_match"
    with pytest.raises(ValueError, match=r"unknown reward kind 'embedding'.*'binary'.*'cosine'.*'hybrid'"):
        compute_rewards("embedding", hy, hgt, y, g)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[N, k, D\]"):
        cosine_reward(torch.zeros(2, 5, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        exact_match_reward(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="disagree"):
        compute_rewards("cosine", torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), torch.zeros(2, 4), torch.zeros(2, 4))
