"""Shards and manifest round trip; left padding; DocumentBatcher determinism and exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from refine_core.data.batching import DocumentBatcher, iter_eval_batches, left_pad
from refine_core.data.shards import (
    SCHEMA_VERSION,
    ShardWriter,
    TokenizedDataset,
    check_tokenizer,
    load_manifest,
    write_manifest,
)

FINGERPRINT = "ab" * 32


def _docs(n: int) -> list[list[int]]:
    return [[(7 * i + j) % 250 for j in range(3 + (i % 5))] for i in range(n)]


def _prepare(root: Path, docs: list[list[int]], shard_docs: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(root, "train", shard_docs)
    for i, d in enumerate(docs):
        writer.add(f"doc-{i}", d)
    evals = ShardWriter(root, "eval", shard_docs)
    evals.add("held-0", [1, 2, 3])
    write_manifest(root, {"schema_version": SCHEMA_VERSION, "splits": {"train": writer.close(), "eval": evals.close()},
                          "tokenizer": {"name": "byte", "fingerprint": FINGERPRINT, "vocab_size": 259,
                                        "pad_token_id": 256, "eos_token_id": 257}})
    return root


# ------------------------------------------------------------------------------------------------------- shards


def test_shard_files_and_round_trip(tmp_path: Path) -> None:
    docs = _docs(10)
    root = _prepare(tmp_path / "p", docs)
    assert sorted(p.name for p in root.glob("*.parquet")) == [
        "eval-00000.parquet", "train-00000.parquet", "train-00001.parquet", "train-00002.parquet",
        "train-00003.parquet"]
    table = pq.read_table(root / "train-00001.parquet")
    assert str(table.schema.field("input_ids").type) == "list<element: int32>"
    assert str(table.schema.field("num_tokens").type) == "int32"
    assert table.column("doc_id").to_pylist() == ["doc-3", "doc-4", "doc-5"]
    assert table.column("num_tokens").to_pylist() == [len(docs[i]) for i in (3, 4, 5)]

    ds = TokenizedDataset(root, "train", expected_fingerprint=FINGERPRINT)
    assert len(ds) == 10
    assert [ds[i] for i in range(10)] == docs
    assert ds[-1] == docs[-1]
    assert ds.doc_id(7) == "doc-7" and ds.num_tokens(7) == len(docs[7])
    t = ds.get_tensor(4)
    assert t.dtype == torch.long and t.tolist() == docs[4]
    assert ds.pad_token_id == 256
    with pytest.raises(IndexError):
        ds[10]
    info = load_manifest(root)["splits"]["train"]
    assert info["num_docs"] == 10 and info["shard_docs"] == [3, 3, 3, 1]
    lengths = [len(d) for d in docs]
    assert info["token_lengths"]["min"] == min(lengths) and info["token_lengths"]["max"] == max(lengths)
    assert info["token_lengths"]["mean"] == pytest.approx(sum(lengths) / 10)
    assert TokenizedDataset(root, "eval")[0] == [1, 2, 3]


def test_unprepared_dir_and_wrong_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="refine prepare-data"):
        TokenizedDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json.*refine prepare-data"):
        TokenizedDataset(tmp_path / "empty")
    root = _prepare(tmp_path / "p", _docs(4))
    with pytest.raises(ValueError, match="tokenized with 'byte'.*re-run `refine prepare-data`"):
        TokenizedDataset(root, expected_fingerprint="cd" * 32)
    with pytest.raises(ValueError, match="split 'test'"):
        TokenizedDataset(root, "test")
    check_tokenizer(load_manifest(root), FINGERPRINT)  # no error


def test_schema_and_corruption_are_reported(tmp_path: Path) -> None:
    root = _prepare(tmp_path / "p", _docs(4))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shard_docs"][0] = 2
    manifest["splits"]["train"]["num_docs"] = 3
    write_manifest(root, manifest)
    with pytest.raises(ValueError, match="corrupt"):
        TokenizedDataset(root)[0]
    manifest["schema_version"] = 99
    write_manifest(root, manifest)
    with pytest.raises(ValueError, match="schema version 99"):
        load_manifest(root)


# ------------------------------------------------------------------------------------------------------ batching


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4], torch.tensor([5, 6])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = left_pad([[1, 2]], pad_id=9, length=4)
    assert ids.tolist() == [[9, 9, 1, 2]] and mask.tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="truncate"):
        left_pad([[1, 2, 3]], pad_id=0, length=2)
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="at least one"):
        left_pad([], pad_id=0)


def _take(batcher: DocumentBatcher, n: int) -> list[list[int]]:
    return [batcher.next_batch().doc_indices for _ in range(n)]


def test_batcher_epochs_are_seeded_permutations() -> None:
    data = _docs(10)
    batches = _take(DocumentBatcher(data, batch_size=5, seed=3, pad_id=0), 4)
    assert batches == _take(DocumentBatcher(data, batch_size=5, seed=3, pad_id=0), 4)
    assert batches != _take(DocumentBatcher(data, batch_size=5, seed=4, pad_id=0), 4)
    epoch0, epoch1 = batches[0] + batches[1], batches[2] + batches[3]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert epoch1 == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()


def test_batcher_wraps_across_epochs_and_pads() -> None:
    data = _docs(7)
    batcher = DocumentBatcher(data, batch_size=3, seed=0, pad_id=255)
    seen = [i for b in _take(batcher, 7) for i in b]  # 21 documents = exactly 3 epochs
    assert all(len(set(seen[k : k + 7])) == 7 for k in (0, 7, 14))
    assert batcher.state_dict() == {"epoch": 3, "position": 0}
    batch = DocumentBatcher(data, batch_size=4, seed=0, pad_id=255).next_batch()
    for row, i in enumerate(batch.doc_indices):
        real = batch.attention_mask[row].bool()
        assert batch.input_ids[row][real].tolist() == data[i]
        assert (batch.input_ids[row][~real] == 255).all()
        assert real[-1]  # left padding: the last column is always a real token
    big = DocumentBatcher(data[:2], batch_size=5, seed=0, pad_id=0)  # batch larger than the dataset
    assert Counter(big.next_indices()).most_common(1)[0][1] >= 2
    ordered = DocumentBatcher(data, batch_size=4, seed=0, pad_id=0, shuffle=False)
    assert _take(ordered, 2) == [[0, 1, 2, 3], [4, 5, 6, 0]]


def test_batcher_resume_gives_identical_batches() -> None:
    data = _docs(11)
    reference = DocumentBatcher(data, batch_size=4, seed=7, pad_id=0)
    expected = [reference.next_batch() for _ in range(9)]
    first = DocumentBatcher(data, batch_size=4, seed=7, pad_id=0)
    for _ in range(4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's JSON
    assert set(state) == {"epoch", "position"}
    resumed = DocumentBatcher(data, batch_size=4, seed=7, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = resumed.next_batch()
        assert got.doc_indices == want.doc_indices
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)
    with pytest.raises(ValueError, match="other prepared data"):
        resumed.load_state_dict({"epoch": 0, "position": 11})


def test_batcher_on_tokenized_dataset(tmp_path: Path) -> None:
    root = _prepare(tmp_path / "p", _docs(10))
    ds = TokenizedDataset(root)
    batch = DocumentBatcher(ds, batch_size=4, seed=0, pad_id=ds.pad_token_id, pad_to=12).next_batch()
    assert batch.input_ids.shape == (4, 12)
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist() == ds[batch.doc_indices[0]]


def test_eval_batches_in_file_order() -> None:
    data = _docs(7)
    batches = list(iter_eval_batches(data, batch_size=3, pad_id=0))
    assert [b.doc_indices for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]  # the tail is kept
    assert [b.doc_indices for b in iter_eval_batches(data, batch_size=3, pad_id=0, max_docs=4)] == [[0, 1, 2], [3]]
    assert batches[2].input_ids.tolist() == [data[6]]
