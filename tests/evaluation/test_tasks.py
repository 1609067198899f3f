"""Task registry (spec §5): budgets, post-processing, scoring of real gold answers, summaries ×100."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from refine_core.data.tasks import (
    LONGBENCH_MAX_GEN_TOKENS,
    TaskExample,
    iter_task_files,
    read_longbench,
    read_ruler_qa,
    task_name_from_path,
)
from refine_core.evaluation.metrics import TREC_CLASSES, ruler_qa_score
from refine_core.evaluation.niah import NIAH_TASK_CONFIGS
from refine_core.evaluation.tasks import (
    LONGBENCH_TASKS,
    NIAH_TASKS,
    PAPER_LONGBENCH_TASKS,
    RULER_QA_TASKS,
    TASKS,
    get_task,
    score_predictions,
    summarize,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LONGBENCH_DIR = SHARED_DATA / "longbench"
RULER_DIR = SHARED_DATA / "ruler"
needs_longbench = pytest.mark.skipif(not LONGBENCH_DIR.is_dir(), reason=f"LongBench files not found at {LONGBENCH_DIR}")
needs_ruler = pytest.mark.skipif(not RULER_DIR.is_dir(), reason=f"RULER files not found at {RULER_DIR}")

# Spec §5.3: Table C's columns and the per-task generation budgets.
TABLE_C = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "qmsum", "multi_news", "samsum",
           "trec", "triviaqa", "lcc", "repobench-p"]
ABBREVIATIONS = ["NQ", "QR", "MF", "HP", "2W", "QM", "MN", "SS", "TC", "TQ", "LC", "RP"]
BUDGETS = {"narrativeqa": 128, "qasper": 128, "samsum": 128, "multifieldqa_en": 64, "trec": 64, "lcc": 64,
           "repobench-p": 64, "hotpotqa": 32, "2wikimqa": 32, "triviaqa": 32, "qmsum": 512, "multi_news": 512,
           "musique": 32, "gov_report": 512}


def _ex(answers: list[str], task: str = "t") -> TaskExample:
    return TaskExample(id=f"{task}:0", task=task, prompt="p", answers=answers)


def test_registry_tables() -> None:
    assert list(PAPER_LONGBENCH_TASKS) == TABLE_C
    assert [TASKS[n].abbreviation for n in TABLE_C] == ABBREVIATIONS
    assert set(LONGBENCH_TASKS) == set(TABLE_C) | {"musique", "gov_report"} and len(LONGBENCH_TASKS) == 14
    assert {n: TASKS[n].max_new_tokens for n in LONGBENCH_TASKS} == BUDGETS == LONGBENCH_MAX_GEN_TOKENS
    assert all(TASKS[n].in_paper_table for n in TABLE_C)
    assert not TASKS["musique"].in_paper_table and not TASKS["gov_report"].in_paper_table
    assert TASKS["musique"].metric == "qa_f1" and TASKS["gov_report"].metric == "rouge_l"
    assert [TASKS[n].max_new_tokens for n in RULER_QA_TASKS] == [32, 32]
    assert list(NIAH_TASKS) == list(NIAH_TASK_CONFIGS)
    assert all(TASKS[n].max_new_tokens == 64 and TASKS[n].metric == "string_match_all" for n in NIAH_TASKS)
    assert len({spec.abbreviation for spec in TASKS.values()}) == len(TASKS)


def test_get_task_errors_and_fallback_override() -> None:
    with pytest.raises(ValueError, match="unknown evaluation task 'nq'.*narrativeqa"):
        get_task("nq")
    assert get_task("lcc").code_sim_fallback == "refine"  # the official REFINE scorer (spec §10.17)
    longbench = get_task("lcc", code_sim_fallback="longbench")
    assert longbench.code_sim_fallback == "longbench" and TASKS["lcc"].code_sim_fallback == "refine"
    assert get_task("lcc").score("# no code line", _ex(["x = 1"])) > 0.0  # scored against the whole text
    assert longbench.score("# no code line", _ex(["x = 1"])) == 0.0  # scored against ""
    with pytest.raises(ValueError, match="code_sim_fallback"):
        get_task("lcc", code_sim_fallback="other")  # type: ignore[arg-type]


# 200-character gold and prediction of test_metrics.py's autojunk test: difflib 2 (M = 5 of L = 400 -> 2.5 -> 2,
# half to even), indel 99 (LCS 198).
GOLD_200 = "AB = [" + "0, " * 64 + "0]"
PRED_200 = "AB = (" + "0, " * 64 + "0)"


@pytest.mark.parametrize("task", ["lcc", "repobench-p"])
def test_code_sim_similarity_default_and_override(task: str) -> None:
    assert all(spec.code_sim_similarity == "difflib" for spec in TASKS.values())
    spec = get_task(task)
    assert spec.code_sim_similarity == "difflib"  # fuzzywuzzy 0.18.0 without python-Levenshtein, the paper's
    assert spec.score(PRED_200, _ex([GOLD_200])) == 0.02
    indel = get_task(task, code_sim_similarity="indel")
    assert indel.code_sim_similarity == "indel" and TASKS[task].code_sim_similarity == "difflib"
    assert indel.score(PRED_200, _ex([GOLD_200])) == 0.99
    assert get_task(task, code_sim_similarity="difflib") == spec
    # both overrides together: "#x" has no qualifying line -> LongBench scores "" -> 0 with either similarity
    both = get_task(task, code_sim_fallback="longbench", code_sim_similarity="indel")
    assert (both.code_sim_fallback, both.code_sim_similarity) == ("longbench", "indel")
    assert both.score("#x", _ex(["x"])) == 0.0
    # max over the gold answers uses the chosen similarity for each: max(difflib 2, exact match 100)
    assert spec.score(PRED_200, _ex([GOLD_200, PRED_200])) == 1.0
    with pytest.raises(ValueError, match="code_sim_similarity='levenshtein'.*'difflib'.*'indel'"):
        get_task(task, code_sim_similarity="levenshtein")  # type: ignore[arg-type]


RAW = "\n\nFirst line\nsecond line"


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        *[(t, "") for t in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique")],
        *[(t, "First line") for t in ("triviaqa", "samsum", "trec")],  # lstrip "\n" first
        *[(t, RAW) for t in ("qmsum", "multi_news", "lcc", "repobench-p", "gov_report")],  # untouched
        ("ruler_squadqa", ""),  # first line, then RULER clean-up
        ("niah_single_1", "First line\nsecond line"),  # RULER clean-up only (strip), no first-line cut
    ],
)
def test_postprocess_per_task(task: str, expected: str) -> None:
    assert get_task(task).postprocess(RAW) == expected


def test_score_uses_postprocessing_and_metric() -> None:
    # QA: first line "Paris" only; "the cat sat" vs "a cat sat down" -> F1 0.8 (see test_metrics)
    assert get_task("hotpotqa").score("the cat sat\nmore", _ex(["a cat sat down"])) == pytest.approx(0.8)
    assert get_task("hotpotqa").score("\nParis", _ex(["Paris"])) == 0.0  # empty first line
    assert get_task("triviaqa").score("\nParis", _ex(["Paris"])) == 1.0  # lstrip "\n" first
    assert get_task("trec").score("\nCity\nIndividual", _ex(["City"])) == 1.0  # second line dropped
    assert get_task("niah_multivalue").score(" 1, 2\t3 ", _ex(["1", "2", "3", "4"])) == 0.75
    for raw in ("Paris\tFrance", "\nParis", "  paris  ", "\x00PARIS", "Rome\nParis"):
        for answers in (["Paris France"], ["France"], ["paris"]):
            assert get_task("ruler_squadqa").score(raw, _ex(answers)) == ruler_qa_score(raw, answers)


def test_score_predictions() -> None:
    examples = [_ex(["Paris"]), _ex(["Rome"])]
    assert score_predictions("hotpotqa", examples, ["Paris", "Berlin"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        score_predictions("hotpotqa", examples, ["Paris"])


def test_summarize_reports_times_100_with_table_c_average() -> None:
    scores = {name: [0.2] for name in TABLE_C}
    scores["narrativeqa"] = [1.0, 0.0]  # mean 0.5 -> 50.0
    scores["musique"] = [1.0]  # not in the average
    summary = summarize(scores)
    assert summary["scores"]["narrativeqa"] == pytest.approx(50.0)
    assert summary["scores"]["trec"] == pytest.approx(20.0)
    assert summary["counts"]["narrativeqa"] == 2
    assert summary["abbreviations"]["2wikimqa"] == "2W"
    # (50 + 11 * 20) / 12 = 270 / 12 = 22.5
    assert summary["averages"]["longbench"] == pytest.approx(22.5)
    assert summary["missing_for_longbench_avg"] == []

    partial = summarize({"narrativeqa": [1.0], "niah_multiquery": [0.5], "niah_multivalue": [0.25]})
    assert "longbench" not in partial["averages"] and len(partial["missing_for_longbench_avg"]) == 11
    assert partial["averages"] == {"niah_MQ": 50.0, "niah_MV": 25.0}  # complete NIAH groups only
    with pytest.raises(ValueError, match="has no scores"):
        summarize({"trec": []})


# --- real files -----------------------------------------------------------------------------------------------------


@needs_longbench
def test_registry_covers_the_longbench_files() -> None:
    files = list(iter_task_files(LONGBENCH_DIR))
    names = {task_name_from_path(p) for p in files}
    assert names == set(LONGBENCH_TASKS), f"files {sorted(names)} vs registry {sorted(LONGBENCH_TASKS)}"
    for path in files:
        examples = read_longbench(path)
        spec = get_task(examples[0].task)
        assert {ex.task for ex in examples} == {spec.name}
        assert {ex.max_gen_tokens for ex in examples} == {spec.max_new_tokens}, path.name


@needs_longbench
def test_trec_labels_match_the_shipped_prompts() -> None:
    examples = read_longbench(LONGBENCH_DIR / "trec_16384.parquet")
    labels = {m for ex in examples for m in re.findall(r"Type: ([^\n]+)", ex.prompt)}
    labels |= {a for ex in examples for a in ex.answers}
    assert labels == set(TREC_CLASSES)


def _plain(answer: str) -> bool:
    return "\n" not in answer and answer == answer.strip()


@needs_longbench
@pytest.mark.parametrize("task", LONGBENCH_TASKS)
def test_first_gold_answer_scores_full_marks(task: str) -> None:
    examples = [ex for ex in read_longbench(LONGBENCH_DIR / f"{task}_16384.parquet") if _plain(ex.answers[0])][:4]
    assert examples
    spec = get_task(task)
    for ex in examples:
        # ROUGE-L of a text with itself is 2 / (2 + 1e-8) (the package's epsilon), every other metric gives 1.0
        expected = 2 / (2 + 1e-8) if spec.metric == "rouge_l" else 1.0
        assert spec.score(ex.answers[0], ex) == pytest.approx(expected, abs=1e-12), ex.id


@needs_longbench
def test_where_the_gold_answer_does_not_score_full_marks() -> None:
    by_id = {ex.id: ex for ex in read_longbench(LONGBENCH_DIR / "qasper_16384.parquet")}
    # qasper:30's answers span several lines; the first-line rule keeps "Byte-Pair Encoding perplexity (BPE PPL),"
    # so even the gold text scores below 1 (7 qasper items have multi-line answers).
    ex = by_id["qasper:30"]
    assert get_task("qasper").score(ex.answers[0], ex) < 0.5
    # samsum:4's gold ends with ". " and the official scorer strips the prediction but not the gold: the gold gets
    # an empty last sentence, whose "" word is one more distinct reference word: 41 distinct prediction words, 42
    # reference words, union LCS 41 -> R = 41/42, P = 1 -> F = 2 * 41/42 / (1 + 41/42 + 1e-8) ~= 82/83.
    samsum = {ex.id: ex for ex in read_longbench(LONGBENCH_DIR / "samsum_16384.parquet")}["samsum:4"]
    assert samsum.answers[0].endswith(". ")
    assert get_task("samsum").score(samsum.answers[0], samsum) == pytest.approx(82 / 83, abs=1e-8)


@needs_ruler
def test_ruler_gold_answers_score_one() -> None:
    for path in iter_task_files(RULER_DIR):
        examples = read_ruler_qa(path)[:5]
        spec = get_task(examples[0].task)
        assert spec.name in RULER_QA_TASKS
        assert score_predictions(spec, examples, [ex.answers[0] for ex in examples]) == [1.0] * len(examples)
        assert score_predictions(spec, examples, ["I do not know"] * len(examples)) == [0.0] * len(examples)
