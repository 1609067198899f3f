"""Where the rollouts start: one entropy-guided position per chunk of each document (spec §2 step 1).

Given the next-token entropies of a batch of left-padded documents, :func:`select_positions` splits each document's
real tokens into ``M`` equal chunks and picks one position per chunk; the rollout starts right after it::

    positions = select_positions(entropy, attention_mask, num_chunks=8, generators=doc_generators)
    positions.rollout_start  # [B, M]: the prefix is x[b, :r], the ground truth x[b, r:r+k]

Sampling is batch-invariant: document ``b`` draws only from ``generators[b]``, so a document gets the same positions
alone or inside any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELECTION_MODES = ("entropy", "argmax", "argmin", "uniform")


@dataclass(frozen=True)
class SelectedPositions:
    """The ``M`` rollout starts of each of ``B`` documents, with what is needed to log how they were chosen.

    Attributes:
        rollout_start: ``[B, M]`` long, r_j: index of the first rollout token, i.e. the first token NOT in the prefix.
        chunk_start: ``[B, M]`` long, s0 + j·c: absolute index of the first token of chunk j.
        offset: ``[B, M]`` long, τ_j: the chosen offset inside chunk j (before the clamp).
        chosen_entropy: ``[B, M]`` float32, the raw entropy at the chosen position chunk_start + offset (= r_j - 1
            before the clamp).
        clamped: ``[B, M]`` bool, whether the margin clamp moved r_j away from chunk_start + offset + 1.
        chunk_probs: ``[B, M, C]`` float64, the distribution τ_j was drawn from (C = the longest chunk; 0 past a
            chunk's end); ``None`` in the deterministic modes.
    """

    rollout_start: torch.Tensor
    chunk_start: torch.Tensor
    offset: torch.Tensor
    chosen_entropy: torch.Tensor
    clamped: torch.Tensor
    chunk_probs: torch.Tensor | None = None


def smooth_entropy(entropy: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average of each entropy row, zero-padded at both ends (spec §2 step 1.1).

    The kernel is ``K = window`` if odd, else ``window + 1``; position t averages ``entropy[t-K//2 : t+K//2+1]``
    with values outside ``[0, S)`` counted as 0 and always divided by K (``avg_pool1d``'s ``count_include_pad``).

    Args:
        entropy: ``[B, S]`` entropies in nats.
        window: the configured window (the rollout length k in the official code).

    Returns:
        ``[B, S]`` smoothed entropies, float32 (float64 inputs stay float64).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}; set the entropy smoothing window to a positive int.")
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be [B, S], got shape {tuple(entropy.shape)}.")
    kernel = window if window % 2 == 1 else window + 1  # spec §2 step 1.1: K = k if odd else k + 1
    values = entropy if entropy.dtype == torch.float64 else entropy.float()  # spec §10.18: not in bf16
    pooled = F.avg_pool1d(values.unsqueeze(1), kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled.squeeze(1)  # [B, S]: odd K and padding K//2 keep the length


def _left_padded_span(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s0, L)``, each ``[B]`` long: first real index and number of real tokens; checks the rows are left-padded."""
    real = attention_mask != 0
    length = real.sum(dim=1)
    first = real.shape[1] - length
    positions = torch.arange(real.shape[1], device=real.device)
    layout_ok = (real == (positions[None, :] >= first[:, None])).all(dim=1)
    if not bool(layout_ok.all()):
        bad = int((~layout_ok).nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {bad} is not left-padded: its real tokens must be one block ending at the last "
            "position (spec §1). Left-pad the documents before selecting positions."
        )
    return first, length


def _check_lengths(length: torch.Tensor, num_chunks: int, margin: int) -> None:
    short = (length < num_chunks).nonzero()
    if short.numel():
        b = int(short[0, 0])
        raise ValueError(
            f"document {b} has {int(length[b])} real tokens, fewer than num_chunks={num_chunks}: lower num_chunks "
            "(ttt_n_chunks) or drop documents that short."
        )
    # spec §2 step 1.4: the clamp range [s0 + margin, S - margin] is empty when L < 2·margin.
    cramped = (length < 2 * margin).nonzero()
    if cramped.numel():
        b = int(cramped[0, 0])
        raise ValueError(
            f"document {b} has {int(length[b])} real tokens, fewer than 2*margin={2 * margin}, so no rollout start "
            f"keeps {margin} tokens on both sides: lower margin or drop documents that short."
        )


def _draw_uniforms(
    generators: Sequence[torch.Generator] | None, batch: int, num_chunks: int, device: torch.device
) -> torch.Tensor:
    """``[B, M]`` float64 uniforms; row b comes from exactly one ``torch.rand(M)`` call on ``generators[b]``."""
    if generators is None:
        # The global generator: reproducible under torch.manual_seed, but not batch-invariant.
        rows = [torch.rand(num_chunks, dtype=torch.float64) for _ in range(batch)]
    else:
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} documents; pass one per document.")
        rows = [torch.rand(num_chunks, generator=g, dtype=torch.float64, device=g.device) for g in generators]
    return torch.stack([row.to(device) for row in rows])


