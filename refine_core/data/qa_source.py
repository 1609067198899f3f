"""What a RULER QA file is built from: questions with their gold and related documents, and the document pool.

Read from SQuAD / HotpotQA (:mod:`refine_core.data.ruler_qa`) or from RULER QA task files
(:mod:`refine_core.data.ruler_qa_source`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QAItem:
    """One question of a QA source.

    Attributes:
        question: the question text, used verbatim.
        answers: the gold answers (SQuAD: every annotator's answer, duplicates kept as RULER does).
        gold: indices into :attr:`QASource.documents` that every prompt of this question contains.
        related: preferred distractors, used before random ones (SQuAD: the other paragraphs of the same article,
            RULER's ``more_context``).
    """

    question: str
    answers: list[str]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


@dataclass
class QASource:
    """Questions and the document pool their prompts are drawn from.

    Attributes:
        questions: in source order; a question's position is the ``index`` column of the files.
        documents: the deduplicated, sorted document texts (RULER sorts them, which fixes the sampling order).
        name: ``"squad"`` or ``"hotpotqa"`` (informational).
    """

    questions: list[QAItem]
    documents: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.documents)
        for q, item in enumerate(self.questions):
            if not item.answers:
                raise ValueError(f"question {q} ({item.question!r}) has no answers; drop it from the source.")
            if not item.gold:
                raise ValueError(f"question {q} ({item.question!r}) has no gold document; drop it from the source.")
            ids = (*item.gold, *item.related)
            if len(set(ids)) != len(ids):
                raise ValueError(f"question {q}: gold {item.gold} and related {item.related} must be distinct and "
                                 "disjoint document indices.")
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise ValueError(f"question {q}: document indices {bad} are outside the pool of {n} documents.")
