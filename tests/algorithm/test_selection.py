"""Position selection (spec §2 step 1) against plain-loop references that follow the spec text line by line."""

from __future__ import annotations

import math

import pytest
import torch

from refine_core.algorithm.selection import SELECTION_MODES, SelectedPositions, select_positions, smooth_entropy

STOCHASTIC = ("entropy", "uniform")


def ref_smooth(row: list[float], window: int) -> list[float]:
    """spec §2 step 1.1: H̃_t = (1/K) Σ_{u=t-K//2}^{t+K//2} H_u with H_u = 0 outside [0, S)."""
    kernel = window if window % 2 == 1 else window + 1
    half = kernel // 2
    return [sum(row[u] for u in range(t - half, t + half + 1) if 0 <= u < len(row)) / kernel for t in range(len(row))]


def ref_select(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    num_chunks: int,
    mode: str,
    window: int,
    margin: int,
    generators: list[torch.Generator] | None,
    zero_pad_entropy: bool = True,
) -> list[list[tuple[int, int, int]]]:
    """Per document, per chunk: (rollout_start, chunk_start, offset), one document and one chunk at a time."""
    seq_len = entropy.shape[1]
    out = []
    for b in range(entropy.shape[0]):
        row, real = entropy[b].double().tolist(), mask[b].tolist()
        if zero_pad_entropy:  # ours; the official code smooths the pads' entropies as they are (spec §10.8)
            row = [h if m else 0.0 for h, m in zip(row, real, strict=True)]
        s0, length = real.index(1), sum(real)
        c = length // num_chunks
        source = ref_smooth(row, window) if mode == "entropy" else row
        # The documented draw: one torch.rand(M, float64) per document, value j for chunk j.
        uniforms = torch.rand(num_chunks, generator=generators[b], dtype=torch.float64).tolist() if generators else []
        doc = []
        for j in range(num_chunks):
            start = s0 + j * c
            chunk = source[start : start + c]
            if mode == "argmax":
                tau = chunk.index(max(chunk))
            elif mode == "argmin":
                tau = chunk.index(min(chunk))
            else:
                top = max(chunk)
                weights = [math.exp(v - top) for v in chunk] if mode == "entropy" else [1.0] * c
                probs = [w / sum(weights) for w in weights]
                tau, cum = c - 1, 0.0
                for t, p in enumerate(probs):
                    cum += p
                    if uniforms[j] < cum:
                        tau = t
                        break
            r = min(max(start + tau + 1, s0 + margin), seq_len - margin)
            doc.append((r, start, tau))
        out.append(doc)
    return out