def select_positions(
    entropy: torch.Tensor,
    attention_mask: torch.Tensor,
    num_chunks: int,
    mode: str = "entropy",
    window: int = 5,
    margin: int = 20,
    generators: Sequence[torch.Generator] | None = None,
    zero_pad_entropy: bool = True,
) -> SelectedPositions:
    """Choose one rollout start per chunk of each left-padded document (spec §2 steps 1.1-1.4).

    With s0 the first real index and L the number of real tokens of a row, c = L // M and chunk j is
    ``[s0 + j·c, s0 + (j+1)·c)`` (the last L mod M tokens are never chosen). The offset τ_j inside chunk j is

    * ``"entropy"``: a draw from softmax(smoothed entropy over the chunk) (temperature 1, nats);
    * ``"argmax"`` / ``"argmin"``: the highest / lowest RAW entropy, first index on ties (no smoothing);
    * ``"uniform"``: a uniform draw.

    The rollout starts at r_j = clamp(s0 + j·c + τ_j + 1, s0 + margin, S - margin): the chosen token is the last
    prefix token. Pick ``margin >= k`` so that the ground truth ``x[r_j : r_j + k]`` exists.

    Draws are inverse-CDF: document b takes one ``torch.rand(M, dtype=float64)`` from ``generators[b]`` and uses
    value j for chunk j, so its positions do not depend on the rest of the batch. Deterministic modes draw nothing.

    Args:
        entropy: ``[B, S]`` next-token entropies in nats, for every position. Smoothing runs on the row as given.
        attention_mask: ``[B, S]`` 0/1 (or bool), left-padded.
        num_chunks: M, positions per document.
        mode: one of ``SELECTION_MODES``.
        window: smoothing window for ``"entropy"`` (rounded up to odd).
        margin: minimum number of real prefix tokens and of tokens after the rollout start.
        generators: one generator per document for ``"entropy"``/``"uniform"``; ``None`` uses torch's global
            generator (reproducible but not batch-invariant).
        zero_pad_entropy: treat the pads' entropies as 0 before smoothing (default), so the first ``window // 2``
            real positions of a left-padded row see the same zeros as an unpadded document's; ``False`` smooths the
            row as given, over the pads' own entropies, as the official code does (spec §10.8).

    Returns:
        :class:`SelectedPositions` with ``[B, M]`` fields.

    Raises:
        ValueError: bad shapes, mode or window; a row that is not left-padded; a document with fewer than
            ``num_chunks`` or ``2 * margin`` real tokens.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}; use one of {SELECTION_MODES}.")
    if entropy.dim() != 2 or attention_mask.shape != entropy.shape:
        raise ValueError(
            f"entropy and attention_mask must both be [B, S], got {tuple(entropy.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    if num_chunks < 1 or margin < 0:
        raise ValueError(f"need num_chunks >= 1 and margin >= 0, got num_chunks={num_chunks}, margin={margin}.")
    batch, seq_len = entropy.shape
    if batch == 0:
        raise ValueError("select_positions got an empty batch; pass at least one document.")
    device = entropy.device
    first, length = _left_padded_span(attention_mask)  # spec §2 notation: s0, L
    _check_lengths(length, num_chunks, margin)

    chunk_len = length // num_chunks  # spec §2 step 1.2: c = ⌊L / M⌋
    chunk_ids = torch.arange(num_chunks, device=device)
    chunk_start = first[:, None] + chunk_ids[None, :] * chunk_len[:, None]  # [B, M]
    steps = torch.arange(int(chunk_len.max()), device=device)
    in_chunk = (steps[None, None, :] < chunk_len[:, None, None]).expand(batch, num_chunks, -1)  # [B, M, C]
    index = torch.where(in_chunk, chunk_start[:, :, None] + steps, 0)  # [B, M, C]; 0 = any valid filler

    raw = entropy.float() if entropy.dtype != torch.float64 else entropy
    # spec §2 step 1.1: smoothing only in "entropy" mode. The official code averages the row as given, so the pads'
    # entropies leak into the first K//2 real positions of a left-padded row and a document's positions depend on
    # how much its batch padded it (spec §10.8). We zero them first (a deliberate fix; ``zero_pad_entropy=False``
    # is the official behaviour). Pads themselves are never gathered either way.
    if zero_pad_entropy:
        raw = raw * (attention_mask != 0)
    source = smooth_entropy(raw, window) if mode == "entropy" else raw
    scores = source.gather(1, index.reshape(batch, -1)).reshape(index.shape)  # [B, M, C]
    finite = torch.isfinite(scores) | ~in_chunk
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"document {bad} has non-finite entropies inside its chunks; check the entropy forward pass.")

    # spec §2 step 1.3
    probs = None
    if mode == "argmax":
        offset = scores.masked_fill(~in_chunk, float("-inf")).argmax(dim=-1)  # first index on ties
    elif mode == "argmin":
        offset = scores.masked_fill(~in_chunk, float("inf")).argmin(dim=-1)
    else:
        logits = scores.double() if mode == "entropy" else torch.zeros_like(scores, dtype=torch.float64)
        probs = torch.softmax(logits.masked_fill(~in_chunk, float("-inf")), dim=-1)
        cdf = probs.cumsum(dim=-1)  # [B, M, C]
        uniforms = _draw_uniforms(generators, batch, num_chunks, device)  # [B, M]
        # Inverse CDF: τ = first t with u < cdf[t]; the min() guards against cdf[-1] rounding below u.
        offset = (cdf <= uniforms[:, :, None]).sum(dim=-1)
        offset = torch.minimum(offset, chunk_len[:, None] - 1)

    chosen = chunk_start + offset  # [B, M]: the last prefix token, always a real token
    unclamped = chosen + 1
    # spec §2 step 1.4: r_j = clamp(s0 + j·c + τ_j + 1, min = s0 + margin, max = S - margin)
    rollout_start = torch.maximum(unclamped, (first + margin)[:, None]).clamp(max=seq_len - margin)
    return SelectedPositions(
        rollout_start=rollout_start,
        chunk_start=chunk_start,
        offset=offset,
        chosen_entropy=raw.gather(1, chosen).float(),
        clamped=rollout_start != unclamped,
        chunk_probs=probs,
    )
