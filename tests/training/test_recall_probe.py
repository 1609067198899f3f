"""The held-out recall probe against slow, obviously correct definitions."""

from __future__ import annotations

import random

import pytest
import torch

from refine_core.data.batching import left_pad
from refine_core.training.recall_probe import recall_hits, recall_positions


def _reference_positions(docs: list[list[int]], context: int) -> list[list[tuple[int, int]]]:
    """The definition, literally: t counts when doc[t-context : t+1] occurs at an earlier start in this document and
    as a contiguous span of no other document; its pair is the target of the span's first occurrence."""
    size = context + 1

    def occurs(doc: list[int], span: list[int]) -> bool:
        return any(doc[i : i + size] == span for i in range(len(doc) - size + 1))

    out = []
    for index, doc in enumerate(docs):
        found = []
        for t in range(context, len(doc)):
            span = doc[t - context : t + 1]
            earlier = [s for s in range(t - context) if doc[s : s + size] == span]
            elsewhere = any(occurs(other, span) for j, other in enumerate(docs) if j != index)
            if earlier and not elsewhere:
                found.append((earlier[0] + context, t))
        out.append(found)
    return out


@pytest.mark.parametrize("context", [1, 2, 4])
def test_positions_match_the_definition(context: int) -> None:
    rng = random.Random(context)
    # a small alphabet makes repeats common; one shared phrase in every document is never document-specific
    docs = [[rng.randrange(4) for _ in range(rng.randrange(0, 60))] + [9, 9, 9, 9, 9, 9] for _ in range(6)]
    assert recall_positions(docs, context) == _reference_positions(docs, context)


def test_a_repeated_name_counts_and_a_shared_phrase_does_not() -> None:
    shared = [50, 51, 52, 53, 54]
    docs = [[1, 2, 3, 4, 5, *shared, 1, 2, 3, 4, 5, *shared], [7, 8, *shared, 6, 6]]
    positions = recall_positions(docs, context=4)
    # the second [1..5]'s last token (14), then the shared phrase's tokens while the 5-gram still reaches back into
    # the document's own [.., 5] (15-18); from 19 on, the 5-gram is the shared phrase alone, found in both documents
    assert positions[0] == [(4, 14), (5, 15), (6, 16), (7, 17), (8, 18)]
    assert positions[1] == []
    with pytest.raises(ValueError, match="context"):
        recall_positions(docs, context=0)


def test_hits_equal_the_argmax_of_full_logits_in_a_left_padded_batch() -> None:
    torch.manual_seed(0)
    docs = [torch.randint(0, 11, (n,)) for n in (9, 14, 5)]
    ids, mask = left_pad(docs, pad_id=0)
    hidden = torch.randn(*ids.shape, 6)
    weight = torch.randn(11, 6)
    positions = [[3, 8], [1, 5, 13], []]
    correct, scored = recall_hits(hidden, weight, ids, mask, positions)
    expected = 0
    logits = hidden @ weight.T  # [B, T, V], the slow way
    for row, doc_positions in enumerate(positions):
        pad = ids.shape[1] - len(docs[row])
        for t in doc_positions:
            expected += int(logits[row, pad + t - 1].argmax() == docs[row][t])
    assert scored == 5 and correct == expected
    # a "model" whose prediction at every column is the next token scores every position
    onehot = torch.zeros(*ids.shape, 11)
    onehot[:, :-1] = torch.nn.functional.one_hot(ids[:, 1:], 11).float()
    assert recall_hits(onehot, torch.eye(11), ids, mask, positions) == (5, 5)
    assert recall_hits(hidden, weight, ids, mask, [[], [], []]) == (0, 0)
