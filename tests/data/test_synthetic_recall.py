"""The ``synthetic_recall`` source: seeded documents whose facts are stated once and recalled much later."""

from __future__ import annotations

import re

import pytest

from refine_core.config import SourceConfig
from refine_core.data.sources import count_documents, fingerprint, iter_documents
from refine_core.data.synthetic_recall import (
    GAP_FRACTION,
    recall_document,
    synthetic_recall_documents,
)


def _word_index(text: str, char: int) -> int:
    return len(text[:char].split())


@pytest.mark.parametrize("words", [400, 1500])
def test_every_recall_repeats_an_earlier_statement_much_later(words: int) -> None:
    for index in range(8):
        doc = recall_document(index, words, seed=5)
        text = doc.text
        assert abs(len(text.split()) - words) < 0.15 * words + 40
        recalled = [f for f in doc.facts if f.recall is not None]
        assert recalled and len(recalled) < len(doc.facts) + 1
        for fact in doc.facts:
            assert fact.statement.endswith(fact.value) or fact.statement.endswith(fact.value + ".")
            stated_at = text.find(fact.statement)
            assert stated_at >= 0, fact
            if fact.recall is None:
                continue
            assert fact.recall.endswith(fact.value + ".")
            recalled_at = text.find(fact.recall)
            assert recalled_at > stated_at
            gap = _word_index(text, recalled_at) - _word_index(text, stated_at)
            # the planned gap is words // 4; an event can be pushed a few words back by the one before it
            assert gap >= GAP_FRACTION * words - 60, (fact, gap)
            # the recall repeats the statement's subject with the same value
            if fact.kind == "name":
                assert fact.recall == "As noted before, " + fact.statement
            elif fact.kind == "number":
                assert fact.recall == "Recall that " + fact.statement[0].lower() + fact.statement[1:]
            else:
                key = fact.statement.split(": ")[0]
                assert fact.recall.endswith(f", {key} was {fact.value}.")


def test_numbers_and_subjects_are_distinct_within_a_document() -> None:
    for index in range(10):
        doc = recall_document(index, 2000, seed=1)
        numbers = [f.value for f in doc.facts if f.value.isdigit()]
        assert len(numbers) == len(set(numbers))
        statements = [f.statement for f in doc.facts]
        assert len(statements) == len(set(statements))
        # a ledger appears once, as a paragraph of "key: value" lines
        for header in re.findall(r"The ledger of [^\n]+ lists:", doc.text):
            assert doc.text.count(header) == 1


def test_deterministic_and_prefix_stable() -> None:
    docs = list(synthetic_recall_documents(4, 500, seed=2))
    assert docs == list(synthetic_recall_documents(4, 500, seed=2))
    assert list(synthetic_recall_documents(2, 500, seed=2)) == docs[:2]
    assert [d.id for d in docs] == [f"synthetic_recall-2-{i:06d}" for i in range(4)]
    assert docs[0].text != next(synthetic_recall_documents(1, 500, seed=3)).text
    assert "special magic" not in " ".join(d.text for d in docs)  # not the NIAH wording


def test_source_config_wiring_and_bad_settings() -> None:
    source = SourceConfig(path="synthetic_recall", synthetic_docs=3, synthetic_words=300, synthetic_seed=4)
    docs = list(iter_documents(source))
    assert [d.id for d in docs] == [f"synthetic_recall-4-{i:06d}" for i in range(3)]
    assert count_documents(source) == 3
    assert fingerprint(source) != fingerprint(SourceConfig(path="synthetic", synthetic_docs=3, synthetic_words=300,
                                                           synthetic_seed=4))
    with pytest.raises(ValueError, match="synthetic_words=50"):
        recall_document(0, 50)
