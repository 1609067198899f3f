"""Is one arm better than another beyond the noise? Spread over seeds and a paired permutation test.

The reproduction (``bench/repro.py``) trains every arm with several seeds and scores every model on the same
examples, so the scores of two arms pair up by ``(seed, example)``: seed ``s`` of both arms saw the same documents
in the same order, and example ``e`` is the same prompt. Two questions are answered:

* **spread** (:func:`mean_std`): the mean over seeds of an arm's score and its sample standard deviation (n - 1);
  a difference of means is said to *exceed the spread* when it is larger than the larger of the two arms'
  standard deviations (:func:`compare_arms`; undecided, ``None``, with fewer than two seeds).
* **paired test** (:func:`paired_permutation_test`): the two-sided paired permutation (sign-flip) test of the mean
  of the differences ``d_i = b_i - a_i`` over all ``(seed, example)`` pairs. Under the null hypothesis the two
  scores of a pair are exchangeable, so each ``d_i`` is as likely to be ``-d_i``; the p-value is the share of the
  ``2^n`` sign patterns whose mean is at least as far from 0 as the observed one. Pairs with ``d_i = 0`` do not
  change any pattern's mean and are left out of the enumeration. With at most :data:`EXACT_MAX_PAIRS` non-zero
  differences every pattern is enumerated (exact); otherwise ``resamples`` random patterns are drawn (seeded) and
  ``p = (1 + hits) / (1 + resamples)``, which never reports 0. The test treats the pairs as independent; the same
  example scored under several seeds is not, so the p-value is read together with the seed spread, which does not
  share that assumption.

:func:`permutation_pvalue_reference` is the slow, obviously correct version (a loop over every sign pattern) that
the tests compare the fast one with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Up to this many non-zero differences the test enumerates all 2^n sign patterns (2^20 ~ 1M, a few MB at a time).
EXACT_MAX_PAIRS = 20
# Floating-point slack when comparing a pattern's |mean| with the observed one (ties count as "at least as far").
_TIE = 1e-12


@dataclass(frozen=True)
class PairedTest:
    """The paired permutation test of ``mean(b - a)``.

    Attributes:
        mean_diff: mean of ``b_i - a_i`` over all pairs (zeros included).
        n_pairs: number of pairs; ``n_nonzero`` of them differ.
        p_value: two-sided p-value (1.0 when no pair differs).
        method: ``"exact"`` (all sign patterns) or ``"monte-carlo"`` (``resamples`` random patterns).
        resamples: patterns drawn (0 for exact).
    """

    mean_diff: float
    n_pairs: int
    n_nonzero: int
    p_value: float
    method: str
    resamples: int = 0

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}; pair them by (seed, example)")
    if not len(a):
        raise ValueError("no pairs to test: both arms need scores on the same (seed, example) pairs")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError("paired scores must be finite numbers")
    return d


def permutation_pvalue_reference(diffs: Sequence[float]) -> float:
    """The exact two-sided sign-flip p-value by looping over every sign pattern (slow: for tests only)."""
    n = len(diffs)
    observed = abs(sum(diffs) / n)
    hits = 0
    total = 0
    for signs in itertools.product((1.0, -1.0), repeat=n):
        mean = sum(s * d for s, d in zip(signs, diffs, strict=True)) / n
        hits += abs(mean) >= observed - _TIE
        total += 1
    return hits / total


def _exact_pvalue(nonzero: np.ndarray, n_pairs: int) -> float:
    """All 2^k sign patterns of the k non-zero differences, in blocks of 2^16 patterns."""
    k = len(nonzero)
    observed = abs(nonzero.sum()) / n_pairs
    hits = 0
    block_bits = min(k, 16)
    low = ((np.arange(2**block_bits)[:, None] >> np.arange(block_bits)) & 1) * -2 + 1  # [2^b, b] of +-1
    low_sums = low @ nonzero[:block_bits]  # [2^b]
    rest = nonzero[block_bits:]
    for high in range(2 ** (k - block_bits)):
        signs = ((high >> np.arange(k - block_bits)) & 1) * -2 + 1
        sums = low_sums + float(signs @ rest)
        hits += int(np.count_nonzero(np.abs(sums) / n_pairs >= observed - _TIE))
    return hits / 2**k


def paired_permutation_test(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 20_000, seed: int = 0
) -> PairedTest:
    """Two-sided paired permutation test of ``mean(b - a)`` (see the module docstring).

    Args:
        a, b: scores of the two arms, aligned pair by pair.
        resamples: random sign patterns when there are more than :data:`EXACT_MAX_PAIRS` non-zero differences.
        seed: seeds those patterns (the p-value is reproducible).

    Returns:
        A :class:`PairedTest`.
    """
    d = _differences(a, b)
    n = len(d)
    nonzero = d[d != 0]
    mean_diff = float(d.mean())
    if len(nonzero) == 0:
        return PairedTest(mean_diff, n, 0, 1.0, "exact")
    if len(nonzero) <= EXACT_MAX_PAIRS:
        return PairedTest(mean_diff, n, len(nonzero), _exact_pvalue(nonzero, n), "exact")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    rng = np.random.default_rng(seed)
    observed = abs(nonzero.sum()) / n
    hits = 0
    for start in range(0, resamples, 4096):
        count = min(4096, resamples - start)
        signs = rng.integers(0, 2, size=(count, len(nonzero))) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ nonzero) / n >= observed - _TIE))
    return PairedTest(mean_diff, n, len(nonzero), (1 + hits) / (1 + resamples), "monte-carlo", resamples)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value) of ``values``."""
    if not len(values):
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class ArmComparison:
    """Arm ``b`` against arm ``a`` on one metric: seed means, spreads, the difference and the paired test."""

    metric: str
    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    seeds: int
    diff: float
    exceeds_spread: bool | None  # None: fewer than two seeds, no spread to compare with
    test: PairedTest

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["test"] = self.test.to_dict()
        return out


