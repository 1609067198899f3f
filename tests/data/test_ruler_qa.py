"""RULER QA file builder (refine_core.data.ruler_qa) on tiny invented SQuAD / HotpotQA files, and against the
shipped 4K test files in ../shared/data/ruler (spec §5.1, §9.2) when they are present."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from refine_core.data.ruler_qa import (
    RULER_QA_COLUMNS,
    RULER_QA_CONTEXT_HEADER,
    RULER_QA_INSTRUCTION,
    QAItem,
    QASource,
    _PromptMaker,
    build_ruler_qa,
    format_ruler_qa_prompt,
    make_ruler_qa,
    read_hotpotqa,
    read_qa_source,
    read_squad,
    split_questions,
    write_ruler_qa_parquet,
)
from refine_core.data.tasks import read_ruler_qa
from refine_core.tokenizer import ByteTokenizer

RULER_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ruler"
SHIPPED_SQUAD = RULER_DIR / "ruler_squadqa_delta_net_4096_200_test.parquet"
needs_shipped = pytest.mark.skipif(not SHIPPED_SQUAD.is_file(), reason=f"shipped RULER file not found: {SHIPPED_SQUAD}")

HEAD = RULER_QA_INSTRUCTION + "\n\n" + RULER_QA_CONTEXT_HEADER + "\n"
TAIL = "\n\n" + RULER_QA_INSTRUCTION + "\n\nQuestion: "
BYTE = ByteTokenizer()


def parse_prompt(prompt: str) -> tuple[list[str], str]:
    """(documents in prompt order, question) of a RULER QA prompt; checks the numbering."""
    assert prompt.startswith(HEAD), prompt[:200]
    assert prompt.endswith("\nAnswer:")
    body, question = prompt[len(HEAD):].rsplit(TAIL, 1)
    numbers = [int(n) for n in re.findall(r"(?:^|\n\n)Document (\d+):\n", body)]
    assert numbers == list(range(1, len(numbers) + 1))
    docs = re.split(r"(?:^|\n\n)Document \d+:\n", body)[1:]
    return docs, question.removesuffix("\nAnswer:")


# ------------------------------------------------------------------------------------------------------------------
# tiny sources in the two formats

SYLLABLES = ["ka", "lo", "mir", "tes", "va", "dun", "rel", "os", "pi", "zan", "qu", "bel", "tor"]


def invented_name(i: int) -> str:
    return (SYLLABLES[i % 13] + SYLLABLES[(i // 13 + 5) % 13] + SYLLABLES[(3 * i + 7) % 13]).capitalize()


def squad_paragraph(i: int) -> tuple[str, str, str]:
    town, founder, year = invented_name(i), invented_name(i + 50), str(1100 + 7 * i)
    text = (f"The town of {town} lies on the river {invented_name(i + 100)}. It was founded in {year} by {founder}, "
            f"a merchant who traded wool and salt with the northern hills. In paragraph {i} the chronicle adds that "
            f"its market grew for {i + 3} generations, that the bridge was rebuilt twice, and that travellers "
            "praised the bread, the music and the long summer fairs held outside the walls.")
    return text, founder, year


@pytest.fixture(scope="module")
def squad_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 articles x 3 paragraphs, each with 2 answerable questions and 1 impossible one (SQuAD v2 layout)."""
    articles = []
    for a in range(12):
        paragraphs = []
        for p in range(3):
            i = 3 * a + p
            text, founder, year = squad_paragraph(i)
            town = invented_name(i)
            paragraphs.append({"context": text, "qas": [
                {"id": f"{i}a", "question": f"Who founded {town}?", "is_impossible": False,
                 "answers": [{"text": founder, "answer_start": 0}, {"text": founder, "answer_start": 0},
                             {"text": f"{founder}, a merchant", "answer_start": 0}]},
                {"id": f"{i}b", "question": f"When was {town} founded?", "is_impossible": False,
                 "answers": [{"text": year, "answer_start": 0}]},
                {"id": f"{i}c", "question": f"Who burned {town}?", "is_impossible": True, "answers": [],
                 "plausible_answers": [{"text": founder, "answer_start": 0}]},
            ]})
        articles.append({"title": f"Article {a}", "paragraphs": paragraphs})
    path = tmp_path_factory.mktemp("squad") / "dev-v2.0.json"
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return path


