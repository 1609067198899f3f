"""Corpora of long documents: local files, hub datasets, S3 copies and a seeded synthetic corpus.

:func:`iter_documents` streams :class:`Document` objects (``id``, ``text``) from one
:class:`~refine_core.config.SourceConfig`; :func:`fingerprint` identifies a source's content for the prepared
data's manifest. ``SourceConfig.path`` may be:

* a local ``.parquet`` / ``.jsonl`` / ``.json`` / ``.txt`` file, a directory (searched recursively; hidden files and
  other extensions are skipped) or a glob (``data/*.parquet``, ``**`` allowed). Files are read in sorted path order,
  so the stream is deterministic. A ``.txt`` file is one document; the other formats hold one document per record
  in ``text_column``. A ``.json`` file is a list of records, a mapping of columns, or JSON lines;
* ``s3://bucket/prefix`` (downloaded once with :func:`refine_core.storage.resolve`, then read as a directory);
* ``hf://org/name``: a hub dataset streamed with ``datasets.load_dataset(name, subset, split=..., streaming=True)``
  (the ``datasets`` extra; nothing else imports it);
* ``synthetic``: :func:`refine_core.data.synthetic.synthetic_documents`, pseudo-English with learnable structure that
  needs no files;
* ``synthetic_recall``: :func:`refine_core.data.synthetic_recall.synthetic_recall_documents`, the same language with
  facts stated and recalled much later (``synthetic_docs`` / ``synthetic_words`` / ``synthetic_seed`` as above);
* ``passages``: :class:`refine_core.data.passages.PassageCorpus`, the passages of LongBench / RULER task files
  (``passage_files``) packed into long documents, every passage and sentence of ``heldout_files`` held out.

Document ids are ``{file path relative to the source root}:{row}`` for files (stable across machines), so they can
seed the held-out split.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refine_core import storage
from refine_core.config import SourceConfig
from refine_core.data.document import Document
from refine_core.data.synthetic import SYNTHETIC_VERSION, synthetic_documents

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")
DEFAULT_CACHE_DIR = "~/.cache/refine"


def iter_documents(source: SourceConfig, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> Iterator[Document]:
    """Stream the documents of ``source`` in a deterministic order.

    Args:
        source: which corpus (see the module docstring); at most ``source.max_docs`` documents are yielded.
        cache_dir: where ``s3://`` sources are downloaded.

    Returns:
        An iterator of :class:`Document`.
    """
    if source.max_docs is not None and source.max_docs < 0:
        raise ValueError(f"source max_docs={source.max_docs} must be >= 0 (or null for all documents).")
    docs = _iter_all(source, cache_dir)
    return itertools.islice(docs, source.max_docs) if source.max_docs is not None else docs


def _iter_all(source: SourceConfig, cache_dir: str | os.PathLike[str]) -> Iterator[Document]:
    if source.path == "synthetic":
        return synthetic_documents(source.synthetic_docs, source.synthetic_words, source.synthetic_seed)
    if source.path == "synthetic_recall":
        from refine_core.data.synthetic_recall import synthetic_recall_documents  # it builds on this module

        return synthetic_recall_documents(source.synthetic_docs, source.synthetic_words, source.synthetic_seed)
    if source.path == "passages":
        return _iter_passages(source)
    if source.path.startswith("hf://"):
        return _iter_hub(source)
    return _iter_files(source, cache_dir)


def count_documents(source: SourceConfig, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> int | None:
    """How many documents :func:`iter_documents` will yield, where that is cheap to know, else ``None``.

    It only gives data preparation its ETA, so it is best effort: ``synthetic`` knows its size; a parquet file's
    row count is in its footer; a ``.txt`` file is one document; a JSON-lines file is counted by one pass over its
    non-blank lines (a fraction of the time tokenizing it takes; it stops at ``max_docs``). A ``.json`` file would
    have to be parsed and a hub dataset streamed, so those give ``None``. A file that cannot be read also gives
    ``None``: reading it for real reports the problem with the message that names the fix.
    """
    limit = source.max_docs
    if source.path in ("synthetic", "synthetic_recall"):
        total: int | None = source.synthetic_docs
    elif source.path.startswith("hf://") or source.path == "passages":
        return None
    else:
        try:
            total = 0
            for path, _ in list_source_files(source, cache_dir):
                n = _count_file(path, None if limit is None else limit - total)
                if n is None:
                    return None
                total += n
                if limit is not None and total >= limit:
                    break
        except Exception as exc:  # noqa: BLE001  (pyarrow's and the OS's many errors: the real read reports them)
            logger.debug("source %s: not counting its documents (%s: %s)", source.path, type(exc).__name__, exc)
            return None
    return total if limit is None else min(total, limit)


def _count_file(path: Path, limit: int | None) -> int | None:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return 1
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".jsonl":
        n = 0
        with path.open("rb") as f:
            for line in f:
                n += not line.isspace()  # the reader skips blank lines
                if limit is not None and n >= limit:
                    break
        return n
    return None


# --------------------------------------------------------------------------------------------------------- files


def list_source_files(
    source: SourceConfig, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR
) -> list[tuple[Path, str]]:
    """The files of a file-based source, sorted, with the name each has relative to the source root.

    Raises:
        ValueError: nothing matches, or an explicitly named file has an unsupported type.
    """
    spec = source.path
    if storage.is_s3_uri(spec):
        root = storage.resolve(spec, cache_dir)
    elif glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file() and _supported(p)]
        skipped = [p.name for p in matches if p.is_file() and not _supported(p)]
        if skipped:
            logger.warning("source %s: skipping %d files of unsupported type (e.g. %s)", spec, len(skipped), skipped[0])
        if not files:
            raise ValueError(
                f"source path {spec!r} matches no {'/'.join(SUPPORTED_SUFFIXES)} file"
                + (f" (it matches {len(skipped)} of other types, e.g. {skipped[0]!r})" if skipped else "")
                + "; fix data.sources[].path."
            )
        base = _glob_base(os.path.expanduser(spec))
        return [(p, os.path.relpath(p, base)) for p in files]
    else:
        root = Path(os.path.expanduser(spec))
        if not root.exists():
            raise ValueError(
                f"source path {spec!r} does not exist; use a file, directory or glob of "
                f"{'/'.join(SUPPORTED_SUFFIXES)} files, hf://org/name, s3://bucket/prefix or 'synthetic'."
            )
    if root.is_file():
        if not _supported(root):
            raise ValueError(
                f"source file {str(root)!r} has unsupported type {root.suffix!r}; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)}. Convert it, or point data.sources[].path at a supported file."
            )
        return [(root, root.name)]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and _supported(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise ValueError(
            f"source directory {spec!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} file (found {found}); "
            "fix data.sources[].path."
        )
    return [(p, p.relative_to(root).as_posix()) for p in files]


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def _glob_base(pattern: str) -> str:
    """The directory part of ``pattern`` before its first wildcard (ids are relative to it)."""
    parts: list[str] = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else "."


def _iter_files(source: SourceConfig, cache_dir: str | os.PathLike[str]) -> Iterator[Document]:
    for path, name in list_source_files(source, cache_dir):
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _iter_parquet(path, name, source.text_column)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(path, name, source.text_column)
        elif suffix == ".json":
            yield from _iter_json(path, name, source.text_column)
        else:
            yield Document(id=name, text=path.read_text(encoding="utf-8", errors="replace"))


def _missing_column(path: Path | str, column: str, columns: list[str]) -> ValueError:
    return ValueError(
        f"{path} has no column {column!r}; its columns are {sorted(columns)}. Set data.sources[].text_column to "
        "the one holding the document text."
    )


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text column holds {type(value).__name__}, not a string; pick a text column.")
    return value


def _iter_parquet(path: Path, name: str, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise _missing_column(path, column, pf.schema_arrow.names)
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield Document(id=f"{name}:{row}", text=_text(value, f"{path} row {row}"))
            row += 1


def _record_text(record: Any, column: str, path: Path, row: int) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{path} record {row} is a {type(record).__name__}, not an object with a {column!r} key.")
    if column not in record:
        raise _missing_column(f"{path} (record {row})", column, list(record))
    return _text(record[column], f"{path} record {row}")


def _iter_jsonl(path: Path, name: str, column: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        row = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {lineno} is not valid JSON ({exc}); fix or remove it.") from exc
            yield Document(id=f"{name}:{row}", text=_record_text(record, column, path, row))
            row += 1


def _iter_json(path: Path, name: str, column: str) -> Iterator[Document]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if "Extra data" in str(exc):  # JSON lines in a .json file
            yield from _iter_jsonl(path, name, column)
            return
        raise ValueError(f"{path} is not valid JSON ({exc}).") from exc
    if isinstance(data, dict):
        if column not in data:
            raise _missing_column(path, column, list(data))
        values = data[column]
        if not isinstance(values, list):
            raise ValueError(f"{path}: {column!r} is not a list; expected a list of records or a mapping of columns.")
        for row, value in enumerate(values):
            yield Document(id=f"{name}:{row}", text=_text(value, f"{path} row {row}"))
    elif isinstance(data, list):
        for row, record in enumerate(data):
            yield Document(id=f"{name}:{row}", text=_record_text(record, column, path, row))
    else:
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a list of records or a mapping.")


def _iter_passages(source: SourceConfig) -> Iterator[Document]:
    from refine_core.data.passages import PassageCorpus

    corpus = PassageCorpus(source.passage_files, source.heldout_files, source.passage_doc_chars)
    for doc in corpus.documents():
        yield Document(id=doc.id, text=doc.text)


# ----------------------------------------------------------------------------------------------------------- hub


def _iter_hub(source: SourceConfig) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as exc:  # the `datasets` extra: only hub sources need it
        raise ImportError(
            f"data source {source.path!r} is a hub dataset, which needs the datasets package: "
            "`pip install 'refine-core[datasets]'` (the images have it), or point data.sources[].path at local files "
            "or an s3:// copy."
        ) from exc

    name = source.path[len("hf://") :]
    try:
        ds = datasets.load_dataset(name, source.subset, split=source.split, streaming=True)
    except Exception as exc:  # datasets raises many types (network, missing config, ...)
        raise ValueError(
            f"could not open hub dataset {name!r} (subset={source.subset!r}, split={source.split!r}): "
            f"{type(exc).__name__}: {exc}. Without network access download it elsewhere and point "
            "data.sources[].path at the local files (or an s3:// copy)."
        ) from exc
    for row, example in enumerate(ds):
        if row == 0 and source.text_column not in example:
            raise _missing_column(f"hub dataset {name!r}", source.text_column, list(example))
        yield Document(id=f"{name}/{source.split}:{row}", text=_text(example[source.text_column], f"{name} row {row}"))


# ---------------------------------------------------------------------------------------------------- fingerprint


def fingerprint(source: SourceConfig, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> str:
    """A sha256 hex digest that changes when the source's documents may have changed.

    Files: the settings plus each file's absolute path, size and mtime (cheap; a rewritten file changes it).
    ``synthetic``: the generator version and settings. Hub datasets: name, subset, split and settings (the hub
    content itself is not hashed).
    """
    settings: dict[str, Any] = {"path": source.path, "text_column": source.text_column, "max_docs": source.max_docs}
    if source.path == "synthetic":
        settings.update(version=SYNTHETIC_VERSION, docs=source.synthetic_docs, words=source.synthetic_words,
                        seed=source.synthetic_seed)
    elif source.path == "synthetic_recall":
        from refine_core.data.synthetic_recall import SYNTHETIC_RECALL_VERSION

        settings.update(version=SYNTHETIC_RECALL_VERSION, docs=source.synthetic_docs, words=source.synthetic_words,
                        seed=source.synthetic_seed)
    elif source.path == "passages":
        from refine_core.data.passages import PASSAGES_VERSION
        from refine_core.data.tasks import expand_task_files

        def stat(patterns: list[str]) -> list[tuple[str, int, int]]:
            files = expand_task_files(patterns) if patterns else []
            return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

        settings.update(version=PASSAGES_VERSION, doc_chars=source.passage_doc_chars,
                        files=stat(source.passage_files), heldout=stat(source.heldout_files))
    elif source.path.startswith("hf://"):
        settings.update(subset=source.subset, split=source.split)
    else:
        settings["files"] = [
            (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
            for path, _ in list_source_files(source, cache_dir)
        ]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
