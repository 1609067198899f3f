"""Evaluation: metrics, the task registry, RULER NIAH generation and reports (spec §5).

Pure scoring and task definitions, no model code: :mod:`~refine_core.evaluation.metrics` (LongBench / RULER
metrics), :mod:`~refine_core.evaluation.tasks` (budgets, post-processing, scoring, summaries ×100),
:mod:`~refine_core.evaluation.niah` (NIAH prompts under any tokenizer) and :mod:`~refine_core.evaluation.report`
(Markdown table, heatmap, predictions JSONL). Generation lives with the stages that call these.
"""

from __future__ import annotations

from refine_core.evaluation.metrics import (
    TREC_CLASSES,
    classification_score,
    code_sim_score,
    difflib_ratio,
    indel_ratio,
    max_over_answers,
    normalize_answer,
    qa_f1_score,
    rouge_l_score,
    ruler_clean,
    ruler_qa_score,
    string_match_all,
    string_match_part,
    token_f1,
)
from refine_core.evaluation.niah import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    NIAH_TASK_CONFIGS,
    RULER_DEPTHS,
    NiahExample,
    NiahTaskConfig,
    essay_sentences,
    generate_niah,
    generate_niah_suite,
    niah_groups,
    niah_summary,
)
from refine_core.evaluation.report import niah_heatmap, prompt_sha256, results_table, write_predictions_jsonl
from refine_core.evaluation.tasks import (
    LONGBENCH_TASKS,
    NIAH_TASKS,
    PAPER_LONGBENCH_TASKS,
    RULER_QA_TASKS,
    TASKS,
    TaskSpec,
    get_task,
    score_predictions,
    summarize,
)

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "LONGBENCH_TASKS",
    "NIAH_TASKS",
    "NIAH_TASK_CONFIGS",
    "PAPER_LONGBENCH_TASKS",
    "RULER_DEPTHS",
    "RULER_QA_TASKS",
    "TASKS",
    "TREC_CLASSES",
    "NiahExample",
    "NiahTaskConfig",
    "TaskSpec",
    "classification_score",
    "code_sim_score",
    "difflib_ratio",
    "essay_sentences",
    "generate_niah",
    "generate_niah_suite",
    "get_task",
    "indel_ratio",
    "max_over_answers",
    "niah_groups",
    "niah_heatmap",
    "niah_summary",
    "normalize_answer",
    "prompt_sha256",
    "qa_f1_score",
    "results_table",
    "rouge_l_score",
    "ruler_clean",
    "ruler_qa_score",
    "score_predictions",
    "string_match_all",
    "string_match_part",
    "summarize",
    "token_f1",
    "write_predictions_jsonl",
]
