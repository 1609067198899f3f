"""RULER QA and LongBench readers, on the real files in ../shared/data (spec §9) and on small written files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_core.data.tasks import (
    RULER_MAX_GEN_TOKENS,
    iter_task_files,
    parse_answers,
    read_longbench,
    read_ruler_qa,
    read_task_file,
    task_name_from_path,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
RULER_DIR = SHARED_DATA / "ruler"
LONGBENCH_DIR = SHARED_DATA / "longbench"
needs_ruler = pytest.mark.skipif(not RULER_DIR.is_dir(), reason=f"RULER files not found at {RULER_DIR}")
needs_longbench = pytest.mark.skipif(not LONGBENCH_DIR.is_dir(), reason=f"LongBench files not found at {LONGBENCH_DIR}")

# Spec §9.1: rows and max_gen_tokens per LongBench file.
LONGBENCH_ROWS = {
    "narrativeqa": (61, 128), "qasper": (191, 128), "multifieldqa_en": (143, 64), "hotpotqa": (96, 32),
    "2wikimqa": (185, 32), "qmsum": (109, 512), "multi_news": (193, 512), "samsum": (155, 128),
    "trec": (200, 64), "triviaqa": (127, 32), "lcc": (488, 64), "repobench-p": (320, 64), "musique": (17, 32),
    "gov_report": (16, 512),
}


@needs_ruler
def test_real_ruler_files() -> None:
    files = list(iter_task_files(RULER_DIR))
    assert files, f"no parquet files in {RULER_DIR}"
    for path in files:
        examples = read_ruler_qa(path)
        task = task_name_from_path(path)
        assert task in ("ruler_squadqa", "ruler_hotpotqa")
        assert len(examples) == 200  # spec §9.2: 200 test prompts
        assert len({e.id for e in examples}) == 200
        for e in examples:
            assert e.task == task and e.id == f"{task}:{e.extra['index']}"
            assert e.prompt.startswith("Answer the question based on the given passages.")
            assert e.prompt.rstrip().endswith("Answer:")
            assert e.answers and all(isinstance(a, str) and a for a in e.answers)
            assert e.max_gen_tokens is None
            assert {"prompt_length", "total_length", "max_seq_length", "row"} <= set(e.extra)
        assert [e.extra["row"] for e in examples] == list(range(200))
    assert RULER_MAX_GEN_TOKENS == 32


@needs_ruler
def test_same_questions_across_models() -> None:
    # spec §9.2: the same 200 test questions across models (in a different, shuffled order)
    for dataset in ("squadqa", "hotpotqa"):
        pair = [RULER_DIR / f"ruler_{dataset}_{model}_4096_200_test.parquet" for model in ("lact", "delta_net")]
        if not all(p.exists() for p in pair):
            pytest.skip(f"missing one of {pair}")
        a, b = ({e.id: e.answers for e in read_ruler_qa(p)} for p in pair)
        assert a == b


@needs_longbench
def test_real_longbench_files() -> None:
    files = {task_name_from_path(p): p for p in iter_task_files(LONGBENCH_DIR)}
    assert set(files) == set(LONGBENCH_ROWS)
    for task, (rows, gen) in LONGBENCH_ROWS.items():
        examples = read_longbench(files[task])
        assert len(examples) == rows, task
        assert len({e.id for e in examples}) == rows
        assert all(e.task == task and e.max_gen_tokens == gen for e in examples)
        assert all(e.answers and e.prompt for e in examples)
        assert all(e.extra["total_length"] <= 16384 for e in examples)  # spec §9.1 filter
        assert "__index_level_0__" not in examples[0].extra
    assert read_task_file(files["qasper"])[0] == read_longbench(files["qasper"])[0]


@needs_longbench
def test_pipe_in_gold_answers() -> None:
    # spec §10.15: 'lcc' has code answers containing '|'; kept whole unless the official split is asked for
    examples = read_longbench(LONGBENCH_DIR / "lcc_16384.parquet")
    with_pipe = [e for e in examples if any("|" in a for a in e.answers)]
    assert with_pipe
    split = {e.id: e.answers for e in read_longbench(LONGBENCH_DIR / "lcc_16384.parquet", official_pipe_split=True)}
    for e in with_pipe:
        assert split[e.id] == "|".join(e.answers).split("|")
        assert len(split[e.id]) > len(e.answers)


def test_parse_answers() -> None:
    assert parse_answers(["a", "b|c"]) == ["a", "b|c"]
    assert parse_answers(["a", "b|c"], official_pipe_split=True) == ["a", "b", "c"]
    assert parse_answers("x|y") == ["x", "y"]
    assert parse_answers(("x",)) == ["x"]
    assert parse_answers(None) == []


def test_written_files_with_string_answers_and_no_task_column(tmp_path: Path) -> None:
    path = tmp_path / "ruler_squadqa_delta_net_8192_200_test.parquet"
    pq.write_table(pa.table({"index": [5, 9], "prompt": ["P1", "P2"], "answer": ["a|b", "c"]}), path)
    examples = read_task_file(path)
    assert [e.id for e in examples] == ["ruler_squadqa:5", "ruler_squadqa:9"]
    assert examples[0].answers == ["a", "b"] and examples[1].answers == ["c"]
    lb = tmp_path / "trec_16384.parquet"
    pq.write_table(pa.table({"prompt": ["Q"], "answers": [["Human being"]]}), lb)
    (example,) = read_longbench(lb)
    assert (example.id, example.task, example.max_gen_tokens) == ("trec:0", "trec", 64)  # spec §5.3 fallback


def test_reader_errors(tmp_path: Path) -> None:
    bad = tmp_path / "ruler_squadqa_x.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": [["a"]]}), bad)
    with pytest.raises(ValueError, match=r"none of the columns \['prompt'\].*\['answer', 'question'\]"):
        read_ruler_qa(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_longbench(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_task_files(tmp_path / "nope"))


def test_task_names_from_file_names() -> None:
    assert task_name_from_path("ruler_hotpotqa_lact_16384_1600_train.parquet") == "ruler_hotpotqa"
    assert task_name_from_path("/x/repobench-p_16384.parquet") == "repobench-p"
    assert task_name_from_path("multifieldqa_en_16384.parquet") == "multifieldqa_en"
