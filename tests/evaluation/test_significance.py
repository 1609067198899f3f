"""The paired permutation test and the seed spread: the fast test against the loop over every sign pattern."""

from __future__ import annotations

import random

import numpy as np
import pytest

from refine_core.evaluation.significance import (
    EXACT_MAX_PAIRS,
    _exact_pvalue,
    compare_arms,
    mean_std,
    paired_permutation_test,
    permutation_pvalue_reference,
)


@pytest.mark.parametrize("n", [1, 3, 7, 12])
def test_exact_pvalue_matches_the_loop_over_every_sign_pattern(n: int) -> None:
    rng = random.Random(n)
    for _ in range(5):
        a = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)]
        b = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        test = paired_permutation_test(a, b)
        assert test.method == "exact"
        assert test.p_value == pytest.approx(permutation_pvalue_reference(diffs), abs=1e-12)
        assert test.mean_diff == pytest.approx(sum(diffs) / n)


def test_exact_path_with_more_than_one_block_matches_the_reference() -> None:
    # 18 non-zero differences: the fast path enumerates 2^16 patterns per block, 4 blocks (the reference loops 262k)
    rng = random.Random(0)
    diffs = [rng.choice([-1.0, -0.5, 0.5, 1.0, 1.0]) for _ in range(18)]
    test = paired_permutation_test([0.0] * 18, diffs)
    assert test.method == "exact" and test.n_nonzero == 18
    assert test.p_value == pytest.approx(permutation_pvalue_reference(diffs), abs=1e-12)


def test_zero_differences_leave_the_pvalue_unchanged_and_all_zero_gives_one() -> None:
    a, b = [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]
    padded = paired_permutation_test(a + [0.5] * 6, b + [0.5] * 6)
    assert padded.n_pairs == 10 and padded.n_nonzero == 2
    # hand count: d = (1, 1) -> patterns (+,+), (-,-) reach |mean| 2/n; (+,-), (-,+) give 0 -> p = 2/4
    assert padded.p_value == pytest.approx(0.5)
    same = paired_permutation_test([0.3, 0.7], [0.3, 0.7])
    assert same.p_value == 1.0 and same.mean_diff == 0.0


def test_monte_carlo_agrees_with_the_exact_value_and_is_reproducible() -> None:
    rng = random.Random(3)
    n = EXACT_MAX_PAIRS + 10
    a = [float(rng.random() < 0.4) for _ in range(n)]
    b = [float(rng.random() < 0.6) for _ in range(n)]
    mc = paired_permutation_test(a, b, resamples=20_000, seed=1)
    assert mc == paired_permutation_test(a, b, resamples=20_000, seed=1)
    nonzero = [y - x for x, y in zip(a, b, strict=True) if y != x]
    if len(nonzero) <= EXACT_MAX_PAIRS:  # small enough to check against the exact value
        exact = permutation_pvalue_reference(nonzero)
        assert mc.p_value == pytest.approx(exact, abs=0.02)
    assert mc.method in ("monte-carlo", "exact") and 0 < mc.p_value <= 1


def test_monte_carlo_against_enumeration_on_twenty_two_pairs() -> None:
    rng = random.Random(5)
    diffs = [rng.choice([-1.0, 1.0, 1.0]) for _ in range(EXACT_MAX_PAIRS + 2)]
    mc = paired_permutation_test([0.0] * len(diffs), diffs, resamples=40_000, seed=2)
    assert mc.method == "monte-carlo" and mc.resamples == 40_000
    # the exact value by the fast enumeration of the same 22 differences (checked against the loop above)
    exact = _exact_pvalue(np.asarray(diffs), len(diffs))
    assert mc.p_value == pytest.approx(exact, abs=0.01)


def test_a_clear_effect_is_significant_and_a_symmetric_one_is_not() -> None:
    strong = paired_permutation_test([0.0] * 40, [1.0] * 40)
    assert strong.p_value < 1e-3
    null = paired_permutation_test([0.0, 1.0] * 20, [1.0, 0.0] * 20)
    assert null.mean_diff == 0 and null.p_value == pytest.approx(1.0, abs=1e-9)


def test_bad_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_permutation_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no pairs"):
        paired_permutation_test([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_permutation_test([float("nan")], [1.0])


def test_mean_std_is_the_sample_standard_deviation() -> None:
    assert mean_std([2.0, 4.0, 6.0]) == pytest.approx((4.0, 2.0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_compare_arms_pairs_by_seed_and_example() -> None:
    a = {0: {"x": 0.0, "y": 1.0, "z": 0.0}, 1: {"x": 0.0, "y": 0.0, "z": 0.0}, 2: {"x": 1.0}}
    b = {0: {"x": 1.0, "y": 1.0, "z": 1.0}, 1: {"x": 1.0, "y": 0.0, "z": 0.0, "extra": 1.0}, 3: {"x": 0.0}}
    cmp = compare_arms("S", a, b)
    # seeds 0 and 1 are shared; seed means x100: a = 33.3, 0.0; b = 100.0, 33.3
    assert cmp.seeds == 2
    assert cmp.mean_a == pytest.approx(100 / 6) and cmp.mean_b == pytest.approx(400 / 6)
    assert cmp.diff == pytest.approx(50.0)
    assert cmp.std_a == pytest.approx(23.570226, rel=1e-6) and cmp.exceeds_spread is True
    assert cmp.test.n_pairs == 6 and cmp.test.n_nonzero == 3  # (0,x), (0,z), (1,x)
    assert cmp.test.p_value == pytest.approx(0.25)  # d = (1, 1, 1): 2 of 8 patterns reach |mean| 3/6
    single = compare_arms("S", {0: {"x": 0.0}}, {0: {"x": 1.0}})
    assert single.exceeds_spread is None
    with pytest.raises(ValueError, match="share no seed"):
        compare_arms("S", {0: {"x": 1.0}}, {1: {"x": 1.0}})
