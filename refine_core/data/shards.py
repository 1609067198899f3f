"""Tokenized document shards on disk: the output of ``refine prepare-data`` and the input of every trainer.

Layout of a prepared directory::

    {prepared_dir}/
      manifest.json              written last: a directory without it was not (completely) prepared
      train-00000.parquet ...    shard files, ``shard_docs`` documents each
      eval-00000.parquet ...
      tokenizer/                 the exact tokenizer used (``refine_core.tokenizer.load_tokenizer`` reads it)

Shard columns: ``doc_id`` (string), ``input_ids`` (list<int32>, no special tokens, already truncated) and
``num_tokens`` (int32). ``manifest.json`` holds the schema version, per-split document/token counts, shard files
and token-length statistics, the tokenizer (name, fingerprint, vocab size, pad/eos/bos ids), the source
fingerprints, the data config and the creation time.

:class:`ShardWriter` streams documents into shards; :class:`TokenizedDataset` reads one split back with random
access, refusing data made with another tokenizer.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "eval")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def length_stats(lengths: Sequence[int]) -> dict[str, float | int]:
    """``min``/``mean``/``median``/``max`` of token lengths (zeros for an empty split)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {"min": int(min(lengths)), "mean": float(statistics.fmean(lengths)),
            "median": float(statistics.median(lengths)), "max": int(max(lengths))}


