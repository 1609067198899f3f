"""Long training documents made of the passages inside LongBench and RULER task files, evaluation passages held out.

The ``passages`` data source (``data.sources: [{path: passages, passage_files: [...], heldout_files: [...]}]``)
reads the ``prompt`` column of LongBench (spec §9.1) and RULER QA (spec §9.2) parquet files, cuts every prompt into
*units*, drops duplicates and anything that belongs to evaluation, and packs what is left into documents of about
``passage_doc_chars`` characters. The small-scale reproduction (``configs/repro/``) pre-trains on it.

Units of a prompt (:func:`prompt_units`):

* a prompt with numbered blocks (RULER's ``Document i:``, LongBench's ``Passage i:``) gives one unit per block, so
  a RULER passage is one unit however many prompts repeat it; the template's instruction before the first block and
  its question after the last one (from the last block's ``"\\n\\nAnswer the question"`` / ``"\\n\\nNow, "`` on) are
  dropped;
* any other prompt gives one unit per blank-line-separated paragraph (story, article, report, transcript, code).
  Template paragraphs that every prompt of a task repeats become duplicates and go.

**What is held out, exactly.** Every prompt of every file in ``heldout_files`` is evaluation material: its units
(for RULER files: each ``Document i:`` passage) and its ``Question:`` line. From them come two sets of keys
(:class:`HeldOut`): the hash of each unit's *normalised* text (Unicode NFKC, lower case, every run of
non-alphanumeric characters turned into one space) and of every run of ``NGRAM_WORDS`` (13) consecutive normalised
words in them (the 13-gram overlap GPT-3's contamination study used). A training unit is dropped when its own key is
a held-out unit key, or when it shares any 13-word run with the evaluation material: a paragraph that quotes part of
an evaluation passage, with its own prefix or in other case and punctuation, goes too. Evaluation texts shorter than
13 words (short questions) only hold out identical units. A file may not be both a training and a held-out file.
After packing, :func:`find_leaks` scans every produced document for held-out 13-word runs once more and the source
raises if one is found: the guarantee (no evaluation 13-gram in any training document) does not rest on the
packing code alone.

**Duplicates.** A unit whose normalised key was already produced (by any earlier prompt of any file) is dropped, so
RULER's shared distractor passages and LongBench's repeated templates and few-shot examples count once.

**Order and ids.** Files in sorted order (:func:`refine_core.data.tasks.expand_task_files`), prompts in row order,
units in prompt order; the kept units of one prompt stay together and in order. Documents are filled greedily in
that order, units joined by a blank line: the unit that would overflow a document is cut at white space to fill it to
``doc_chars`` characters, and its rest begins the next document (so every document but the last has about
``doc_chars`` characters, and one prompt's long text runs on over several documents, in order). A document's id is
``{file name}:{row}:{n}``: the prompt of its first unit, and how many documents began in that prompt before it.
Everything is a function of the files' contents, so the corpus is the same on every machine.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refine_core.data.tasks import expand_task_files

logger = logging.getLogger(__name__)

PASSAGES_VERSION = 1
PROMPT_COLUMN = "prompt"
# Runs of this many consecutive normalised words identify evaluation text (GPT-3's decontamination used 13-grams):
# shorter runs ("in the united states of america") are common to unrelated texts.
NGRAM_WORDS = 13
# The numbered blocks of RULER QA (spec §5.1) and of LongBench's multi-document tasks.
_NUMBERED = re.compile(r"(?:^|\n)(?:Document|Passage) \d+:\n")
# Where the question part of a template starts, after the last numbered block.
_TRAILERS = ("\n\nAnswer the question", "\n\n Answer the question", "\n\nNow, ", "\n\n\nNow, ")
_QUESTION = re.compile(r"(?:^|\n)(?:Question|Query):\s*(.+)")
_NON_ALNUM = re.compile(r"[\W_]+")
# A document is not closed to cut off a head shorter than this; it is closed once it is this close to full.
_MIN_HEAD = 100


def normalize(text: str) -> str:
    """NFKC, lower case, runs of non-alphanumeric characters as one space, stripped."""
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _key(normalized: str) -> bytes:
    return hashlib.sha256(normalized.encode("utf-8")).digest()[:16]


def unit_key(text: str) -> bytes:
    """The dedupe / hold-out key of a unit: a hash of its normalised text."""
    return _key(normalize(text))


def ngram_keys(text: str, n: int = NGRAM_WORDS) -> set[bytes]:
    """Keys of every run of ``n`` consecutive words of normalised ``text`` (none when it has fewer words)."""
    words = normalize(text).split()
    return {_key(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def prompt_units(prompt: str) -> list[str]:
    """The units of one LongBench / RULER prompt (see the module docstring), stripped, empty ones dropped."""
    parts = _NUMBERED.split(prompt)
    if len(parts) > 1:
        blocks = parts[1:]  # parts[0] is the instruction before the first numbered block
        last = blocks[-1]
        cut = min((i for i in (last.find(t) for t in _TRAILERS) if i >= 0), default=-1)
        if cut >= 0:
            blocks[-1] = last[:cut]
    else:
        blocks = re.split(r"\n[ \t]*\n", prompt)
    return [b.strip() for b in blocks if b.strip()]


def prompt_question(prompt: str) -> str | None:
    """The text after the last ``Question:`` / ``Query:`` of a prompt (``None`` if it has none)."""
    found = _QUESTION.findall(prompt)
    return found[-1].strip() if found else None


def read_prompts(path: Path) -> list[str]:
    """The ``prompt`` column of a LongBench / RULER QA parquet file."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    if PROMPT_COLUMN not in names:
        raise ValueError(
            f"{path} has no {PROMPT_COLUMN!r} column (its columns: {sorted(names)}); passage_files and heldout_files "
            "must be LongBench or RULER QA task files (spec §9)."
        )
    return [p or "" for p in pq.read_table(path, columns=[PROMPT_COLUMN]).column(0).to_pylist()]


