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
* ``synthetic``: :func:`synthetic_documents`, pseudo-English with learnable structure that needs no files;
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
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_core import storage
from refine_core.config import SourceConfig

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")
DEFAULT_CACHE_DIR = "~/.cache/refine"


@dataclass(frozen=True, slots=True)
class Document:
    """One document of a corpus."""

    id: str
    text: str


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


# ----------------------------------------------------------------------------------------------------- synthetic

# The synthetic "language": a fixed vocabulary with fixed preferences (which adjectives go with which noun, which
# verbs a noun does, which objects a verb takes), drawn once from _LANGUAGE_SEED, so every synthetic source shares
# it. Documents differ through their own seeded choices and their cast of recurring named entities, which gives a
# model both local (word spelling, collocations) and long-range (who is in this document) structure to learn.
_SYNTHETIC_VERSION = 1
_LANGUAGE_SEED = 20260216


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "river city garden letter window forest mountain harbor lantern bridge village market castle tower road ship "
    "island valley mirror book song story dream storm winter summer morning evening candle stone map key door "
    "house field orchard well bell clock shadow meadow cottage library wall fire horse wagon journey promise "
    "secret question answer reason memory"
)
# Nouns for people: a named character acts with the verbs these prefer.
_PEOPLE = _words("friend teacher soldier merchant farmer sailor king queen child stranger doctor painter baker captain")
_VERBS = _words(
    "found carried opened closed painted watched followed crossed remembered forgot built broke mended sold "
    "bought visited guarded lost wrote read answered asked left reached described sang hid showed "
    "brought kept counted measured studied praised warned greeted trusted doubted chose"
)
_ADJECTIVES = _words(
    "old young quiet bright dark small large golden silver narrow wide ancient gentle cold warm distant hidden "
    "broken heavy light early late green red blue grey white black simple strange careful patient brave "
    "tired clever honest humble proud sudden slow swift rare common"
)
_ADVERBS = _words("quickly slowly quietly carefully suddenly finally often rarely gladly silently again soon")
_PREPOSITIONS = _words("near behind beyond under over across beside inside through toward")
_SYLLABLES = _words("ka ri to mel an dor vi sa len tha bo ru mi el or fen ga lis ne quo ar ti vel pra")


class _Language:
    """The fixed vocabulary and preferences of the synthetic corpus."""

    def __init__(self) -> None:
        rng = random.Random(_LANGUAGE_SEED)
        self.noun_adjs = {n: rng.sample(_ADJECTIVES, 3) for n in _NOUNS + _PEOPLE}
        self.noun_verbs = {n: rng.sample(_VERBS, 4) for n in _NOUNS + _PEOPLE}
        self.verb_objects = {v: rng.sample(_NOUNS + _PEOPLE, 4) for v in _VERBS}
        self.verb_adverbs = {v: rng.sample(_ADVERBS, 2) for v in _VERBS}
        self.noun_preps = {n: rng.sample(_PREPOSITIONS, 2) for n in _NOUNS + _PEOPLE}

        def name() -> str:
            return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

        self.first_names = sorted({name() for _ in range(60)})
        self.last_names = sorted({name() + rng.choice(("son", "ova", "ard", "ien", "")) for _ in range(60)})
        self.places = sorted({name() + rng.choice((" Hollow", " Ford", "ia", " Reach", "mere")) for _ in range(40)})


_language: _Language | None = None


def _get_language() -> _Language:
    global _language
    if _language is None:
        _language = _Language()
    return _language


def _zipf(rng: random.Random, options: list[str] | tuple[str, ...]) -> str:
    """Pick from a short list with weights 1, 1/2, 1/3, ... (the first preference dominates)."""
    return rng.choices(options, weights=[1.0 / (i + 1) for i in range(len(options))])[0]