class ShardWriter:
    """Streams documents of one split into ``{split}-{i:05d}.parquet`` files of ``shard_docs`` documents.

    At most one shard is held in memory (``shard_docs`` x the longest document x 4 bytes).
    """

    def __init__(self, out_dir: str | os.PathLike[str], split: str, shard_docs: int) -> None:
        if shard_docs < 1:
            raise ValueError(f"data.shard_docs={shard_docs} must be >= 1.")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_docs = shard_docs
        self.files: list[str] = []
        self.shard_sizes: list[int] = []
        self.lengths: list[int] = []
        self._ids: list[str] = []
        self._tokens: list[np.ndarray] = []

    def add(self, doc_id: str, input_ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (its token ids, stored as int32)."""
        tokens = np.asarray(input_ids, dtype=np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"document {doc_id!r}: input_ids must be 1-D, got shape {tokens.shape}")
        self._ids.append(doc_id)
        self._tokens.append(tokens)
        self.lengths.append(len(tokens))
        if len(self._ids) >= self.shard_docs:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        sizes = np.array([len(t) for t in self._tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if offsets[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"a {self.split} shard would hold {offsets[-1]} tokens (> 2^31); lower data.shard_docs.")
        values = np.concatenate(self._tokens) if self._tokens else np.zeros(0, np.int32)
        table = pa.table({
            "doc_id": pa.array(self._ids, pa.string()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int32())),
            "num_tokens": pa.array(sizes.astype(np.int32), pa.int32()),
        })
        name = shard_name(self.split, len(self.files))
        pq.write_table(table, self.out_dir / name, compression="zstd")
        self.files.append(name)
        self.shard_sizes.append(len(self._ids))
        self._ids, self._tokens = [], []

    def close(self) -> dict[str, Any]:
        """Write the last partial shard; return this split's manifest entry."""
        self._flush()
        return {"num_docs": len(self.lengths), "num_tokens": int(sum(self.lengths)), "files": list(self.files),
                "shard_docs": list(self.shard_sizes), "token_lengths": length_stats(self.lengths)}


def write_manifest(prepared_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    path = Path(prepared_dir) / MANIFEST_FILE
    tmp = path.with_name(MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """A short hash naming the prepared data: sources, tokenizer and preparation settings (not the time)."""
    keyed = {
        "sources": [source.get("fingerprint") for source in manifest.get("sources", [])],
        "tokenizer": manifest.get("tokenizer", {}).get("fingerprint"),
        "data_config": manifest.get("data_config"),
        "docs": {name: split.get("num_docs") for name, split in manifest.get("splits", {}).items()},
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_manifest(prepared_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``{prepared_dir}/manifest.json``.

    Raises:
        FileNotFoundError: the directory was not prepared (the message says to run ``refine prepare-data``).
        ValueError: the manifest is unreadable or has another schema version.
    """
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        state = "does not exist" if not Path(prepared_dir).exists() else f"has no {MANIFEST_FILE}"
        raise FileNotFoundError(
            f"prepared data directory {str(prepared_dir)!r} {state}: run `refine prepare-data --config <same config>` "
            "first (or set data.prepared_dir to a prepared directory)."
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run `refine prepare-data`.") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}; "
            "re-run `refine prepare-data` with this version."
        )
    return manifest


def check_tokenizer(manifest: dict[str, Any], expected_fingerprint: str, where: str = "prepared data") -> None:
    """Raise when the manifest's tokenizer is not the one with ``expected_fingerprint``."""
    tok = manifest.get("tokenizer", {})
    if tok.get("fingerprint") != expected_fingerprint:
        raise ValueError(
            f"{where} was tokenized with {tok.get('name')!r} (fingerprint {str(tok.get('fingerprint'))[:12]}..., "
            f"vocab {tok.get('vocab_size')}), but the caller expects fingerprint {expected_fingerprint[:12]}...; "
            "re-run `refine prepare-data` with the model's tokenizer, or load the tokenizer saved in "
            f"{TOKENIZER_DIR}/ next to the data."
        )


class TokenizedDataset:
    """One split of a prepared directory, with random access to documents.

    Shards are read on first access and kept in memory as one flat int32 array per shard (4 bytes per token).

    Args:
        prepared_dir: a directory written by ``refine prepare-data``.
        split: ``"train"`` or ``"eval"``.
        expected_fingerprint: when given, the manifest's tokenizer fingerprint must equal it.
    """

    def __init__(self, prepared_dir: str | os.PathLike[str], split: str = "train",
                 expected_fingerprint: str | None = None) -> None:
        self.prepared_dir = Path(prepared_dir)
        self.manifest = load_manifest(prepared_dir)
        if expected_fingerprint is not None:
            check_tokenizer(self.manifest, expected_fingerprint, where=f"prepared data in {prepared_dir}")
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {prepared_dir}; it has {sorted(splits)}.")
        self.split = split
        info = splits[split]
        self._files: list[str] = info["files"]
        self._starts = [0, *np.cumsum(info["shard_docs"]).tolist()]  # first document index of each shard
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}

    @property
    def pad_token_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_token_id"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.prepared_dir / TOKENIZER_DIR

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, index: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if index not in self._loaded:
            import pyarrow.parquet as pq

            path = self.prepared_dir / self._files[index]
            try:
                table = pq.read_table(path, columns=["doc_id", "input_ids"])
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read shard {path} ({exc}); re-run `refine prepare-data`.") from exc
            expected = self._starts[index + 1] - self._starts[index]
            if table.num_rows != expected:
                raise ValueError(
                    f"shard {path} has {table.num_rows} documents, the manifest says {expected}; "
                    "the directory is corrupt: re-run `refine prepare-data`."
                )
            ids = table.column("input_ids").combine_chunks()
            offsets = ids.offsets.to_numpy().astype(np.int64)
            values = ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            # Offsets are relative to the array's own buffer; a sliced array can start past 0.
            self._loaded[index] = (values[offsets[0] : offsets[-1]], offsets - offsets[0],
                                   table.column("doc_id").to_pylist())
        return self._loaded[index]

    def _locate(self, i: int) -> tuple[np.ndarray, np.ndarray, list[str], int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range for {n} {self.split} documents")
        i %= n
        shard = bisect.bisect_right(self._starts, i) - 1
        values, offsets, doc_ids = self._shard(shard)
        return values, offsets, doc_ids, i - self._starts[shard]

    def tokens(self, i: int) -> np.ndarray:
        """Document ``i``'s token ids as an int32 numpy array (a view; do not modify)."""
        values, offsets, _, j = self._locate(i)
        return values[offsets[j] : offsets[j + 1]]

    def __getitem__(self, i: int) -> list[int]:
        return self.tokens(i).tolist()

    def get_tensor(self, i: int) -> torch.Tensor:
        """Document ``i`` as a 1-D int64 tensor ``[num_tokens]``."""
        return torch.from_numpy(self.tokens(i).astype(np.int64))

    def doc_id(self, i: int) -> str:
        _, _, doc_ids, j = self._locate(i)
        return doc_ids[j]

    def num_tokens(self, i: int) -> int:
        values, offsets, _, j = self._locate(i)
        return int(offsets[j + 1] - offsets[j])

    def __repr__(self) -> str:
        return f"TokenizedDataset({str(self.prepared_dir)!r}, split={self.split!r}, docs={len(self)})"