def left_padded_mask(pads: list[int], seq_len: int) -> torch.Tensor:
    mask = torch.ones(len(pads), seq_len, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return mask


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def as_triples(positions: SelectedPositions) -> list[list[tuple[int, int, int]]]:
    fields = (positions.rollout_start.tolist(), positions.chunk_start.tolist(), positions.offset.tolist())
    return [list(zip(r, s, t, strict=True)) for r, s, t in zip(*fields, strict=True)]


@pytest.mark.parametrize("window", [1, 2, 4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smooth_entropy_matches_loop(window: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(window)
    entropy = (torch.rand(3, 23, generator=gen) * 4).to(dtype)
    got = smooth_entropy(entropy, window)
    assert got.dtype == dtype and got.shape == entropy.shape
    want = torch.tensor([ref_smooth(row, window) for row in entropy.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_smooth_entropy_hand_values_and_bf16() -> None:
    entropy = torch.tensor([[5.0, 0.0, 0.0, 0.0, 10.0]], dtype=torch.bfloat16)
    got = smooth_entropy(entropy, 2)  # K = 3: t=0 -> (0+5+0)/3, t=3 -> (0+0+10)/3, t=4 -> (0+10+0)/3
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[5 / 3, 5 / 3, 0.0, 10 / 3, 10 / 3]]))
    with pytest.raises(ValueError, match="window"):
        smooth_entropy(entropy, 0)


@pytest.mark.parametrize("mode", SELECTION_MODES)
@pytest.mark.parametrize("num_chunks,window,margin", [(3, 5, 4), (4, 2, 1), (7, 4, 0), (5, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_pads", [True, False])
def test_select_positions_matches_loop(
    mode: str, num_chunks: int, window: int, margin: int, dtype: torch.dtype, zero_pads: bool
) -> None:
    pads, seq_len = [0, 3, 10, 17, 30, 1], 97  # odd lengths 97, 94, 87, 80, 67, 96: M rarely divides L
    gen = torch.Generator().manual_seed(1234 + num_chunks)
    entropy = torch.rand(len(pads), seq_len, generator=gen, dtype=torch.float64) * 6
    if mode in ("argmax", "argmin"):
        entropy = torch.randint(0, 4, entropy.shape, generator=gen).double() / 2  # many ties: first index wins
    entropy = entropy.to(dtype)
    mask = left_padded_mask(pads, seq_len)
    seeds = [11 * b + num_chunks for b in range(len(pads))]
    stochastic = mode in STOCHASTIC
    gens = (lambda: generators(seeds)) if stochastic else (lambda: None)
    got = select_positions(entropy, mask, num_chunks, mode, window, margin, gens(), zero_pad_entropy=zero_pads)
    want = ref_select(entropy, mask, num_chunks, mode, window, margin, gens(), zero_pad_entropy=zero_pads)
    assert as_triples(got) == want
    # The chosen (pre-clamp) position is always a real token, and so is the last prefix token.
    chosen = got.chunk_start + got.offset
    assert bool(mask.gather(1, chosen).all()) and bool(mask.gather(1, got.rollout_start - 1).all())
    torch.testing.assert_close(got.chosen_entropy, entropy.float().gather(1, chosen))
    assert torch.equal(got.clamped, got.rollout_start != chosen + 1)


def test_pads_never_chosen_even_with_huge_pad_entropy() -> None:
    mask = left_padded_mask([40, 5], 60)
    entropy = torch.where(mask.bool(), 0.0, 1e3)  # pad entropy would dominate any softmax or argmax
    for mode in SELECTION_MODES:
        got = select_positions(entropy, mask, 4, mode, margin=1, generators=generators([0, 1]))
        assert bool(mask.gather(1, got.chunk_start + got.offset).all())


@pytest.mark.parametrize("mode", SELECTION_MODES)
def test_batch_invariance(mode: str) -> None:
    pads, seq_len = [0, 9, 21, 4], 80
    gen = torch.Generator().manual_seed(7)
    mask = left_padded_mask(pads, seq_len)
    entropy = torch.rand(len(pads), seq_len, generator=gen) * 3 * mask  # pads zeroed, as a clean caller would
    seeds = [101, 202, 303, 404]
    batch = select_positions(entropy, mask, 5, mode, margin=3, generators=generators(seeds))
    for b in range(len(pads)):
        one = generators([seeds[b]])
        alone = select_positions(entropy[b : b + 1], mask[b : b + 1], 5, mode, margin=3, generators=one)
        assert torch.equal(alone.rollout_start, batch.rollout_start[b : b + 1])
        assert torch.equal(alone.offset, batch.offset[b : b + 1])
        # Unpadded and alone: with pad entropies zeroed the zero-padded average is the same, so the positions are
        # the batch's shifted by the pad count.
        real = mask[b].bool()
        bare = select_positions(
            entropy[b : b + 1, real], mask[b : b + 1, real], 5, mode, margin=3, generators=generators([seeds[b]])
        )
        assert torch.equal(bare.rollout_start + pads[b], batch.rollout_start[b : b + 1])


def test_batch_order_does_not_matter() -> None:
    mask = left_padded_mask([0, 12, 3], 70)
    entropy = torch.rand(3, 70, generator=torch.Generator().manual_seed(3)) * mask
    seeds, order = [5, 6, 7], [2, 0, 1]
    forward = select_positions(entropy, mask, 4, generators=generators(seeds)).rollout_start
    shuffled = select_positions(entropy[order], mask[order], 4, generators=generators([seeds[i] for i in order]))
    assert torch.equal(shuffled.rollout_start, forward[order])


def test_clamps_at_both_ends() -> None:
    seq_len, pad, margin = 50, 10, 6  # L = 40, M = 4, c = 10
    mask = left_padded_mask([pad], seq_len)
    entropy = torch.zeros(1, seq_len)
    entropy[0, pad] = 5.0  # chunk 0: argmax at s0 -> r = s0 + 1, clamped up to s0 + margin = 16
    entropy[0, seq_len - 1] = 5.0  # chunk 3: argmax at S-1 -> r = S = 50, clamped down to S - margin = 44
    got = select_positions(entropy, mask, 4, "argmax", margin=margin)
    assert got.offset.tolist() == [[0, 0, 0, 9]]
    assert got.chunk_start.tolist() == [[10, 20, 30, 40]]
    assert got.rollout_start.tolist() == [[16, 21, 31, 44]]
    assert got.clamped.tolist() == [[True, False, False, True]]
    assert got.chosen_entropy.tolist() == [[5.0, 0.0, 0.0, 5.0]]


def test_tail_of_l_mod_m_never_chosen() -> None:
    mask = left_padded_mask([2], 25)  # L = 23, M = 4 -> c = 5, the last 3 tokens (22..24) are never chosen
    entropy = torch.zeros(1, 25)
    entropy[0, 22:] = 100.0
    got = select_positions(entropy, mask, 4, "argmax", margin=0)
    assert got.chunk_start.tolist() == [[2, 7, 12, 17]]
    assert int((got.chunk_start + got.offset).max()) <= 21


def test_errors_name_the_document_and_the_fix() -> None:
    mask = left_padded_mask([0, 27], 30)  # document 1 has 3 real tokens
    entropy = torch.rand(2, 30)
    with pytest.raises(ValueError, match=r"document 1 has 3 real tokens, fewer than num_chunks=4.*lower num_chunks"):
        select_positions(entropy, mask, 4, "argmax", margin=0)
    mask = left_padded_mask([0, 20], 30)  # document 1 has 10 real tokens < 2 * margin
    with pytest.raises(ValueError, match=r"document 1 has 10 real tokens, fewer than 2\*margin=12.*lower margin"):
        select_positions(entropy, mask, 2, "argmax", margin=6)
    select_positions(entropy, mask, 2, "argmax", margin=5)  # L = 2 * margin is the shortest that works
    right_padded = torch.ones(2, 30, dtype=torch.long)
    right_padded[1, 25:] = 0
    with pytest.raises(ValueError, match="row 1 is not left-padded"):
        select_positions(entropy, right_padded, 2, "argmax", margin=0)
    with pytest.raises(ValueError, match="unknown selection mode"):
        select_positions(entropy, mask, 2, "top_k")
    with pytest.raises(ValueError, match="one per document"):
        select_positions(entropy, mask, 2, "entropy", margin=0, generators=generators([1]))
    nan_entropy = entropy.clone()
    nan_entropy[1, 25] = float("nan")
    with pytest.raises(ValueError, match="document 1 has non-finite"):
        select_positions(nan_entropy, mask, 2, "argmax", margin=0)


def test_entropy_mode_follows_the_softmax() -> None:
    # 3000 identical documents of 2 chunks of c = 4, window 1 (no smoothing): p(τ = t) ∝ exp(H_t).
    n_docs, chunk = 3000, torch.tensor([0.0, 1.0, 2.0, 3.0])
    entropy = chunk.repeat(2).expand(n_docs, 8)
    mask = torch.ones(n_docs, 8, dtype=torch.long)
    got = select_positions(entropy, mask, 2, "entropy", window=1, margin=0, generators=generators(list(range(n_docs))))
    freq = torch.bincount(got.offset.flatten(), minlength=4).double() / got.offset.numel()
    # 6000 draws: 0.02 is more than 3 binomial standard deviations for every probability.
    torch.testing.assert_close(freq, torch.softmax(chunk.double(), 0), rtol=0, atol=0.02)


def test_entropy_mode_prefers_high_entropy_positions() -> None:
    # One document of 4 chunks of 100 tokens; 10 high-entropy (5 nats) tokens per chunk among zeros.
    n_docs, seq_len = 200, 400
    entropy = torch.zeros(seq_len)
    high = torch.zeros(seq_len, dtype=torch.bool)
    for start in (30, 140, 260, 370):
        high[start : start + 10] = True
    entropy[high] = 5.0
    entropy, mask = entropy.expand(n_docs, seq_len), torch.ones(n_docs, seq_len, dtype=torch.long)
    seeds = generators(list(range(n_docs)))
    picked = select_positions(entropy, mask, 4, "entropy", margin=0, generators=seeds)
    uniform = select_positions(entropy, mask, 4, "uniform", margin=0, generators=generators(list(range(n_docs))))
    hit_rate = high[picked.chunk_start + picked.offset].double().mean()
    uniform_rate = high[uniform.chunk_start + uniform.offset].double().mean()
    assert hit_rate > 0.9 and uniform_rate < 0.2
    assert float(picked.chosen_entropy.mean()) > 4.0


def test_global_generator_is_reproducible() -> None:
    mask = left_padded_mask([0, 5], 40)
    entropy = torch.rand(2, 40, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(42)
    first = select_positions(entropy, mask, 4, margin=2).rollout_start
    torch.manual_seed(42)
    assert torch.equal(select_positions(entropy, mask, 4, margin=2).rollout_start, first)


def test_pad_entropy_smoothing_flag_on_a_left_padded_row() -> None:
    # One row, 3 pads with entropy 6 each, then 12 real tokens of entropy 1; M = 2 chunks of 6, window K = 5.
    # Zeroed pads: the smoothed real entropies of chunk 0 are (0+0+1+1+1)/5 = 0.6, (0+1+1+1+1)/5 = 0.8, then 1.0.
    # Official (pads as given): the first two real positions average in two and one pad entropies:
    # (6+6+1+1+1)/5 = 3.0 and (6+1+1+1+1)/5 = 2.0, then 1.0. Chunk 1 is the same either way.
    mask = left_padded_mask([3], 15)
    entropy = torch.where(mask.bool(), 1.0, 6.0).double()
    ours = select_positions(entropy, mask, 2, "entropy", window=5, margin=1, generators=generators([0]))
    official = select_positions(
        entropy, mask, 2, "entropy", window=5, margin=1, generators=generators([0]), zero_pad_entropy=False
    )

    def softmax(scores: list[float]) -> list[float]:
        weights = [math.exp(v) for v in scores]
        return [w / sum(weights) for w in weights]

    want_ours = torch.tensor(softmax([0.6, 0.8, 1, 1, 1, 1]), dtype=torch.float64)
    want_official = torch.tensor(softmax([3.0, 2.0, 1, 1, 1, 1]), dtype=torch.float64)
    torch.testing.assert_close(ours.chunk_probs[0, 0], want_ours)
    torch.testing.assert_close(official.chunk_probs[0, 0], want_official)
    # Chunk 1 (real tokens 6..11; the last real position's window runs past the row end): the same in both.
    torch.testing.assert_close(ours.chunk_probs[0, 1], official.chunk_probs[0, 1], rtol=0, atol=0)
    # Ours gives the padded row the probabilities of the same document unpadded; the official smoothing does not.
    alone = select_positions(entropy[:, 3:], mask[:, 3:], 2, "entropy", window=5, margin=1, generators=generators([0]))
    torch.testing.assert_close(ours.chunk_probs, alone.chunk_probs, rtol=0, atol=0)
    assert not torch.allclose(official.chunk_probs, alone.chunk_probs)
    # Deterministic modes read the raw entropies (never smoothed) and draw nothing.
    assert select_positions(entropy, mask, 2, "argmax", margin=1).chunk_probs is None