class ProseWriter:
    """Sentences of the synthetic language about one document's cast: three named characters (full name at first
    mention, first name after), two places and a motif noun, all drawn from ``rng``.

    :func:`synthetic_documents` writes whole documents with it; :mod:`refine_core.data.synthetic_recall` interleaves
    its sentences with stated and recalled facts. The draws from ``rng`` happen in a fixed order, so a document is a
    function of the seed of ``rng`` alone.
    """

    def __init__(self, rng: random.Random) -> None:
        lang = _get_language()
        self.rng, self.lang = rng, lang
        self.cast = [f"{rng.choice(lang.first_names)} {rng.choice(lang.last_names)}" for _ in range(3)]
        self.places = rng.sample(lang.places, 2)
        self.motif = rng.choice(_NOUNS)
        self.introduced: set[str] = set()

    def character(self) -> str:
        full = _zipf(self.rng, self.cast)
        if full in self.introduced:
            return full.split()[0]  # later mentions use the first name: a copy task across the document
        self.introduced.add(full)
        return full

    def noun_phrase(self, noun: str) -> str:
        if self.rng.random() < 0.5:
            return f"the {_zipf(self.rng, self.lang.noun_adjs[noun])} {noun}"
        return f"the {noun}"

    def clause(self) -> str:
        rng, lang = self.rng, self.lang
        if rng.random() < 0.45:
            subject, subject_noun = self.character(), rng.choice(_PEOPLE)
        else:
            subject_noun = self.motif if rng.random() < 0.3 else rng.choice(_NOUNS + _PEOPLE)
            subject = self.noun_phrase(subject_noun)
        verb = _zipf(rng, lang.noun_verbs[subject_noun])
        obj = _zipf(rng, lang.verb_objects[verb])
        text = f"{subject} {verb} {self.noun_phrase(obj)}"
        roll = rng.random()
        if roll < 0.25:
            text += f" {_zipf(rng, lang.noun_preps[obj])} {self.noun_phrase(rng.choice(_NOUNS))}"
        elif roll < 0.4:
            text += f" {_zipf(rng, lang.verb_adverbs[verb])}"
        elif roll < 0.5:
            text += f" in {_zipf(rng, self.places)}"
        return text

    def sentence(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.2:
            text = f"{self.clause()}, and {self.clause()}"
        elif roll < 0.3:
            text = f"in {_zipf(rng, self.places)}, {self.clause()}"
        elif roll < 0.4:
            quoted = self.clause()
            text = f'"{quoted[0].upper()}{quoted[1:]}," said {self.character()}'
        else:
            text = self.clause()
        end = "?" if roll > 0.97 else "."
        return text[0].upper() + text[1:] + end

    def title(self) -> str:
        return f"The {self.motif.capitalize()} of {self.places[0]}"


def _synthetic_document(index: int, words: int, seed: int) -> str:
    rng = random.Random(f"refine-synthetic:{_SYNTHETIC_VERSION}:{seed}:{index}")
    prose = ProseWriter(rng)
    paragraphs: list[str] = []
    remaining = words
    while remaining > 0:
        para: list[str] = []
        for _ in range(rng.randint(3, 7)):
            s = prose.sentence()
            n = len(s.split())
            if n >= remaining:
                s = " ".join(s.split()[:remaining]).rstrip(",.?\"") + "."
                para.append(s)
                remaining = 0
                break
            para.append(s)
            remaining -= n
        paragraphs.append(" ".join(para))
    return prose.title() + "\n\n" + "\n\n".join(paragraphs) + "\n"


def synthetic_documents(num_docs: int, words: int, seed: int = 0) -> Iterator[Document]:
    """A seeded corpus of pseudo-English documents with learnable structure.

    Every document has a title and paragraphs of simple sentences over a fixed vocabulary of about 250 words with
    fixed collocations (each noun prefers a few adjectives and verbs, each verb a few objects), punctuation and
    dialogue, and a cast of three recurring named characters and two places (full name at first mention, first
    name after). A tiny model's loss falls quickly on it. The output depends only on ``(num_docs, words, seed)``.

    Args:
        num_docs: number of documents.
        words: words per document (body only; the title adds a few).
        seed: selects the documents; the vocabulary and collocations are the same for every seed.

    Returns:
        An iterator of documents with ids ``synthetic-{seed}-{index:06d}``.
    """
    if num_docs < 0 or words < 1:
        raise ValueError(f"synthetic_docs={num_docs} must be >= 0 and synthetic_words={words} must be >= 1.")
    for i in range(num_docs):
        yield Document(id=f"synthetic-{seed}-{i:06d}", text=_synthetic_document(i, words, seed))


# ---------------------------------------------------------------------------------------------------- fingerprint


def fingerprint(source: SourceConfig, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> str:
    """A sha256 hex digest that changes when the source's documents may have changed.

    Files: the settings plus each file's absolute path, size and mtime (cheap; a rewritten file changes it).
    ``synthetic``: the generator version and settings. Hub datasets: name, subset, split and settings (the hub
    content itself is not hashed).
    """
    settings: dict[str, Any] = {"path": source.path, "text_column": source.text_column, "max_docs": source.max_docs}
    if source.path == "synthetic":
        settings.update(version=_SYNTHETIC_VERSION, docs=source.synthetic_docs, words=source.synthetic_words,
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