@pytest.fixture(scope="module")
def hotpot_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 items with 4 context paragraphs (2 supporting, 2 distractors; one distractor shared by all items)."""
    shared = ["Tessellation", [" is a tiling of a plane.", " It uses no gaps."]]
    items = []
    for i in range(12):
        band, city, person = invented_name(i), invented_name(i + 40), invented_name(i + 80)
        items.append({
            "_id": f"h{i}", "question": f"In which city was the singer of {band} born?", "answer": city,
            "type": "bridge", "level": "easy",
            "supporting_facts": [[band, 0], [person, 1]],
            "context": [
                [band, [f"{band} is a band formed in {1960 + i}.", f" Its singer is {person}."]],
                [f"Other {i}", [f"Other {i} is a river of {i + 10} kilometres.", " It floods in spring."]],
                [person, [f"{person} is a singer.", f" {person} was born in {city}."]],
                shared,
            ],
        })
    path = tmp_path_factory.mktemp("hotpot") / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def squad(squad_path: Path) -> QASource:
    return read_squad(squad_path)


def build(source: QASource, length: int = 4096, n: int = 30, seed: int = 42, **kw: Any) -> list[dict[str, Any]]:
    return build_ruler_qa(source, BYTE, length, n, seed, "ruler_squadqa", **kw)


# ------------------------------------------------------------------------------------------------------------------
# template


@needs_shipped
def test_template_matches_shipped_file() -> None:
    prompt = pq.read_table(SHIPPED_SQUAD, columns=["prompt"]).column("prompt")[0].as_py()
    assert prompt.startswith(RULER_QA_INSTRUCTION + "\n\n" + RULER_QA_CONTEXT_HEADER + "\nDocument 1:\n")
    assert prompt.endswith("\nAnswer:")
    docs, question = parse_prompt(prompt)
    assert len(docs) == 20
    # re-rendering the shipped documents and question gives the shipped prompt byte for byte
    assert format_ruler_qa_prompt(docs, question) == prompt


def test_prompt_layout() -> None:
    prompt = format_ruler_qa_prompt(["alpha text", "beta text"], "What?")
    assert prompt == (RULER_QA_INSTRUCTION + "\n\nThe following are given passages.\nDocument 1:\nalpha text\n\n"
                      "Document 2:\nbeta text\n\n" + RULER_QA_INSTRUCTION + "\n\nQuestion: What?\nAnswer:")


# ------------------------------------------------------------------------------------------------------------------
# readers


def test_read_squad(squad: QASource, squad_path: Path) -> None:
    assert len(squad.documents) == 36 and squad.documents == sorted(squad.documents)
    assert len(squad.questions) == 72  # the 36 impossible questions are skipped
    first = squad.questions[0]
    text, founder, _ = squad_paragraph(0)
    assert first.question == f"Who founded {invented_name(0)}?"
    assert first.answers == [founder, founder, f"{founder}, a merchant"]  # duplicates kept, like RULER
    assert squad.documents[first.gold[0]] == text
    # related = the other paragraphs of the same article (RULER's more_context)
    assert sorted(squad.documents[i] for i in first.related) == sorted(squad_paragraph(j)[0] for j in (1, 2))
    assert read_qa_source(squad_path, "squad").questions == squad.questions


def test_read_hotpotqa(hotpot_path: Path) -> None:
    src = read_hotpotqa(hotpot_path)
    assert len(src.questions) == 12
    assert len(src.documents) == 12 * 3 + 1  # the shared distractor is deduplicated
    assert "Tessellation\nTessellation is" not in src.documents[0]
    assert "Tessellation\n is a tiling of a plane. It uses no gaps." in src.documents  # ''.join(sentences)
    item = src.questions[0]
    assert item.answers == [invented_name(40)] and len(item.gold) == 4 and item.related == ()
    sup = read_hotpotqa(hotpot_path, gold="supporting").questions[0]
    assert {src.documents[i].split("\n")[0] for i in sup.gold} == {invented_name(0), invented_name(80)}
    assert len(sup.related) == 2
    with pytest.raises(ValueError, match="source_format='squad'"):
        read_hotpotqa(_write(hotpot_path.parent / "squad_like.json", {"data": []}))
    with pytest.raises(ValueError, match="source_format='hotpotqa'"):
        read_squad(hotpot_path)


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_missing_source_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dev-v2.0.json"):
        read_squad(tmp_path / "missing.json")


def test_source_validation() -> None:
    with pytest.raises(ValueError, match="distinct"):
        QASource([QAItem("q", ["a"], gold=(0,), related=(0,))], ["d"])
    with pytest.raises(ValueError, match="outside"):
        QASource([QAItem("q", ["a"], gold=(3,))], ["d"])


# ------------------------------------------------------------------------------------------------------------------
# building


def test_rows_gold_lengths_and_budget(squad: QASource) -> None:
    rows = build(squad, 4096, 30)
    assert len(rows) == 30
    for row in rows:
        assert tuple(row) == RULER_QA_COLUMNS
        item = squad.questions[row["index"]]
        docs, question = parse_prompt(row["prompt"])
        assert question == item.question and row["answer"] == item.answers
        assert squad.documents[item.gold[0]] in docs  # the gold paragraph is always there
        assert len(set(docs)) == len(docs) and set(docs) <= set(squad.documents)
        distractors = [d for d in docs if d != squad.documents[item.gold[0]]]
        assert distractors  # drawn from the pool, i.e. other questions' paragraphs
        assert all(any(squad.documents[q.gold[0]] == d for q in squad.questions if q.question != item.question)
                   for d in distractors)
        # true token counts, and the 32-token answer budget fits (spec §5.1)
        assert row["prompt_length"] == len(BYTE.encode(row["prompt"]))
        assert row["prompt_length"] + 32 <= row["max_seq_length"] == 4096
        assert row["max_answer_length"] == max(len(BYTE.encode(a)) for a in row["answer"])
        assert row["total_length"] == row["prompt_length"] + row["max_answer_length"]
        assert row["task"] == "ruler_squadqa"


def test_related_distractors_first(squad: QASource) -> None:
    # RULER fills with the same article's paragraphs before random ones
    for row in build(squad, 4096, 10):
        item = squad.questions[row["index"]]
        docs, _ = parse_prompt(row["prompt"])
        assert {squad.documents[i] for i in item.related} <= set(docs)


def test_more_documents_at_8k(squad: QASource) -> None:
    counts = {n: statistics.median(len(parse_prompt(r["prompt"])[0]) for r in build(squad, n, 20))
              for n in (4096, 8192)}
    assert counts[8192] > counts[4096] >= 10, counts
    assert all(r["prompt_length"] + 32 <= 8192 for r in build(squad, 8192, 20))


def test_doc_order(squad: QASource) -> None:
    def gold_slots(rows: list[dict[str, Any]]) -> set[tuple[int, int]]:
        out = set()
        for r in rows:
            docs, _ = parse_prompt(r["prompt"])
            out.add((len(docs), docs.index(squad.documents[squad.questions[r["index"]].gold[0]])))
        return out

    # RULER shuffles with a fresh Random(seed): the gold paragraph sits in one slot per prompt size
    assert len(gold_slots(build(squad, 4096, 30))) == 1
    assert len(gold_slots(build(squad, 4096, 30, doc_order="random"))) > 1


def test_deterministic_per_seed(squad: QASource) -> None:
    a, b = build(squad, 4096, 20, seed=3), build(squad, 4096, 20, seed=3)
    assert a == b
    c = build(squad, 4096, 20, seed=4)
    assert a != c
    assert [r["index"] for r in build(squad, 4096, 20, seed=3, shuffle_rows=False)] == list(range(20))


def test_doc_step_one_packs_tighter(squad: QASource) -> None:
    # ~370-byte paragraphs at 6000 bytes: RULER's steps of 10 stop at 10 documents, steps of 1 reach 15
    ruler = build(squad, 6000, 10, shuffle_rows=False)
    packed = build(squad, 6000, 10, shuffle_rows=False, doc_step=1)
    assert {len(parse_prompt(r["prompt"])[0]) for r in ruler} == {10}
    assert min(len(parse_prompt(r["prompt"])[0]) for r in packed) >= 14
    assert all(r["prompt_length"] + 32 <= 6000 < r["prompt_length"] + 32 + 400 for r in packed)


def test_sample_rest_matches_ruler_list_comprehension(squad: QASource) -> None:
    n = len(squad.documents)
    for seed in range(20):
        blocked = random.Random(seed).sample(range(n), 7)
        k = 1 + seed % (n - 7)
        maker = _PromptMaker(squad, seed, "ruler")
        expected = random.Random(seed).sample([i for i in range(n) if i not in blocked], k)
        assert maker._sample_rest(blocked, k) == expected


def test_skips_questions_whose_gold_exceeds_budget(hotpot_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = read_hotpotqa(hotpot_path)
    # make item 5's gold paragraphs huge
    big = QAItem(src.questions[5].question, src.questions[5].answers, gold=(len(src.documents),))
    src = QASource([*src.questions[:5], big, *src.questions[6:]], [*src.documents, "x" * 5000], "hotpotqa")
    with caplog.at_level(logging.WARNING, logger="refine_core.data.ruler_qa"):
        rows = build_ruler_qa(src, BYTE, 2048, 11, 42, "ruler_hotpotqa")
    assert len(rows) == 11 and 5 not in {r["index"] for r in rows}
    assert "skipped 1 question" in caplog.text
    with pytest.raises(ValueError, match="Raise max_seq_length or read HotpotQA with gold='supporting'"):
        build_ruler_qa(src, BYTE, 300, 3, 42, "ruler_hotpotqa")
    # with only the supporting paragraphs as gold, short budgets fit
    sup = read_hotpotqa(hotpot_path, gold="supporting")
    assert len(build_ruler_qa(sup, BYTE, 600, 5, 42, "ruler_hotpotqa")) == 5


def test_argument_errors(squad: QASource) -> None:
    with pytest.raises(ValueError, match="raise max_seq_length"):
        build(squad, 32, 1)
    with pytest.raises(ValueError, match="lower num_examples"):
        build(squad, 4096, 10, question_indices=[1, 2, 3])
    with pytest.raises(ValueError, match="duplicates"):
        build(squad, 4096, 2, question_indices=[1, 1])
    with pytest.raises(ValueError, match="ruler_squadqa"):
        build_ruler_qa(squad, BYTE, 4096, 1, 0, "squad")


# ------------------------------------------------------------------------------------------------------------------
# splits and files


def test_split_questions_disjoint(squad: QASource) -> None:
    train, test = split_questions(squad, 40, 20, seed=1)
    assert test == list(range(20)) and len(train) == 40 and not set(train) & set(test)
    assert split_questions(squad, 40, 20, seed=1) == (train, test)
    train2, test2 = split_questions(squad, 10, 10, seed=1, test_first=False)
    assert not set(train2) & set(test2) and test2 != list(range(10))
    # disjoint_gold: no train question is about a test paragraph
    train3, test3 = split_questions(squad, 30, 20, seed=1, disjoint_gold=True)
    test_docs = {squad.questions[q].gold for q in test3}
    assert all(squad.questions[q].gold not in test_docs for q in train3)
    with pytest.raises(ValueError, match="lower n_train"):
        split_questions(squad, 60, 20)
    rows = build(squad, 4096, 40, question_indices=train, exclude=test)
    assert {r["index"] for r in rows} == set(train)


def test_parquet_round_trip(squad: QASource, tmp_path: Path) -> None:
    rows = build(squad, 4096, 12)
    path = write_ruler_qa_parquet(rows, tmp_path / "sub" / "ruler_squadqa_byte_4096_12_test.parquet")
    examples = read_ruler_qa(path)
    assert [e.answers for e in examples] == [r["answer"] for r in rows]
    assert [e.id for e in examples] == [f"ruler_squadqa:{r['index']}" for r in rows]
    assert [e.prompt for e in examples] == [r["prompt"] for r in rows]
    assert examples[0].extra["prompt_length"] == rows[0]["prompt_length"]
    schema = pq.read_schema(path)
    assert tuple(schema.names) == RULER_QA_COLUMNS
    if SHIPPED_SQUAD.is_file():
        shipped = pq.read_schema(SHIPPED_SQUAD)
        assert [str(f.type) for f in schema] == [str(f.type) for f in shipped]
    with pytest.raises(ValueError, match="exactly"):
        write_ruler_qa_parquet([{"prompt": "p"}], tmp_path / "bad.parquet")


def test_make_ruler_qa_writes_disjoint_official_names(squad_path: Path, hotpot_path: Path, tmp_path: Path) -> None:
    out = make_ruler_qa(squad_path, "squad", "byte", 4096, 40, 20, tmp_path, seed=7)
    assert out["test"].name == "ruler_squadqa_byte_4096_20_test.parquet"
    assert out["train"].name == "ruler_squadqa_byte_4096_40_train.parquet"
    test, train = read_ruler_qa(out["test"]), read_ruler_qa(out["train"])
    test_ids, train_ids = {e.id for e in test}, {e.id for e in train}
    assert test_ids == {f"ruler_squadqa:{i}" for i in range(20)}  # RULER's test questions: the first ones
    assert len(train_ids) == 40 and not test_ids & train_ids
    assert not {e.prompt.rsplit("Question: ", 1)[1] for e in test} & {e.prompt.rsplit("Question: ", 1)[1]
                                                                         for e in train}
    out2 = make_ruler_qa(hotpot_path, "hotpotqa", BYTE, 2048, 6, 4, tmp_path, name="fla-hub/delta_net-1.3B")
    assert out2["test"].name == "ruler_hotpotqa_delta_net_1_3b_2048_4_test.parquet"
    assert read_ruler_qa(out2["train"])[0].task == "ruler_hotpotqa"
    with pytest.raises(ValueError, match="source_format"):
        make_ruler_qa(squad_path, "nq", "byte", 4096, 1, 1, tmp_path)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# structure of the shipped files, rebuilt from their own passages (informative)


class CharChunkTokenizer:
    """One token per ``chars_per_token`` characters: a stand-in for a BPE tokenizer with the same average rate."""

    name = "chunks"

    def __init__(self, chars_per_token: float) -> None:
        self.rate = chars_per_token

    def encode(self, text: str) -> list[int]:
        return [0] * math.ceil(len(text) / self.rate)


@needs_shipped
@pytest.mark.parametrize("dataset", ["squadqa", "hotpotqa"])
def test_shipped_structure_is_reproduced(dataset: str) -> None:
    path = RULER_DIR / f"ruler_{dataset}_delta_net_4096_200_test.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = pq.read_table(path).to_pylist()
    # spec §5.1: the prompt leaves the 32 answer tokens free; total = prompt + longest answer
    assert all(r["prompt_length"] + 32 <= r["max_seq_length"] == 4096 for r in rows)
    assert all(r["total_length"] == r["prompt_length"] + r["max_answer_length"] for r in rows)

    # a source made of the shipped passages: gold = the passages holding an answer, related = the rest of its prompt
    parsed = [parse_prompt(r["prompt"]) for r in rows]
    documents = sorted({d for docs, _ in parsed for d in docs})
    doc_id = {d: i for i, d in enumerate(documents)}
    questions = []
    for r, (docs, question) in zip(rows, parsed, strict=True):
        gold = [doc_id[d] for d in docs if any(a.lower() in d.lower() for a in r["answer"])][:2] or [doc_id[docs[0]]]
        questions.append(QAItem(question, r["answer"], tuple(gold),
                                tuple(doc_id[d] for d in docs if doc_id[d] not in gold)))
    source = QASource(questions, documents)
    rate = sum(len(r["prompt"]) for r in rows) / sum(r["prompt_length"] for r in rows)  # ~4.2 chars per token
    rebuilt = build_ruler_qa(source, CharChunkTokenizer(rate), 4096, 200, 42, f"ruler_{dataset}")
    shipped_docs = statistics.median(len(docs) for docs, _ in parsed)
    rebuilt_docs = statistics.median(len(parse_prompt(r["prompt"])[0]) for r in rebuilt)
    assert shipped_docs == 20
    assert shipped_docs / 2 <= rebuilt_docs <= shipped_docs * 2, (shipped_docs, rebuilt_docs)
    assert max(r["prompt_length"] for r in rebuilt) <= 4096 - 32


@needs_shipped
def test_gold_slot_matches_shipped_seed_42(squad: QASource) -> None:
    """The shipped SQuAD prompts hold the answer in document 19 of 20 (RULER's Random(42).shuffle quirk); the
    builder with seed 42 puts the gold paragraph in the same slot, which pins down both the seed and the shuffle."""
    slots: dict[int, int] = {}
    for r in pq.read_table(SHIPPED_SQUAD).to_pylist():
        docs, _ = parse_prompt(r["prompt"])
        for i, d in enumerate(docs):
            if any(a.lower() in d.lower() for a in r["answer"]):
                slots[i + 1] = slots.get(i + 1, 0) + 1
    shipped_slot = max(slots, key=slots.__getitem__)
    assert shipped_slot == 19 and slots[19] > 150
    rows = build(squad, 16384, 10, num_docs=20)
    for r in rows:
        docs, _ = parse_prompt(r["prompt"])
        assert len(docs) == 20
        assert docs.index(squad.documents[squad.questions[r["index"]].gold[0]]) + 1 == shipped_slot