@dataclass
class HeldOut:
    """The keys of the evaluation material (see the module docstring)."""

    units: set[bytes] = field(default_factory=set)
    ngrams: set[bytes] = field(default_factory=set)
    files: list[str] = field(default_factory=list)
    n: int = NGRAM_WORDS

    @classmethod
    def from_prompts(cls, prompts: Iterable[str], n: int = NGRAM_WORDS) -> HeldOut:
        held = cls(n=n)
        for prompt in prompts:
            held.add_prompt(prompt)
        return held

    def add_prompt(self, prompt: str) -> None:
        question = prompt_question(prompt)
        for text in (*prompt_units(prompt), *([question] if question else [])):
            self.units.add(unit_key(text))
            self.ngrams |= ngram_keys(text, self.n)

    def holds(self, unit: str) -> str | None:
        """Why ``unit`` is evaluation material (``"unit"``: identical text, ``"ngram"``: a shared word run) or
        ``None``."""
        if unit_key(unit) in self.units:
            return "unit"
        if not ngram_keys(unit, self.n).isdisjoint(self.ngrams):
            return "ngram"
        return None


def load_heldout(files: Sequence[str], n: int = NGRAM_WORDS) -> HeldOut:
    """:class:`HeldOut` of every prompt of the parquet files named by ``files`` (paths, directories, globs)."""
    held = HeldOut(n=n)
    for path in expand_task_files(files) if files else []:
        for prompt in read_prompts(path):
            held.add_prompt(prompt)
        held.files.append(str(path))
    return held


def find_leaks(texts: Iterable[str], held: HeldOut) -> list[int]:
    """Indices of the texts that contain a held-out word run (the check run after packing)."""
    return [i for i, text in enumerate(texts) if not ngram_keys(text, held.n).isdisjoint(held.ngrams)]


@dataclass(frozen=True)
class PackedDocument:
    id: str
    text: str


