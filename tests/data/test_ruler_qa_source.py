"""``ruler_qa.source_format=ruler``: questions and passages rebuilt from RULER QA files, new files made from them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_core.data.passages import prompt_units
from refine_core.data.ruler_qa import format_ruler_qa_prompt, make_ruler_qa
from refine_core.data.ruler_qa_source import read_ruler_qa_files
from refine_core.data.tasks import read_task_file
from refine_core.tokenizer import ByteTokenizer

GOLD = [f"Paragraph {i} says that the answer to question {i} is token{i} and nothing else." for i in range(6)]
OTHER = [f"Filler passage {i} about rivers, hills and the weather of some far away country." for i in range(30)]


def write_ruler(path: Path, seed: int) -> Path:
    """Question i's prompt: its gold paragraph, a fixed related one, and two distractors that vary per file."""
    rows = {"index": [], "prompt": [], "answer": [], "task": []}
    for i in range(6):
        docs = [OTHER[(7 * i + seed) % 30], GOLD[i], OTHER[i], OTHER[(11 * i + 3 * seed + 1) % 30]]
        rows["index"].append(i)
        rows["prompt"].append(format_ruler_qa_prompt(docs, f"What is the answer to question {i}?"))
        rows["answer"].append([f"token{i}"])
        rows["task"].append("ruler_squadqa")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def test_questions_gold_and_related_are_rebuilt(tmp_path: Path) -> None:
    a = write_ruler(tmp_path / "ruler_squadqa_a_4096_200_test.parquet", seed=1)
    write_ruler(tmp_path / "ruler_squadqa_b_4096_200_test.parquet", seed=2)
    source = read_ruler_qa_files(str(tmp_path / "ruler_squadqa_*.parquet"))
    assert source.name == "ruler_squadqa"
    assert [q.question for q in source.questions] == [f"What is the answer to question {i}?" for i in range(6)]
    for i, q in enumerate(source.questions):
        assert [source.documents[g] for g in q.gold] == [GOLD[i]]
        # OTHER[i] is in both files' prompts: a related passage; the per-file distractors are not (mostly)
        assert OTHER[i] in [source.documents[r] for r in q.related]
    assert source.documents == sorted(set(source.documents))
    one = read_ruler_qa_files(a)  # one file: every passage of the prompt is shared, the gold is still found
    assert [one.documents[g] for g in one.questions[0].gold] == [GOLD[0]]


def test_make_ruler_qa_from_ruler_files_keeps_test_and_train_apart(tmp_path: Path) -> None:
    write_ruler(tmp_path / "src" / "ruler_squadqa_a_4096_200_test.parquet", seed=1)
    write_ruler(tmp_path / "src" / "ruler_squadqa_b_4096_200_test.parquet", seed=2)
    paths = make_ruler_qa(str(tmp_path / "src"), "ruler", ByteTokenizer(), 700, num_train=3, num_test=2,
                          out_dir=tmp_path / "out", seed=0, name="repro", doc_order="random", disjoint_gold=True)
    assert paths["test"].name == "ruler_squadqa_repro_700_2_test.parquet"
    test, train = read_task_file(paths["test"]), read_task_file(paths["train"])
    assert len(test) == 2 and len(train) == 3
    def questions(examples: list) -> set[str]:
        return {e.prompt.rsplit("Question: ", 1)[1] for e in examples}

    assert not questions(test) & questions(train)
    for example in test + train:
        assert len(example.prompt.encode()) + 32 <= 700  # byte tokenizer: tokens = bytes
        i = int(example.answers[0].removeprefix("token"))
        assert GOLD[i] in prompt_units(example.prompt)


def test_bad_ruler_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "ruler_squadqa_bad.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), bad)
    with pytest.raises(ValueError, match="lacks the RULER QA column"):
        read_ruler_qa_files(bad)
    write_ruler(tmp_path / "mix" / "ruler_squadqa_a.parquet", seed=1)
    other = write_ruler(tmp_path / "mix" / "ruler_hotpotqa_a.parquet", seed=1)
    table = pq.read_table(other).to_pydict()
    table["task"] = ["ruler_hotpotqa"] * len(table["task"])
    pq.write_table(pa.table(table), other)
    with pytest.raises(ValueError, match="one task"):
        read_ruler_qa_files(tmp_path / "mix")
