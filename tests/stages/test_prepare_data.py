"""The prepare-data stage end to end: synthetic and parquet corpora, manifest, filters, atomic replacement."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_core.config import load_config
from refine_core.data import shards
from refine_core.data.batching import DocumentBatcher
from refine_core.data.shards import TokenizedDataset, load_manifest
from refine_core.data.sources import synthetic_documents
from refine_core.stages import prepare_data as stage
from refine_core.stages.prepare_data import prepare_data
from refine_core.tokenizer import load_tokenizer, train_bpe_tokenizer


def _cfg(tmp_path: Path, *overrides: str) -> Any:
    return load_config(None, [f"output_dir={tmp_path / 'run'}", "tracking.backend=none", *overrides])


def _synthetic(tmp_path: Path, *overrides: str) -> Any:
    return _cfg(tmp_path, "data.sources=[{path: synthetic, synthetic_docs: 24, synthetic_words: 120}]",
                "data.min_tokens=200", "data.max_tokens=512", "data.eval_docs=4", "data.shard_docs=8", *overrides)


def _corpus(tmp_path: Path) -> Path:
    """A parquet corpus with byte lengths 50, 150, 300, 250, 120 (byte tokenizer: tokens == bytes)."""
    texts = ["a" * 50, "b" * 150, "".join(chr(ord("A") + i % 26) for i in range(300)), "d" * 250, "é" * 60]
    path = tmp_path / "corpus" / "docs.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"content": texts, "n": list(range(5))}), path)
    return path


def test_synthetic_end_to_end(tmp_path: Path) -> None:
    cfg = _synthetic(tmp_path)
    result = prepare_data(cfg)
    assert result.prepared_dir == tmp_path / "run" / "data"
    assert result.counts == {"train": 20, "eval": 4}
    manifest = load_manifest(result.prepared_dir)
    assert result.manifest_path == result.prepared_dir / "manifest.json"
    assert manifest["schema_version"] == shards.SCHEMA_VERSION
    assert manifest["counts"]["docs_read"] == manifest["counts"]["docs_kept"] == 24
    assert manifest["splits"]["train"]["files"] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert manifest["splits"]["train"]["shard_docs"] == [8, 8, 4]
    assert set(manifest["splits"]["train"]["token_lengths"]) == {"min", "mean", "median", "max"}
    tok = manifest["tokenizer"]
    assert (tok["name"], tok["vocab_size"], tok["pad_token_id"], tok["eos_token_id"]) == ("byte", 259, 256, 257)
    saved = load_tokenizer(str(result.prepared_dir / "tokenizer"))
    assert saved.fingerprint() == tok["fingerprint"]
    assert manifest["sources"][0]["path"] == "synthetic" and len(manifest["sources"][0]["fingerprint"]) == 64
    assert manifest["data_config"]["min_tokens"] == 200
    assert manifest["created_at"]

    train = TokenizedDataset(result.prepared_dir, "train", expected_fingerprint=saved.fingerprint())
    evals = TokenizedDataset(result.prepared_dir, "eval")
    ids = {train.doc_id(i) for i in range(len(train))} | {evals.doc_id(i) for i in range(len(evals))}
    assert len(ids) == 24  # every document exactly once
    texts = {f"0/{d.id}": d.text for d in synthetic_documents(24, 120)}
    for i in range(len(train)):
        # no special tokens, truncation keeps the first max_tokens tokens (spec §1)
        assert train[i] == list(texts[train.doc_id(i)].encode())[:512]
    batch = DocumentBatcher(train, batch_size=4, seed=0, pad_id=train.pad_token_id).next_batch()
    assert batch.input_ids.shape[0] == 4


def test_held_out_split_is_deterministic_and_seeded_separately(tmp_path: Path) -> None:
    def eval_ids(*overrides: str) -> list[str]:
        result = prepare_data(_synthetic(tmp_path, *overrides))
        ds = TokenizedDataset(result.prepared_dir, "eval")
        return [ds.doc_id(i) for i in range(len(ds))]

    first = eval_ids()
    assert eval_ids() == first
    assert eval_ids("seed=123") == first  # the run seed does not move the split
    assert eval_ids("data.split_seed=1") != first
    # stream order within the eval split
    assert first == sorted(first)


def test_parquet_length_filter_and_truncation(tmp_path: Path) -> None:
    path = _corpus(tmp_path)
    cfg = _cfg(tmp_path, f"data.sources=[{{path: '{path}', text_column: content}}]", "data.min_tokens=100",
               "data.max_tokens=200", "data.eval_docs=1")
    result = prepare_data(cfg)
    counts = load_manifest(result.prepared_dir)["counts"]
    assert counts == {"docs_read": 5, "docs_kept": 4, "docs_too_short": 1, "docs_truncated": 2,
                      "tokens_read": 50 + 150 + 300 + 250 + 120, "tokens_kept": 150 + 200 + 200 + 120,
                      "longest_doc_tokens": 300}
    docs = {}
    for split in ("train", "eval"):
        ds = TokenizedDataset(result.prepared_dir, split)
        docs.update({ds.doc_id(i): ds[i] for i in range(len(ds))})
    assert set(docs) == {"0/docs.parquet:1", "0/docs.parquet:2", "0/docs.parquet:3", "0/docs.parquet:4"}
    assert docs["0/docs.parquet:2"] == list("".join(chr(ord("A") + i % 26) for i in range(300)).encode())[:200]
    assert docs["0/docs.parquet:4"] == list(("é" * 60).encode())
    stats = result.stats["token_lengths"]
    assert stats["train"]["max"] <= 200 and stats["eval"]["min"] >= 100


def test_trained_hf_tokenizer_and_checkpoint_tokenizer(tmp_path: Path) -> None:
    tok_dir = tmp_path / "ckpt" / "tokenizer"
    bpe = train_bpe_tokenizer((d.text for d in synthetic_documents(16, 200)), vocab_size=350, out_dir=tok_dir)
    # model.tokenizer null: the tokenizer stored with model.source is used
    cfg = _synthetic(tmp_path, f"model.source={tmp_path / 'ckpt'}", "model.tokenizer=null", "data.min_tokens=50",
                     "data.max_tokens=400")
    result = prepare_data(cfg)
    manifest = load_manifest(result.prepared_dir)
    assert manifest["tokenizer"]["fingerprint"] == bpe.fingerprint()
    assert manifest["tokenizer"]["vocab_size"] == 350
    assert manifest["tokenizer"]["bos_token_id"] is None
    saved = load_tokenizer(str(result.prepared_dir / "tokenizer"))
    assert saved.fingerprint() == bpe.fingerprint()
    train = TokenizedDataset(result.prepared_dir, expected_fingerprint=bpe.fingerprint())
    text = {f"0/{d.id}": d.text for d in synthetic_documents(24, 120)}[train.doc_id(0)]
    assert train[0] == bpe.encode(text)[:400]
    with pytest.raises(ValueError, match="tokenized with"):
        TokenizedDataset(result.prepared_dir, expected_fingerprint=load_tokenizer("byte").fingerprint())


def test_failed_run_keeps_the_previous_prepared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_data(_synthetic(tmp_path))
    before = {p.name: p.read_bytes() for p in first.prepared_dir.iterdir() if p.is_file()}

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated crash while writing the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(stage, "write_manifest", crash)
        with pytest.raises(RuntimeError, match="simulated"):
            prepare_data(_synthetic(tmp_path, "data.max_tokens=300"))
    assert {p.name: p.read_bytes() for p in first.prepared_dir.iterdir() if p.is_file()} == before
    assert [p.name for p in first.prepared_dir.parent.iterdir()] == ["data"]  # no temp dirs left

    # a hard crash leaves a temp dir behind; the next run removes it and replaces the old directory
    stale = first.prepared_dir.with_name(".data.tmp-0123456789ab")
    stale.mkdir()
    (stale / "train-00000.parquet").write_bytes(b"partial")
    second = prepare_data(_synthetic(tmp_path, "data.max_tokens=300"))
    assert load_manifest(second.prepared_dir)["splits"]["train"]["token_lengths"]["max"] == 300
    assert sorted(p.name for p in second.prepared_dir.parent.iterdir()) == ["data"]


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prepared data directory"):
        prepare_data(_synthetic(tmp_path, f"data.prepared_dir={foreign}"))
    assert (foreign / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert prepare_data(_synthetic(tmp_path, f"data.prepared_dir={tmp_path / 'empty'}")).counts["train"] == 20


def test_nothing_survives_the_length_filter(tmp_path: Path) -> None:
    cfg = _synthetic(tmp_path, "data.min_tokens=5000", "data.max_tokens=5000")
    with pytest.raises(ValueError) as err:
        prepare_data(cfg)
    message = str(err.value)
    assert "read 24 documents" in message and "data.min_tokens" in message
    longest = max(len(d.text.encode()) for d in synthetic_documents(24, 120))
    assert f"longest has {longest} tokens" in message
    assert not (tmp_path / "run" / "data").exists()
    assert not list((tmp_path / "run").iterdir())


def test_too_few_documents_for_the_eval_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.eval_docs=24"):
        prepare_data(_synthetic(tmp_path, "data.eval_docs=24"))
    assert prepare_data(_synthetic(tmp_path, "data.eval_docs=0")).counts == {"train": 24, "eval": 0}


def test_missing_tokenizer_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.tokenizer"):
        prepare_data(_synthetic(tmp_path, "model.tokenizer=null"))


def test_manifest_is_plain_json(tmp_path: Path) -> None:
    result = prepare_data(_synthetic(tmp_path))
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["held_out"]["eval_docs"] == 4
    assert manifest["splits"]["eval"]["num_tokens"] == sum(
        TokenizedDataset(result.prepared_dir, "eval").num_tokens(i) for i in range(4))


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "refine_core.progress"]


def test_progress_counts_documents_to_the_known_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, plain_progress: None) -> None:
    """A synthetic corpus and a parquet file know their sizes: every line has done/total and an ETA, the last
    says done with every document counted."""
    path = _corpus(tmp_path)  # 5 parquet rows
    monkeypatch.setattr(stage, "_ENCODE_BATCH", 4)
    cfg = _cfg(tmp_path, f"data.sources=[{{path: synthetic, synthetic_docs: 10, synthetic_words: 60}}, "
               f"{{path: '{path}', text_column: content}}]", "data.min_tokens=100", "data.eval_docs=2")
    with caplog.at_level(logging.INFO):
        prepare_data(cfg)
    lines = _progress_lines(caplog)
    # batches of 4: 4, 8, 10 (the synthetic source's end), 14, 15
    assert [line.split(",")[0] for line in lines[:-1]] == [
        "prepare data: 4/15 documents (27%)", "prepare data: 8/15 documents (53%)",
        "prepare data: 10/15 documents (67%)", "prepare data: 14/15 documents (93%)",
    ]
    assert all(" documents/s, eta " in line and "tokens)" in line for line in lines[:-1])
    assert lines[-1].startswith("prepare data: done, 15 documents in ")
    kept = load_manifest(cfg.prepared_dir)["counts"]
    assert lines[-1].endswith(f"kept {kept['docs_kept']} ({kept['tokens_kept']} tokens)")


def test_progress_without_a_known_total_counts_and_ends_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture,
                                                             plain_progress: None) -> None:
    """A .json file is not counted ahead (it would have to be parsed): lines give the count and the rate."""
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "word " * (40 + i)} for i in range(9)]))
    monkeypatch.setattr(stage, "_ENCODE_BATCH", 4)
    cfg = _cfg(tmp_path, f"data.sources=[{{path: '{path}'}}]", "data.min_tokens=10", "data.eval_docs=2")
    with caplog.at_level(logging.INFO):
        prepare_data(cfg)
    lines = _progress_lines(caplog)
    assert [line.split(",")[0] for line in lines] == [
        "prepare data: 4 documents", "prepare data: 8 documents", "prepare data: 9 documents",
        "prepare data: done",
    ]
    assert all("eta" not in line and "/" not in line.split(",")[0] for line in lines)
    assert lines[-1].startswith("prepare data: done, 9 documents in ")


def test_documents_are_counted_ahead_where_it_is_cheap(tmp_path: Path) -> None:
    from refine_core.config import SourceConfig
    from refine_core.data.sources import count_documents

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n   \n{"text": "z"}')  # blank lines skipped
    (tmp_path / "b.txt").write_text("one document")
    assert count_documents(SourceConfig(path=str(tmp_path))) == 4
    assert count_documents(SourceConfig(path=str(tmp_path), max_docs=2)) == 2
    assert count_documents(SourceConfig(path=str(_corpus(tmp_path)))) == 5
    assert count_documents(SourceConfig(path="synthetic", synthetic_docs=7)) == 7
    assert count_documents(SourceConfig(path="hf://org/name")) is None
    (tmp_path / "c.json").write_text("[]")
    assert count_documents(SourceConfig(path=str(tmp_path))) is None
    (tmp_path / "bad.parquet").write_text("not parquet")  # the reading pass names this file; counting stays quiet
    assert count_documents(SourceConfig(path=str(tmp_path / "bad.parquet"))) is None


def test_the_data_stage_trains_its_own_tokenizer(tmp_path: Path) -> None:
    cfg = _synthetic(tmp_path, "data.tokenizer_vocab_size=300", "data.tokenizer_train_chars=200000")
    result = prepare_data(cfg)
    manifest = load_manifest(result.prepared_dir)
    tokenizer = load_tokenizer(str(result.prepared_dir / "tokenizer"))
    assert manifest["tokenizer"]["name"] == "bpe-300" and 258 < tokenizer.vocab_size <= 300
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    # the shards hold its ids: a training document decodes back to synthetic text, in fewer tokens than bytes
    train = TokenizedDataset(result.prepared_dir, "train", expected_fingerprint=tokenizer.fingerprint())
    first = list(train[0])
    text = tokenizer.decode(first)
    assert len(first) < len(text.encode()) and any(d.text.startswith(text) for d in synthetic_documents(24, 120))
    # trained again on the same sources: the same tokenizer
    again = prepare_data(_synthetic(tmp_path / "again", "data.tokenizer_vocab_size=300",
                                    "data.tokenizer_train_chars=200000"))
    assert load_manifest(again.prepared_dir)["tokenizer"]["fingerprint"] == tokenizer.fingerprint()


def test_a_trained_tokenizer_is_refused_for_a_pretrained_model(tmp_path: Path) -> None:
    cfg = _synthetic(tmp_path, "data.tokenizer_vocab_size=300", "model.source=some/model")
    with pytest.raises(ValueError, match="tokenizer_vocab_size=300 trains a new tokenizer"):
        prepare_data(cfg)
    with pytest.raises(ValueError, match="too small"):
        _synthetic(tmp_path, "data.tokenizer_vocab_size=100")