def compare_arms(
    metric: str,
    per_seed_a: Mapping[int, Mapping[str, float]],
    per_seed_b: Mapping[int, Mapping[str, float]],
    *,
    scale: float = 100.0,
    resamples: int = 20_000,
) -> ArmComparison:
    """Compare two arms on one metric from their per-example scores, seed by seed.

    Args:
        metric: the name shown in tables.
        per_seed_a, per_seed_b: ``seed -> {example id -> score}``; only seeds and examples present in both count.
        scale: the seed means and the difference are multiplied by it (×100 as the paper's tables).
        resamples: see :func:`paired_permutation_test`.

    Returns:
        An :class:`ArmComparison` (the paired test is on the unscaled scores).

    Raises:
        ValueError: the arms share no seed or no example.
    """
    seeds = sorted(set(per_seed_a) & set(per_seed_b))
    if not seeds:
        raise ValueError(f"{metric}: the two arms share no seed ({sorted(per_seed_a)} vs {sorted(per_seed_b)})")
    a_pairs: list[float] = []
    b_pairs: list[float] = []
    means_a: list[float] = []
    means_b: list[float] = []
    for seed in seeds:
        ids = sorted(set(per_seed_a[seed]) & set(per_seed_b[seed]))
        if not ids:
            raise ValueError(f"{metric}: seed {seed} of the two arms shares no example id")
        a_scores = [per_seed_a[seed][i] for i in ids]
        b_scores = [per_seed_b[seed][i] for i in ids]
        a_pairs += a_scores
        b_pairs += b_scores
        means_a.append(scale * math.fsum(a_scores) / len(ids))
        means_b.append(scale * math.fsum(b_scores) / len(ids))
    mean_a, std_a = mean_std(means_a)
    mean_b, std_b = mean_std(means_b)
    diff = mean_b - mean_a
    test = paired_permutation_test(a_pairs, b_pairs, resamples=resamples)
    exceeds = abs(diff) > max(std_a, std_b) if len(seeds) >= 2 else None
    return ArmComparison(metric, mean_a, std_a, mean_b, std_b, len(seeds), diff, exceeds, test)