@dataclass
class PassageCorpus:
    """The documents of one ``passages`` source and what building them dropped.

    Args:
        passage_files: LongBench / RULER parquet files (paths, directories or globs) to take units from.
        heldout_files: evaluation files whose every unit and sentence is held out.
        doc_chars: characters per packed document (a document may exceed it by up to one unit when units are short).
        ngram_words: see :data:`NGRAM_WORDS`.
    """

    passage_files: Sequence[str]
    heldout_files: Sequence[str] = ()
    doc_chars: int = 16000
    ngram_words: int = NGRAM_WORDS
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.passage_files:
            raise ValueError("a passages source needs passage_files: the LongBench / RULER parquet files to read "
                             "(e.g. [../shared/data/longbench, ../shared/data/ruler/ruler_hotpotqa_*.parquet]).")
        if self.doc_chars < 200:
            raise ValueError(f"passage_doc_chars={self.doc_chars} is too small; use about max_tokens x 4 characters.")

    def training_files(self) -> list[Path]:
        files = expand_task_files(self.passage_files)
        held = {p.resolve() for p in expand_task_files(self.heldout_files)} if self.heldout_files else set()
        both = [str(p) for p in files if p.resolve() in held]
        if both:
            raise ValueError(f"{both} are both passage_files and heldout_files: evaluation files cannot be training "
                             "data; remove them from passage_files.")
        return files

    def documents(self) -> Iterator[PackedDocument]:
        """Build the corpus (see the module docstring); :attr:`stats` is complete once the iterator is exhausted."""
        files = self.training_files()
        held = load_heldout(self.heldout_files, self.ngram_words)
        stats = self.stats
        stats.clear()
        stats.update(prompts=0, units=0, duplicate=0, heldout_unit=0, heldout_ngram=0, kept_units=0,
                     kept_chars=0, documents=0, heldout_units_known=len(held.units),
                     heldout_ngrams_known=len(held.ngrams))
        seen: set[bytes] = set()

        def units() -> Iterator[tuple[str, str]]:
            for path in files:
                for row, prompt in enumerate(read_prompts(path)):
                    stats["prompts"] += 1
                    for unit in prompt_units(prompt):
                        stats["units"] += 1
                        key = unit_key(unit)
                        if key in seen:
                            stats["duplicate"] += 1
                            continue
                        why = held.holds(unit)
                        if why is not None:
                            stats[f"heldout_{why}"] += 1
                            continue
                        seen.add(key)
                        stats["kept_units"] += 1
                        stats["kept_chars"] += len(unit)
                        yield f"{path.name}:{row}", unit

        buffer: list[str] = []
        first_id = ""
        size = 0
        begun: dict[str, int] = {}  # documents begun in each prompt, for the ids
        for where, unit in units():
            while unit:
                if not buffer:
                    first_id = f"{where}:{begun.get(where, 0)}"
                    begun[where] = begun.get(where, 0) + 1
                room = self.doc_chars - size - (2 if buffer else 0)
                if len(unit) <= room:
                    head, unit = unit, ""
                elif room < _MIN_HEAD and buffer:
                    head = ""  # too little room to be worth a cut: close this document
                else:
                    head, unit = _cut(unit, max(room, _MIN_HEAD))
                if head:
                    buffer.append(head)
                    size += len(head) + (2 if len(buffer) > 1 else 0)
                if unit or size >= self.doc_chars - _MIN_HEAD:
                    yield self._checked(first_id, "\n\n".join(buffer), held)
                    buffer, size = [], 0
        if buffer:
            yield self._checked(first_id, "\n\n".join(buffer), held)
        logger.info("passages: %s", ", ".join(f"{k} {v}" for k, v in stats.items()))

    def _checked(self, doc_id: str, text: str, held: HeldOut) -> PackedDocument:
        if find_leaks([text], held):
            raise RuntimeError(f"passages: document {doc_id} contains a held-out {held.n}-word run after packing, "
                               "across the boundary of two units that are each clean; report it (refine_core.data."
                               "passages) with the files used")
        self.stats["documents"] += 1
        return PackedDocument(doc_id, text)


def _cut(text: str, limit: int) -> tuple[str, str]:
    """``text`` cut at the last white space before ``limit`` characters (at ``limit`` if there is none in its
    second half): the head, stripped, and the rest."""
    at = text.rfind(" ", limit // 2, limit + 1)
    at = limit if at < 0 else at
    return text[:at].rstrip(), text[at:].lstrip()
