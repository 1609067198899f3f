"""Synthetic long documents that state facts and recall them much later (``data.sources: [{path: synthetic_recall}]``).

The ``synthetic`` corpus (:func:`refine_core.data.sources.synthetic_documents`) teaches a model local structure and
a little copying (characters' first names). These documents add what in-context recall needs: a fact is *stated*
once, prose of the same synthetic language follows for at least a quarter of the document, and the fact is then
*recalled* with the same subject and the same value, so that predicting the value at the recall needs the fast-weight
state (the short convolution sees four tokens). Three kinds of fact, none in the wording of the RULER NIAH
templates (so NIAH stays an out-of-distribution test of recall):

* **names**: ``"Talen Dorson was born in Mirefield."`` / ``"As noted before, Talen Dorson was born in Mirefield."``;
  the trade of a character works the same way (``"... works as a baker."``);
* **numbers**: ``"The code of the silver lantern is 48213."`` / ``"Recall that the code of the silver lantern is
  48213."``;
* **key–value lists**: a paragraph ``"The ledger of Vireach lists:"`` with 4-8 lines ``"amber-river: 3841"``, and
  later ``"In the ledger of Vireach, amber-river was 3841."`` for one or two of its keys.

Statements sit in the first 55 % of the words, each recall at least ``words // 4`` words after its statement; about
a fifth of the facts are never recalled. Within a document every subject and every number is distinct. A document
is a function of ``(index, words, seed)`` only (string-seeded :class:`random.Random`), so a prefix of the corpus does
not depend on how many documents are asked for; ids are ``synthetic_recall-{seed}-{index:06d}``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from refine_core.data.document import Document
from refine_core.data.synthetic import ADJECTIVES, NOUNS, PEOPLE, ProseWriter, get_language

SYNTHETIC_RECALL_VERSION = 1
# Statements in the first STATE_SPAN of the words, recalls at least GAP_FRACTION of the words later.
STATE_SPAN = 0.55
GAP_FRACTION = 0.25
# About one fact per this many words; this share of them is never recalled.
WORDS_PER_FACT = 120
UNRECALLED = 0.2


@dataclass(frozen=True)
class Fact:
    """A stated fact: ``statement`` (a sentence, or a line of a ledger) and its ``recall`` sentence (``None``: never
    recalled), both ending in ``value``; the planned word positions of both (the text may place them a few words
    later, behind an earlier event)."""

    kind: str  # "name", "number" or "list"
    value: str
    statement: str
    recall: str | None
    stated_word: int
    recalled_word: int | None


@dataclass
class RecallDocument:
    """One generated document and its facts (for tests and probes)."""

    text: str
    facts: list[Fact] = field(default_factory=list)


@dataclass(order=True)
class _Event:
    word: int
    order: int
    text: str = field(compare=False)
    block: bool = field(compare=False, default=False)  # a paragraph of its own (a key–value list)


def recall_document(index: int, words: int, seed: int = 0) -> RecallDocument:
    """Generate document ``index`` of the corpus ``seed`` with about ``words`` words (see the module docstring)."""
    if words < 200:
        raise ValueError(f"synthetic_words={words} is too short for stated and recalled facts; use >= 200.")
    rng = random.Random(f"refine-synthetic-recall:{SYNTHETIC_RECALL_VERSION}:{seed}:{index}")
    prose = ProseWriter(rng)
    lang = get_language()
    gap = words // 4
    n_facts = max(2, words // WORDS_PER_FACT)
    used_subjects: set[str] = set()
    used_numbers: set[int] = set()

    def number() -> str:
        while True:
            value = rng.randint(1000, 99999)
            if value not in used_numbers:
                used_numbers.add(value)
                return str(value)

    def fresh(make) -> str:
        for _ in range(100):
            subject = make()
            if subject not in used_subjects:
                used_subjects.add(subject)
                return subject
        raise RuntimeError("synthetic_recall: ran out of distinct subjects; lower synthetic_words")

    facts: list[Fact] = []
    events: list[_Event] = []

    def add(kind: str, value: str, stated: int, statement: str, recall: str | None, block: bool = False) -> None:
        recalled = None
        if recall is not None:
            recalled = rng.randint(stated + gap, max(stated + gap, int(0.98 * words)))
            events.append(_Event(recalled, len(events), recall))
        if not block:  # a ledger line is part of its block's event
            events.append(_Event(stated, len(events), statement))
        facts.append(Fact(kind, value, statement, recall, stated, recalled))

    for _ in range(n_facts):
        stated = rng.randint(int(0.02 * words), int(STATE_SPAN * words))
        recalled = rng.random() >= UNRECALLED
        kind = rng.choice(("name", "name", "number", "number", "list"))
        if kind == "name":
            def person() -> str:
                return f"{rng.choice(lang.first_names)} {rng.choice(lang.last_names)}"

            if rng.random() < 0.5:
                subject, value = fresh(lambda: f"{person()} was born in"), rng.choice(lang.places)
            else:
                subject, value = fresh(lambda: f"{person()} works as a"), rng.choice(PEOPLE)
            add("name", value, stated, f"{subject} {value}.",
                f"As noted before, {subject} {value}." if recalled else None)
        elif kind == "number":
            subject = fresh(lambda: f"the {rng.choice(('code', 'price', 'count', 'number'))} of the "
                                    f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")
            value = number()
            add("number", value, stated, f"{subject[0].upper()}{subject[1:]} is {value}.",
                f"Recall that {subject} is {value}." if recalled else None)
        else:
            header = fresh(lambda: f"The ledger of {rng.choice(lang.places)}")
            place = header.removeprefix("The ledger of ")
            entries = []
            for _ in range(rng.randint(4, 8)):
                entries.append((fresh(lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"), number()))
            block = f"{header} lists:\n" + "\n".join(f"{key}: {value}" for key, value in entries)
            events.append(_Event(stated, len(events), block, block=True))
            asked = set(rng.sample(range(len(entries)), rng.randint(1, 2))) if recalled else set()
            for i, (key, value) in enumerate(entries):
                subject = f"In the ledger of {place}, {key} was"
                add("list", value, stated, f"{key}: {value}", f"{subject} {value}." if i in asked else None, block=True)

    return RecallDocument(_write(prose, rng, sorted(events), words), facts)


def _write(prose: ProseWriter, rng: random.Random, events: list[_Event], words: int) -> str:
    """Prose sentences until each event's word position, the event's text there, in paragraphs of 3-7 sentences."""
    paragraphs: list[str] = []
    para: list[str] = []
    target = rng.randint(3, 7)
    count = 0
    queue = list(events)
    while count < words or queue:
        if queue and count >= queue[0].word:
            event = queue.pop(0)
            if event.block:
                if para:
                    paragraphs.append(" ".join(para))
                    para = []
                paragraphs.append(event.text)
            else:
                para.append(event.text)
            count += len(event.text.split())
        else:
            sentence = prose.sentence()
            para.append(sentence)
            count += len(sentence.split())
        if len(para) >= target:
            paragraphs.append(" ".join(para))
            para, target = [], rng.randint(3, 7)
    if para:
        paragraphs.append(" ".join(para))
    return prose.title() + "\n\n" + "\n\n".join(paragraphs) + "\n"


def synthetic_recall_documents(num_docs: int, words: int, seed: int = 0) -> Iterator[Document]:
    """``num_docs`` documents of :func:`recall_document` as :class:`~refine_core.data.sources.Document` objects."""
    if num_docs < 0:
        raise ValueError(f"synthetic_docs={num_docs} must be >= 0.")
    for i in range(num_docs):
        yield Document(id=f"synthetic_recall-{seed}-{i:06d}", text=recall_document(i, words, seed).text)
