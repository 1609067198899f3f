"""The synthetic corpus: a seeded pseudo-English with learnable structure that needs no files.

:func:`synthetic_documents` writes whole documents (the ``synthetic`` source); :class:`ProseWriter`, the vocabulary
and :func:`get_language` are shared with :mod:`refine_core.data.synthetic_recall`, which interleaves facts to recall.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from refine_core.data.document import Document

# The synthetic "language": a fixed vocabulary with fixed preferences (which adjectives go with which noun, which
# verbs a noun does, which objects a verb takes), drawn once from _LANGUAGE_SEED, so every synthetic source shares
# it. Documents differ through their own seeded choices and their cast of recurring named entities, which gives a
# model both local (word spelling, collocations) and long-range (who is in this document) structure to learn.
SYNTHETIC_VERSION = 1
_LANGUAGE_SEED = 20260216


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _words(
    "river city garden letter window forest mountain harbor lantern bridge village market castle tower road ship "
    "island valley mirror book song story dream storm winter summer morning evening candle stone map key door "
    "house field orchard well bell clock shadow meadow cottage library wall fire horse wagon journey promise "
    "secret question answer reason memory"
)
# Nouns for people: a named character acts with the verbs these prefer.
PEOPLE = _words("friend teacher soldier merchant farmer sailor king queen child stranger doctor painter baker captain")
_VERBS = _words(
    "found carried opened closed painted watched followed crossed remembered forgot built broke mended sold "
    "bought visited guarded lost wrote read answered asked left reached described sang hid showed "
    "brought kept counted measured studied praised warned greeted trusted doubted chose"
)
ADJECTIVES = _words(
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
        self.noun_adjs = {n: rng.sample(ADJECTIVES, 3) for n in NOUNS + PEOPLE}
        self.noun_verbs = {n: rng.sample(_VERBS, 4) for n in NOUNS + PEOPLE}
        self.verb_objects = {v: rng.sample(NOUNS + PEOPLE, 4) for v in _VERBS}
        self.verb_adverbs = {v: rng.sample(_ADVERBS, 2) for v in _VERBS}
        self.noun_preps = {n: rng.sample(_PREPOSITIONS, 2) for n in NOUNS + PEOPLE}

        def name() -> str:
            return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

        self.first_names = sorted({name() for _ in range(60)})
        self.last_names = sorted({name() + rng.choice(("son", "ova", "ard", "ien", "")) for _ in range(60)})
        self.places = sorted({name() + rng.choice((" Hollow", " Ford", "ia", " Reach", "mere")) for _ in range(40)})


_language: _Language | None = None


def get_language() -> _Language:
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
        lang = get_language()
        self.rng, self.lang = rng, lang
        self.cast = [f"{rng.choice(lang.first_names)} {rng.choice(lang.last_names)}" for _ in range(3)]
        self.places = rng.sample(lang.places, 2)
        self.motif = rng.choice(NOUNS)
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
            subject, subject_noun = self.character(), rng.choice(PEOPLE)
        else:
            subject_noun = self.motif if rng.random() < 0.3 else rng.choice(NOUNS + PEOPLE)
            subject = self.noun_phrase(subject_noun)
        verb = _zipf(rng, lang.noun_verbs[subject_noun])
        obj = _zipf(rng, lang.verb_objects[verb])
        text = f"{subject} {verb} {self.noun_phrase(obj)}"
        roll = rng.random()
        if roll < 0.25:
            text += f" {_zipf(rng, lang.noun_preps[obj])} {self.noun_phrase(rng.choice(NOUNS))}"
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
    rng = random.Random(f"refine-synthetic:{SYNTHETIC_VERSION}:{seed}:{index}")
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
