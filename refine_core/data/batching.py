"""Batches of whole documents, left-padded (spec §1), in a deterministic and resumable order.

* :func:`left_pad` builds ``input_ids`` / ``attention_mask`` with the padding on the left, as the official code
  does (spec §1 and §10.3), so the last real token of every row sits at position ``T - 1``.
* :class:`DocumentBatcher` walks through a dataset in epochs. Epoch ``e`` visits the documents in the order
  ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``; a batch that reaches the end of an
  epoch is completed from the start of the next one, so every batch is full and every document is seen once per
  epoch. Its state is only ``(epoch, position)``, so a resumed run sees exactly the batches it would have seen.
* :func:`iter_eval_batches` goes through a held-out split in file order, keeping the last partial batch (unlike
  the official ``drop_last=True``, spec §10.13).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class DocumentDataset(Protocol):
    """Anything with ``len`` and ``[i] -> token ids`` (e.g. :class:`~refine_core.data.shards.TokenizedDataset`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sequence[int]: ...


@dataclass
class Batch:
    """A left-padded batch of documents.

    Attributes:
        input_ids: ``[B, T]`` int64, pad id on the left of shorter documents.
        attention_mask: ``[B, T]`` int64, 1 on real tokens and 0 on pads.
        doc_indices: the dataset index of each row.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    doc_indices: list[int]


def left_pad(seqs: Sequence[Sequence[int] | torch.Tensor], pad_id: int,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into one batch (spec §1).

    Args:
        seqs: ``B`` sequences of token ids (lists or 1-D tensors), each non-empty.
        pad_id: the pad token id (EOS when the tokenizer has no pad, spec §1).
        length: pad to exactly this length ``T`` (spec §1 pads to ``max_prompt_length``); default: the longest
            sequence. Sequences longer than ``length`` are an error (truncation belongs to data preparation).

    Returns:
        ``(input_ids [B, T], attention_mask [B, T])``, both int64.
    """
    if len(seqs) == 0:
        raise ValueError("left_pad needs at least one sequence")
    tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    longest = max(t.numel() for t in tensors)
    if min(t.numel() for t in tensors) == 0:
        raise ValueError("left_pad got an empty sequence; every document needs at least one token")
    width = longest if length is None else length
    if longest > width:
        raise ValueError(f"a sequence has {longest} tokens, more than the pad length {width}; truncate it first.")
    input_ids = torch.full((len(tensors), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(tensors), width), dtype=torch.long)
    for row, t in enumerate(tensors):
        input_ids[row, width - t.numel() :] = t
        attention_mask[row, width - t.numel() :] = 1
    return input_ids, attention_mask


class DocumentBatcher:
    """Deterministic, resumable batches of ``batch_size`` documents.

    Args:
        dataset: the documents (see :class:`DocumentDataset`).
        batch_size: documents per batch; may exceed ``len(dataset)`` (documents then repeat within a batch).
        seed: epoch ``e`` uses the permutation seeded by ``seed + e``.
        pad_id: pad token id for :func:`left_pad`.
        shuffle: ``False`` visits documents in file order every epoch.
        pad_to: pad every batch to exactly this many tokens (default: the longest document of the batch).
    """

    def __init__(self, dataset: DocumentDataset, batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 pad_to: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if len(dataset) == 0:
            raise ValueError("DocumentBatcher got an empty dataset; prepare data with at least one document.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.pad_to = pad_to
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=generator).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """The dataset indices of the next batch (advances the state)."""
        n = len(self.dataset)
        indices: list[int] = []
        while len(indices) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(indices), n - self.position)
            indices.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == n:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def next_batch(self) -> Batch:
        """The next left-padded batch (advances the state)."""
        indices = self.next_indices()
        input_ids, attention_mask = left_pad([self.dataset[i] for i in indices], self.pad_id, self.pad_to)
        return Batch(input_ids=input_ids, attention_mask=attention_mask, doc_indices=indices)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``: all a checkpoint needs to resume the same sequence of batches."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.dataset):
            raise ValueError(
                f"batcher state epoch={epoch}, position={position} does not fit a dataset of {len(self.dataset)} "
                "documents; was the checkpoint made with other prepared data?"
            )
        self.epoch, self.position = epoch, position


def iter_eval_batches(dataset: DocumentDataset, batch_size: int, pad_id: int, max_docs: int | None = None,
                      pad_to: int | None = None) -> Iterator[Batch]:
    """Batches of the first ``max_docs`` documents in file order; the last batch may be smaller.

    Args:
        dataset: the held-out documents.
        batch_size: documents per batch.
        pad_id: pad token id.
        max_docs: evaluate at most this many documents (``None``: all).
        pad_to: as in :class:`DocumentBatcher`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(dataset) if max_docs is None else min(max_docs, len(dataset))
    for start in range(0, n, batch_size):
        indices = list(range(start, min(start + batch_size, n)))
        input_ids, attention_mask = left_pad([dataset[i] for i in indices], pad_id, pad_to)
        yield Batch(input_ids=input_ids, attention_mask=attention_mask, doc_indices=indices)
