"""A RULER QA source rebuilt from RULER QA task files, so that ``refine make-ruler-qa`` can make new files offline.

SQuAD and HotpotQA (the sources RULER's ``qa_1`` / ``qa_2`` read) are not available offline, but the shipped RULER
QA test files (spec §9.2) hold their questions, answers and passages. :func:`read_ruler_qa_files` turns such files
into a :class:`~refine_core.data.ruler_qa.QASource` (``ruler_qa.source_format: ruler``), from which
:func:`~refine_core.data.ruler_qa.make_ruler_qa` builds train / test files at any length and with any tokenizer.
The small-scale reproduction (``configs/repro/``) makes its held-out RULER-QA set this way from the SQuAD files,
whose every passage the pre-training corpus holds out (:mod:`refine_core.data.passages`).

How a question is rebuilt:

* **Questions**: one per distinct ``(index, question)`` over all files (the ``index`` column is RULER's position of
  the question in its source, the same across the files of one dataset), ordered by ``index``; its answers are the
  ``answer`` column (they agree across files).
* **Documents**: the ``Document i:`` passages of every prompt (:func:`refine_core.data.passages.prompt_units`),
  deduplicated and sorted (RULER sorts its pool too).
* **Gold**: the passages present in *every* prompt of the question (each file drew its random distractors
  independently, so the intersection is the question's own material) that contain one of its answers,
  case-insensitively. SQuAD's answers are spans of their paragraph, so this finds the gold paragraph (and,
  for a short answer, sometimes another passage that happens to contain it: both are kept, the prompt then holds
  both). A question with no such passage is skipped and counted (HotpotQA's yes/no answers, for instance).
* **Related** (preferred distractors): the other passages present in every prompt of the question; for SQuAD these
  are its article's other paragraphs, which RULER puts first among the distractors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from refine_core.data.passages import prompt_question, prompt_units
from refine_core.data.qa_source import QAItem, QASource
from refine_core.data.tasks import expand_task_files

logger = logging.getLogger(__name__)

_COLUMNS = ("index", "prompt", "answer", "task")


@dataclass
class _Question:
    question: str
    answers: list[str]
    prompts: list[list[str]] = field(default_factory=list)


def read_ruler_qa_files(patterns: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> QASource:
    """A :class:`~refine_core.data.ruler_qa.QASource` from RULER QA parquet files (see the module docstring).

    Args:
        patterns: a file, directory or glob, or a list of them (e.g. ``ruler_squadqa_*_4096_200_test.parquet``).

    Returns:
        The source; its ``name`` is the files' ``task`` (e.g. ``ruler_squadqa``), which names the files written
        from it.

    Raises:
        ValueError: a file is not in the RULER QA layout, the files mix tasks, or no question has a gold passage.
    """
    import pyarrow.parquet as pq

    items = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    files = expand_task_files([os.fspath(p) for p in items])
    questions: dict[tuple[int, str], _Question] = {}
    tasks: set[str] = set()
    for path in files:
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in _COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path} lacks the RULER QA column(s) {missing} (its columns: {sorted(names)}); "
                             "ruler_qa.source_format=ruler reads RULER QA task files (spec §9.2).")
        for row in pq.read_table(path, columns=list(_COLUMNS)).to_pylist():
            tasks.add(str(row["task"]))
            question = prompt_question(row["prompt"])
            if question is None:
                raise ValueError(f"{path}: row with index {row['index']} has no 'Question:' line; not a RULER QA "
                                 "prompt.")
            entry = questions.setdefault((int(row["index"]), question),
                                         _Question(question, [str(a) for a in row["answer"]]))
            entry.prompts.append(prompt_units(row["prompt"]))
    if len(tasks) != 1:
        raise ValueError(f"the files hold the tasks {sorted(tasks)}; read one dataset at a time (one task).")
    documents = sorted({unit for q in questions.values() for units in q.prompts for unit in units})
    doc_id = {d: i for i, d in enumerate(documents)}
    out: list[QAItem] = []
    skipped = 0
    for _, entry in sorted(questions.items(), key=lambda kv: kv[0]):
        shared = [u for u in dict.fromkeys(entry.prompts[0]) if all(u in units for units in entry.prompts[1:])]
        answers = [a.lower() for a in entry.answers if a.strip()]
        gold = [doc_id[u] for u in shared if any(a in u.lower() for a in answers)]
        if not gold:
            skipped += 1
            continue
        related = [doc_id[u] for u in shared if doc_id[u] not in gold]
        out.append(QAItem(question=entry.question, answers=entry.answers, gold=tuple(gold), related=tuple(related)))
    if skipped:
        logger.warning("%s: %d of %d questions have no passage containing an answer in all their prompts; skipped",
                       next(iter(tasks)), skipped, len(questions))
    if not out:
        raise ValueError(f"no question of {[str(f) for f in files]} has a passage that contains its answer; these "
                         "files cannot be rebuilt into a QA source.")
    logger.info("%s: %d questions over %d distinct passages from %d file(s)", next(iter(tasks)), len(out),
                len(documents), len(files))
    return QASource(questions=out, documents=documents, name=next(iter(tasks)))
