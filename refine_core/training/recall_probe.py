"""Held-out in-context recall: which next tokens a model can only get right by reading its own document.

The held-out loss says how well a model predicts text in general; it moves with every bit of vocabulary the model
learns. What fast weights are for, and what REFINE's next-sequence reward trains, is recalling a span the document
itself showed earlier. This probe scores exactly those positions: a target token at position ``t`` counts when the
``context`` tokens before it and the token itself (an ``(context + 1)``-gram) appeared earlier in the same document,
and that ``(context + 1)``-gram appears in no other document of the held-out set. The second condition keeps out
common phrases (" the ", "said "), which a model predicts from its prior alone; what is left is document-specific:
names, places, the facts of this text. The score is the teacher-forced top-1 accuracy at those positions
(``eval/recall_acc``), on the same documents and in the same pass as the held-out loss. Its control is the accuracy
on the same spans at their first occurrence (``eval/first_mention_acc``), where nothing earlier in the document
helps: a model that recalls scores higher on the repeat than on the first mention; one that has only learned the
vocabulary scores about the same on both.

With a byte tokenizer and the synthetic corpus (a cast of named characters per document, first names repeated after
their first mention), these are mostly the letters of repeated names and places; on real text, repeated entities
and numbers. It is a probe, not a benchmark: RULER NIAH and the QA tasks are the paper's measures (spec §5).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

DEFAULT_CONTEXT = 4


def _grams(doc: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(doc[i : i + size]) for i in range(len(doc) - size + 1)]


def recall_positions(
    docs: Sequence[Sequence[int]], context: int = DEFAULT_CONTEXT
) -> list[list[tuple[int, int]]]:
    """For each document, its in-context recall targets as ``(first, repeat)`` position pairs (0-based).

    ``repeat`` (``>= context``) counts when ``doc[repeat - context : repeat + 1]`` also starts earlier in the same
    document and occurs in no other document of ``docs``; ``first`` is the same span's target at its first
    occurrence. Scoring both gives the recall itself and, as its control, the same tokens where only the model's
    prior can predict them (a span seen three times pairs both repeats with its first occurrence).

    Args:
        docs: token ids of the held-out documents (the set decides what is document-specific).
        context: tokens before the target that must match the earlier occurrence.

    Returns:
        One list of ``(first, repeat)`` pairs per document, by ``repeat``.
    """
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    size = context + 1
    documents_with: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for index, doc in enumerate(docs):
        for gram in _grams(doc, size):
            documents_with[gram].add(index)
    pairs: list[list[tuple[int, int]]] = []
    for index, doc in enumerate(docs):
        first_start: dict[tuple[int, ...], int] = {}
        found: list[tuple[int, int]] = []
        for start, gram in enumerate(_grams(doc, size)):
            if gram in first_start:
                if documents_with[gram] == {index}:
                    found.append((first_start[gram] + context, start + context))  # targets: the grams' last tokens
            else:
                first_start[gram] = start
        pairs.append(found)
    return pairs


def recall_hits(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: Sequence[Sequence[int]],
) -> tuple[int, int]:
    """Correct top-1 predictions and the number of scored targets in one left-padded batch.

    Args:
        hidden: ``[B, T, H]`` final hidden states of the batch (column ``i`` predicts the token at ``i + 1``).
        lm_head_weight: ``[V, H]``.
        input_ids: ``[B, T]``, each row a document left-padded to ``T``.
        attention_mask: ``[B, T]``, 1 on the document's tokens (its padding is ``T - mask.sum()``).
        positions: per row, target positions within the unpadded document (:func:`recall_positions`).

    Returns:
        ``(correct, scored)``; only the scored positions' logits are computed (no ``[B, T, V]`` tensor).
    """
    rows = [row for row, doc_positions in enumerate(positions) for _ in doc_positions]
    if not rows:
        return 0, 0
    device = hidden.device
    row_index = torch.tensor(rows, device=device)
    target = torch.tensor([t for doc_positions in positions for t in doc_positions], device=device)
    padding = (attention_mask.shape[1] - attention_mask.sum(1)).to(device)[row_index]
    column = padding + target  # the target's column in the padded row
    logits = hidden[row_index, column - 1].float() @ lm_head_weight.float().T  # [N, V]
    correct = (logits.argmax(-1) == input_ids.to(device)[row_index, column]).sum()
    return int(correct), len(rows)
