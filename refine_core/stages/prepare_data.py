"""Pipeline stage ``refine prepare-data``: read corpora, tokenize, length-filter, truncate, hold out, shard.

For every document of every ``data.sources`` entry, in order:

1. tokenize the raw text with no special tokens (spec §1);
2. drop it when it has fewer than ``data.min_tokens`` tokens (the paper keeps documents >= 16K tokens, spec §3);
3. truncate it to its first ``data.max_tokens`` tokens (spec §1 keeps the beginning);
4. route it to the ``eval`` or ``train`` split.

Held-out split: the ``data.eval_docs`` kept documents with the smallest ``sha256(f"{data.split_seed}:{doc_id}")``
are held out, i.e. the first ``eval_docs`` documents of a seeded random permutation of the kept documents. It is
computed in one streaming pass with a bounded heap, so memory holds at most ``eval_docs`` documents plus one train
shard, and it depends only on the ids and the seed (not on the run seed, nor on which other documents exist).
Train documents are written in stream order, except that a document first held out and later displaced by one
with a smaller key is written when it is displaced. Eval documents are written in stream order.

The output (see :mod:`refine_core.data.shards`) is built in a temporary sibling directory and renamed into place
only when complete; an existing prepared directory is replaced only after the new one is complete, and a
directory that is not a prepared one is never replaced. The tokenizer is saved into ``{prepared_dir}/tokenizer``
so later stages use exactly the same one. With ``data.tokenizer_vocab_size`` set, the stage first trains a
byte-level BPE tokenizer of that size on the sources (:func:`train_data_tokenizer`) and uses it instead of
``model.tokenizer``.

Progress (:class:`refine_core.progress.Progress`): documents read out of the total where every source's size is
known ahead (:func:`refine_core.data.sources.count_documents`), with the rate, an ETA and the documents and tokens
kept so far; otherwise the count and the rate.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import itertools
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import refine_core
from refine_core.config import ModelConfig, RunConfig, to_dict
from refine_core.data import sources as sources_lib
from refine_core.data.shards import MANIFEST_FILE, SCHEMA_VERSION, TOKENIZER_DIR, ShardWriter, write_manifest
from refine_core.progress import Progress
from refine_core.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)

# Documents tokenized per call: lets a fast tokenizer use several threads; ~1M tokens of 16K-token documents.
_ENCODE_BATCH = 64


@dataclass
class PrepareResult:
    """What :func:`prepare_data` wrote.

    Attributes:
        prepared_dir: the prepared directory.
        counts: documents per split, ``{"train": n, "eval": m}``.
        stats: documents read / kept / too short / truncated, tokens read / kept, the longest document, and the
            per-split token-length statistics (the manifest's ``counts`` plus ``token_lengths``).
        manifest_path: ``{prepared_dir}/manifest.json``.
    """

    prepared_dir: Path
    counts: dict[str, int]
    stats: dict[str, Any]
    manifest_path: Path


def tokenizer_spec(model: ModelConfig) -> str:
    """``model.tokenizer``, or the checkpoint's own tokenizer (``model.source``) when it is ``None``."""
    spec = model.tokenizer if model.tokenizer is not None else model.source
    if spec is None:
        raise ValueError("model.tokenizer is null and model.source is not set: set model.tokenizer (e.g. 'byte').")
    if model.source is not None and model.tokenizer == "byte":
        logger.warning(
            "model.source=%s is set but model.tokenizer='byte'; set model.tokenizer=null to use the "
            "checkpoint's own tokenizer",
            model.source,
        )
    return spec


def _split_key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


def _check_replaceable(out: Path) -> None:
    if out.is_file():
        raise ValueError(f"data.prepared_dir={str(out)!r} is a file; point it at a directory.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ValueError(
            f"data.prepared_dir={str(out)!r} exists, is not empty and holds no {MANIFEST_FILE}: it is not a prepared "
            "data directory, so it is not replaced. Choose another data.prepared_dir or empty it."
        )


def _clean_stale(out: Path) -> None:
    """Remove temporary directories that an interrupted earlier run left next to ``out``."""
    for stale in itertools.chain(out.parent.glob(f".{out.name}.tmp-*"), out.parent.glob(f".{out.name}.old-*")):
        logger.info("removing %s left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename the complete ``new`` to ``out``; an existing ``out`` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_data(cfg: RunConfig) -> PrepareResult:
    """Tokenize ``cfg.data.sources`` into train/eval shards under ``cfg.prepared_dir``.

    Args:
        cfg: the run config; reads ``cfg.data``, ``cfg.model.tokenizer`` / ``cfg.model.source`` and
            ``cfg.model.cache_dir``.

    Returns:
        A :class:`PrepareResult`.

    Raises:
        ValueError: no document survives the length filter, too few survive for ``data.eval_docs``, or the
            output directory cannot be replaced (each message says what to change).
    """
    out = cfg.prepared_dir
    vocab = cfg.data.tokenizer_vocab_size
    if vocab is not None and cfg.model.source is not None:
        raise ValueError(
            f"data.tokenizer_vocab_size={vocab} trains a new tokenizer, but model.source={cfg.model.source!r} is a "
            "pretrained model with its own: set data.tokenizer_vocab_size=null (or model.source=null to train a "
            "model from scratch)."
        )
    spec = tokenizer_spec(cfg.model) if vocab is None else f"bpe-{vocab} trained on data.sources"
    tokenizer = load_tokenizer(spec, cfg.model.cache_dir) if vocab is None else None
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        if tokenizer is None:
            tokenizer = train_data_tokenizer(cfg, tmp / TOKENIZER_DIR)
        logger.info(
            "preparing data into %s with tokenizer %r (vocab %d, fingerprint %s)",
            out,
            tokenizer.name,
            tokenizer.vocab_size,
            tokenizer.fingerprint()[:12],
        )
        manifest = _write_splits(cfg, tokenizer, spec, tmp)
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        write_manifest(tmp, manifest)  # last: its presence marks the directory complete
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {split: info["num_docs"] for split, info in manifest["splits"].items()}
    stats = {
        **manifest["counts"],
        "token_lengths": {split: info["token_lengths"] for split, info in manifest["splits"].items()},
    }
    logger.info(
        "prepared %s: %d train / %d eval documents, %d tokens kept",
        out,
        counts["train"],
        counts["eval"],
        manifest["counts"]["tokens_kept"],
    )
    return PrepareResult(prepared_dir=out, counts=counts, stats=stats, manifest_path=out / MANIFEST_FILE)


def train_data_tokenizer(cfg: RunConfig, out_dir: Path) -> Tokenizer:
    """A byte-level BPE tokenizer of ``data.tokenizer_vocab_size`` tokens trained on the sources, saved in ``out_dir``.

    Each of the ``n`` sources contributes about ``data.tokenizer_train_chars / n`` characters, so a small source is
    not drowned by a large one, spread over the whole source: when its document count is known ahead
    (:func:`~refine_core.data.sources.count_documents`) every ``k``-th document is taken, ``k`` estimated from the
    mean length of its first 16 documents; otherwise its first documents. The held-out split is decided later, so
    the (few) held-out-loss documents may be among the tokenizer's training text (they are never evaluation tasks).
    """
    data = cfg.data
    assert data.tokenizer_vocab_size is not None
    share = max(1, data.tokenizer_train_chars // max(1, len(data.sources)))

    def texts() -> Any:
        for source in data.sources:
            total = sources_lib.count_documents(source, cfg.model.cache_dir)
            docs = sources_lib.iter_documents(source, cfg.model.cache_dir)
            head = list(itertools.islice(docs, 16))
            mean = sum(len(d.text) for d in head) / max(1, len(head))
            every = 1 if total is None else max(1, round(total * mean / share))
            taken = 0
            for i, doc in enumerate(itertools.chain(head, docs)):
                if taken >= share:
                    break
                if i % every == 0:
                    taken += len(doc.text)
                    yield doc.text

    logger.info("training a byte-level BPE tokenizer of %d tokens on up to %d characters of the sources",
                data.tokenizer_vocab_size, share * len(data.sources))
    tokenizer = train_bpe_tokenizer(texts(), data.tokenizer_vocab_size, out_dir)
    tokenizer.name = f"bpe-{data.tokenizer_vocab_size}"  # not the temporary directory it was loaded from
    return tokenizer


def _write_splits(cfg: RunConfig, tokenizer: Tokenizer, spec: str, tmp: Path) -> dict[str, Any]:
    """Stream every source into train/eval shards in ``tmp``; return the manifest."""
    data = cfg.data
    train = ShardWriter(tmp, "train", data.shard_docs)
    # Max-heap (by negated key) of the held-out candidates: (-key, -kept_index, doc_id, tokens).
    held: list[tuple[int, int, str, np.ndarray]] = []
    counts = {
        "docs_read": 0,
        "docs_kept": 0,
        "docs_too_short": 0,
        "docs_truncated": 0,
        "tokens_read": 0,
        "tokens_kept": 0,
        "longest_doc_tokens": 0,
    }
    # Every source is located (and an s3:// one downloaded) before hours of tokenizing, so a bad path fails fast.
    source_entries = [
        {
            "path": source.path,
            "fingerprint": sources_lib.fingerprint(source, cfg.model.cache_dir),
            "docs_read": 0,
            "docs_kept": 0,
        }
        for source in data.sources
    ]
    per_source = [sources_lib.count_documents(source, cfg.model.cache_dir) for source in data.sources]
    total = None if None in per_source else sum(n for n in per_source if n is not None)
    with Progress("prepare data", total=total, unit="document") as progress:
        for source_index, (source, entry) in enumerate(zip(data.sources, source_entries, strict=True)):
            docs = sources_lib.iter_documents(source, cfg.model.cache_dir)
            while chunk := list(itertools.islice(docs, _ENCODE_BATCH)):
                for doc, ids in zip(chunk, tokenizer.encode_batch([d.text for d in chunk]), strict=True):
                    counts["docs_read"] += 1
                    entry["docs_read"] += 1
                    counts["tokens_read"] += len(ids)
                    counts["longest_doc_tokens"] = max(counts["longest_doc_tokens"], len(ids))
                    if len(ids) < data.min_tokens:
                        counts["docs_too_short"] += 1
                        continue
                    if len(ids) > data.max_tokens:
                        counts["docs_truncated"] += 1
                        ids = ids[: data.max_tokens]  # spec §1: keep the first tokens
                    doc_id = f"{source_index}/{doc.id}"
                    item = (
                        -_split_key(data.split_seed, doc_id),
                        -counts["docs_kept"],
                        doc_id,
                        np.asarray(ids, dtype=np.int32),
                    )
                    counts["docs_kept"] += 1
                    entry["docs_kept"] += 1
                    counts["tokens_kept"] += len(ids)
                    if len(held) < data.eval_docs:
                        heapq.heappush(held, item)
                        continue
                    if held and item[:2] > held[0][:2]:  # smaller key than the largest held-out one: swap them
                        item = heapq.heapreplace(held, item)
                    train.add(item[2], item[3])
                progress.set_postfix(f"kept {counts['docs_kept']} ({counts['tokens_kept']} tokens)")
                progress.update(len(chunk))
            logger.info("source %s: read %d documents, kept %d", source.path, entry["docs_read"], entry["docs_kept"])

    empty = [str(e["path"]) for e in source_entries if not e["docs_read"]]
    if counts["docs_read"] == 0:
        raise ValueError(
            f"the data sources hold no document at all ({', '.join(empty)}: empty files, or the wrong "
            "data.sources[].text_column); point data.sources at files with text"
        )
    if counts["docs_kept"] == 0:
        raise ValueError(
            f"no document has >= data.min_tokens={data.min_tokens} tokens: read {counts['docs_read']} documents, "
            f"the longest has {counts['longest_doc_tokens']} tokens. Lower data.min_tokens (e.g. "
            f"data.min_tokens={max(2, counts['longest_doc_tokens'])}) or add longer documents."
        )
    if counts["docs_kept"] <= data.eval_docs:
        raise ValueError(
            f"only {counts['docs_kept']} of {counts['docs_read']} documents have >= data.min_tokens={data.min_tokens} "
            f"tokens, not more than data.eval_docs={data.eval_docs}, which would leave no training documents. "
            "Lower data.eval_docs or data.min_tokens, or add documents."
        )
    evals = ShardWriter(tmp, "eval", data.shard_docs)
    for _, _, doc_id, tokens in sorted(held, key=lambda it: -it[1]):  # stream order
        evals.add(doc_id, tokens)
    splits = {"train": train.close(), "eval": evals.close()}
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "refine_core_version": refine_core.__version__,
        "splits": splits,
        "counts": counts,
        "tokenizer": {
            "spec": spec,
            "name": tokenizer.name,
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "dir": TOKENIZER_DIR,
        },
        "sources": source_entries,
        "held_out": {
            "method": "smallest sha256(f'{split_seed}:{doc_id}')",
            "split_seed": data.split_seed,
            "eval_docs": data.eval_docs,
        },
        "data_config": to_dict(data),
    }
