"""The task registry: generation budget, post-processing and metric of every evaluation task (spec §5).

* LongBench (spec §5.3): the 12 tasks of the paper's Table C, in :data:`PAPER_LONGBENCH_TASKS` (table order), plus
  musique (QA-F1) and gov_report (ROUGE-L), which are shipped but not in the table (:data:`LONGBENCH_TASKS` holds
  all 14). Post-processing and metrics follow the official REFINE scorer: first line for the QA tasks; lstrip "\\n"
  then first line for triviaqa / samsum / trec; none for qmsum / multi_news / lcc / repobench-p; then the metric's
  own strip (QA-F1, ROUGE-L, classification) and the max over the gold answers.
* RULER QA (spec §5.1): ``ruler_squadqa`` / ``ruler_hotpotqa``, 32 new tokens, first line + RULER clean-up, then
  substring match of any gold answer.
* RULER NIAH (spec §5.2): the eight ``niah_*`` tasks, 64 new tokens (lm-eval's ``max_gen_toks``), RULER clean-up
  (no first-line cut), ``string_match_all``.

:meth:`TaskSpec.score` takes the **raw** decoded generation (``skip_special_tokens``) and post-processes it itself;
do not post-process first (the RULER clean-up is not idempotent: it turns tabs into newlines). :func:`summarize`
reports means ×100 as the paper's tables do, with the unweighted 12-task LongBench average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, Protocol

from refine_core.evaluation import metrics
from refine_core.evaluation.niah import NIAH_TASK_CONFIGS, niah_groups

Suite = Literal["longbench", "ruler_qa", "niah"]
Postprocess = Literal["first_line", "lstrip_first_line", "none", "ruler_qa", "ruler"]
MetricName = Literal["qa_f1", "rouge_l", "classification", "code_sim", "string_match_part", "string_match_all"]


class HasAnswers(Protocol):
    """Anything with gold answers: :class:`refine_core.data.tasks.TaskExample` or a NIAH example."""

    @property
    def answers(self) -> Sequence[str]: ...


def _first_line(text: str) -> str:
    return text.split("\n")[0]


def _lstrip_first_line(text: str) -> str:
    return text.lstrip("\n").split("\n")[0]


def _ruler_qa_postprocess(text: str) -> str:
    return metrics.ruler_clean(text.split("\n")[0])


_POSTPROCESS: dict[str, Callable[[str], str]] = {
    "first_line": _first_line,
    "lstrip_first_line": _lstrip_first_line,
    "none": lambda text: text,
    "ruler_qa": _ruler_qa_postprocess,
    "ruler": metrics.ruler_clean,
}


@dataclass(frozen=True)
class TaskSpec:
    """How one task is generated, post-processed and scored.

    Attributes:
        name: the scorer key, as in the files' ``task`` column (``narrativeqa``, ``ruler_squadqa``, ...).
        abbreviation: the column name in the paper's tables (NQ, QR, ..., spec §5.3).
        suite: ``longbench``, ``ruler_qa`` or ``niah``.
        max_new_tokens: greedy generation budget (spec §5.1 / §5.2 / §5.3).
        postprocess_rule: ``first_line``, ``lstrip_first_line``, ``none``, ``ruler_qa`` (first line + RULER clean-up)
            or ``ruler`` (RULER clean-up only).
        metric: ``qa_f1``, ``rouge_l``, ``classification``, ``code_sim``, ``string_match_part`` or
            ``string_match_all``.
        in_paper_table: one of the 12 LongBench columns of Table C (spec §5.3).
        code_sim_fallback: for ``code_sim`` only: ``refine`` (the official REFINE scorer, which produced the paper's
            numbers) or ``longbench`` (original LongBench), spec §10.17.
        code_sim_similarity: for ``code_sim`` only: ``difflib`` (fuzzywuzzy 0.18.0 without python-Levenshtein, the
            official REFINE environment, which produced the paper's numbers) or ``indel`` (thefuzz / rapidfuzz), spec
            §5.3; see :func:`refine_core.evaluation.metrics.difflib_ratio`.
    """

    name: str
    abbreviation: str
    suite: Suite
    max_new_tokens: int
    postprocess_rule: Postprocess
    metric: MetricName
    in_paper_table: bool = False
    code_sim_fallback: metrics.CodeSimFallback = "refine"
    code_sim_similarity: metrics.CodeSimSimilarity = "difflib"

    def postprocess(self, text: str) -> str:
        """The spec §5 post-processing of a raw generation (before the metric)."""
        return _POSTPROCESS[self.postprocess_rule](text)

    def score_answers(self, prediction: str, answers: Sequence[str]) -> float:
        """Score an already post-processed prediction against the gold answers (max over answers, in [0, 1])."""
        if self.metric == "string_match_all":
            return metrics.string_match_all(prediction, answers)
        if self.metric == "string_match_part":
            return metrics.string_match_part(prediction, answers)
        # The official LongBench wrappers strip before QA-F1 / ROUGE / classification, not before code_sim.
        one: Callable[[str, str], float]
        if self.metric == "qa_f1":
            one, prediction = metrics.qa_f1_score, prediction.strip()
        elif self.metric == "rouge_l":
            one, prediction = metrics.rouge_l_score, prediction.strip()
        elif self.metric == "classification":
            one, prediction = metrics.classification_score, prediction.strip()
        elif self.metric == "code_sim":
            one = partial(
                metrics.code_sim_score, fallback=self.code_sim_fallback, similarity=self.code_sim_similarity
            )
        else:
            raise ValueError(f"task {self.name!r} has unknown metric {self.metric!r}; see TaskSpec.metric.")
        return metrics.max_over_answers(one, prediction, answers)

    def score(self, prediction: str, example: HasAnswers) -> float:
        """Score one raw decoded generation: :meth:`postprocess`, then :meth:`score_answers` on ``example.answers``.

        Args:
            prediction: the decoded response (special tokens skipped), not post-processed.
            example: a ``TaskExample`` or ``NiahExample`` (anything with ``answers``).

        Returns:
            The score in [0, 1].
        """
        return self.score_answers(self.postprocess(prediction), list(example.answers))


def _lb(name: str, abbr: str, tokens: int, post: Postprocess, metric: MetricName, paper: bool = True) -> TaskSpec:
    return TaskSpec(name, abbr, "longbench", tokens, post, metric, in_paper_table=paper)


# Spec §5.3 table (budgets) and post-processing/metric table, in Table C's column order.
_LONGBENCH = (
    _lb("narrativeqa", "NQ", 128, "first_line", "qa_f1"),
    _lb("qasper", "QR", 128, "first_line", "qa_f1"),
    _lb("multifieldqa_en", "MF", 64, "first_line", "qa_f1"),
    _lb("hotpotqa", "HP", 32, "first_line", "qa_f1"),
    _lb("2wikimqa", "2W", 32, "first_line", "qa_f1"),
    _lb("qmsum", "QM", 512, "none", "rouge_l"),
    _lb("multi_news", "MN", 512, "none", "rouge_l"),
    _lb("samsum", "SS", 128, "lstrip_first_line", "rouge_l"),
    _lb("trec", "TC", 64, "lstrip_first_line", "classification"),
    _lb("triviaqa", "TQ", 32, "lstrip_first_line", "qa_f1"),
    _lb("lcc", "LC", 64, "none", "code_sim"),
    _lb("repobench-p", "RP", 64, "none", "code_sim"),
    # Shipped but not in Table C (spec §5.3); LongBench's metrics, the REFINE scorer's post-processing.
    _lb("musique", "MU", 32, "first_line", "qa_f1", paper=False),
    _lb("gov_report", "GR", 512, "none", "rouge_l", paper=False),
)
_RULER_QA = (
    TaskSpec("ruler_squadqa", "SQuAD", "ruler_qa", 32, "ruler_qa", "string_match_part"),
    TaskSpec("ruler_hotpotqa", "Hotpot", "ruler_qa", 32, "ruler_qa", "string_match_part"),
)
# lm-eval's RULER NIAH tasks decode at most 64 tokens and score string_match_all after RULER's clean-up (spec §5.2).
NIAH_ABBREVIATIONS = {
    "niah_single_1": "S1", "niah_single_2": "S2", "niah_single_3": "S3", "niah_multikey_1": "MK1",
    "niah_multikey_2": "MK2", "niah_multikey_3": "MK3", "niah_multiquery": "MQ", "niah_multivalue": "MV",
}
_NIAH = tuple(
    TaskSpec(name, NIAH_ABBREVIATIONS[name], "niah", 64, "ruler", "string_match_all") for name in NIAH_TASK_CONFIGS
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (*_LONGBENCH, *_RULER_QA, *_NIAH)}
LONGBENCH_TASKS: tuple[str, ...] = tuple(spec.name for spec in _LONGBENCH)
PAPER_LONGBENCH_TASKS: tuple[str, ...] = tuple(spec.name for spec in _LONGBENCH if spec.in_paper_table)
RULER_QA_TASKS: tuple[str, ...] = tuple(spec.name for spec in _RULER_QA)
NIAH_TASKS: tuple[str, ...] = tuple(NIAH_TASK_CONFIGS)


def get_task(
    name: str,
    code_sim_fallback: metrics.CodeSimFallback | None = None,
    code_sim_similarity: metrics.CodeSimSimilarity | None = None,
) -> TaskSpec:
    """The registered task ``name``.

    Args:
        name: a task name (``narrativeqa``, ``repobench-p``, ``ruler_squadqa``, ``niah_single_1``, ...).
        code_sim_fallback: override the lcc / repobench-p fallback (default ``refine``, spec §10.17).
        code_sim_similarity: override the lcc / repobench-p similarity (default ``difflib``, the paper's; ``indel``
            for thefuzz / rapidfuzz), spec §5.3.

    Raises:
        ValueError: unknown name (the message lists the known ones) or an unknown override value.
    """
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}.")
    if code_sim_fallback is not None and code_sim_fallback != spec.code_sim_fallback:
        if code_sim_fallback not in ("refine", "longbench"):
            raise ValueError(f"code_sim_fallback={code_sim_fallback!r}; use 'refine' or 'longbench' (spec §10.17).")
        spec = replace(spec, code_sim_fallback=code_sim_fallback)
    if code_sim_similarity is not None and code_sim_similarity != spec.code_sim_similarity:
        if code_sim_similarity not in ("difflib", "indel"):
            raise ValueError(
                f"code_sim_similarity={code_sim_similarity!r}; use 'difflib' (the paper's, fuzzywuzzy 0.18.0 without "
                "python-Levenshtein) or 'indel' (thefuzz / rapidfuzz), spec §5.3."
            )
        spec = replace(spec, code_sim_similarity=code_sim_similarity)
    return spec


def score_predictions(task: str | TaskSpec, examples: Sequence[HasAnswers], predictions: Sequence[str]) -> list[float]:
    """Score raw generations against their examples, one score in [0, 1] per example.

    Raises:
        ValueError: ``examples`` and ``predictions`` differ in length.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if len(examples) != len(predictions):
        raise ValueError(
            f"{spec.name}: {len(examples)} examples but {len(predictions)} predictions; pass one prediction per "
            "example, in the same order."
        )
    return [spec.score(pred, ex) for pred, ex in zip(predictions, examples, strict=True)]


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def summarize(scores_by_task: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per-task means ×100 and the averages the paper reports.

    Args:
        scores_by_task: task name -> per-example scores in [0, 1] (names need not be registered).

    Returns:
        A JSON-serialisable dict: ``scores`` (task -> mean ×100, unrounded), ``counts`` (task -> number of
        examples), ``abbreviations`` (task -> table column), ``averages`` (``longbench``: the unweighted mean of the
        12 Table C task scores ×100, spec §5.3, present only when all 12 were scored; ``niah_<group>`` for every
        complete NIAH group of spec §5.2, the mean of its tasks' scores) and ``missing_for_longbench_avg``.

    Raises:
        ValueError: a task has no scores.
    """
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, values in scores_by_task.items():
        if len(values) == 0:
            raise ValueError(f"task {name!r} has no scores; drop it from scores_by_task or score its examples.")
        scores[name] = 100.0 * _mean(values)
        counts[name] = len(values)
    averages: dict[str, float] = {}
    missing = [name for name in PAPER_LONGBENCH_TASKS if name not in scores]
    if not missing:
        averages["longbench"] = _mean([scores[name] for name in PAPER_LONGBENCH_TASKS])
    for group, names in niah_groups().items():
        if all(name in scores for name in names):
            averages[f"niah_{group}"] = _mean([scores[name] for name in names])
    return {
        "scores": scores,
        "counts": counts,
        "abbreviations": {name: TASKS[name].abbreviation if name in TASKS else name for name in scores},
        "averages": averages,
        "missing_for_longbench_avg": missing,
    }
