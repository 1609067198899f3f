"""Running an evaluation suite: collect the tasks of an ``eval`` config, score answers, write the results.

Shared by ``refine evaluate`` (answer with fixed weights) and ``refine ttt`` (adapt on each batch of prompts
first). Outputs, under the stage directory: ``predictions/<task>.jsonl`` (id, prompt hash, prediction, answers,
score), ``summary.json``, ``summary.md`` (scores ×100 as in the paper's tables) and ``niah_heatmap.png`` when
NIAH tasks ran; all of them are logged to the tracker, with one ``eval/<task>`` metric per task.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refine_core.config import EvalConfig
from refine_core.data.tasks import TaskExample, expand_task_files, read_task_file
from refine_core.evaluation.answering import encode_prompt
from refine_core.evaluation.niah import (
    BUILTIN_HAYSTACK,
    NIAH_TASK_CONFIGS,
    generate_niah,
    haystack_sentences,
    niah_summary,
)
from refine_core.evaluation.report import niah_heatmap, results_table, write_predictions_jsonl
from refine_core.evaluation.tasks import get_task, summarize
from refine_core.tokenizer import Tokenizer
from refine_core.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass
class EvalTask:
    """One task's examples, encoded, with how to answer and score them."""

    name: str
    examples: list[TaskExample]
    prompts: list[list[int]]
    max_new_tokens: int
    truncated: int = 0
    # NIAH only: the haystack length and needle depth of each example, for the heatmap.
    cells: list[tuple[int, float]] = field(default_factory=list)
    # NIAH only: where its essay haystack came from (a file, or the built-in text).
    haystack: str | None = None


@dataclass
class EvalResult:
    summary: dict[str, Any]  # task -> score ×100, plus averages
    table: str  # Markdown
    output_dir: Path
    per_task: dict[str, list[float]] = field(default_factory=dict)


def _max_new_tokens(name: str, example: TaskExample) -> int:
    # spec §5.3: per-task generation budgets; the parquet column, when present, agrees with the registry.
    return int(example.max_gen_tokens or get_task(name).max_new_tokens)


def collect_tasks(cfg: EvalConfig, tokenizer: Tokenizer, seed: int = 0) -> list[EvalTask]:
    """Task files and generated NIAH tasks of ``cfg``, encoded with ``tokenizer`` (first tokens kept)."""
    by_name: dict[str, list[TaskExample]] = {}
    skipped: set[str] = set()  # tasks of the files that eval.tasks leaves out
    for path in expand_task_files(cfg.task_files) if cfg.task_files else []:
        examples = read_task_file(path, official_pipe_split=cfg.official_answer_split)
        if not examples:
            continue
        name = examples[0].task
        if cfg.tasks is not None and name not in cfg.tasks:
            skipped.add(name)
            continue
        by_name.setdefault(name, []).extend(examples)
    tasks = []
    for name, examples in by_name.items():
        examples = examples[: cfg.max_examples] if cfg.max_examples is not None else examples
        budget = _max_new_tokens(name, examples[0])
        encoded = [encode_prompt(tokenizer, ex.prompt, cfg.max_seq_tokens - budget) for ex in examples]
        tasks.append(
            EvalTask(
                name=name,
                examples=examples,
                prompts=[e.ids for e in encoded],
                max_new_tokens=budget,
                truncated=sum(e.truncated for e in encoded),
            )
        )
    essay = haystack_sentences(cfg.niah_haystack_file) if cfg.niah_haystack_file and cfg.niah_tasks else []
    haystack = str(cfg.niah_haystack_file) if essay else BUILTIN_HAYSTACK
    for name in cfg.niah_tasks:
        examples, prompts, cells = [], [], []
        for length in cfg.niah_lengths:
            for ex in generate_niah(
                name, tokenizer, length, cfg.niah_examples_per_cell, depths=cfg.niah_depths, seed=seed, essay=essay
            ):
                examples.append(
                    TaskExample(
                        id=ex.id,
                        task=name,
                        prompt=ex.prompt,
                        answers=list(ex.references),
                        max_gen_tokens=get_task(name).max_new_tokens,
                        extra={},
                    )
                )
                prompts.append(tokenizer.encode(ex.prompt))
                cells.append((ex.length, ex.depth))
        uses_essay = NIAH_TASK_CONFIGS[name].haystack == "essay"
        tasks.append(EvalTask(name, examples, prompts, get_task(name).max_new_tokens, cells=cells,
                              haystack=haystack if uses_essay else None))
    for task in tasks:
        if task.truncated:
            logger.warning(
                "%s: %d prompts exceeded the token budget and kept their beginning (spec §10.14)",
                task.name,
                task.truncated,
            )
    if not tasks and cfg.tasks is not None and (cfg.task_files or cfg.niah_tasks):
        found = sorted({*skipped, *cfg.niah_tasks})
        raise ValueError(
            f"eval.tasks={cfg.tasks} matches none of the configured tasks ({', '.join(found) or 'none'}); name "
            "some of them or set eval.tasks=null"
        )
    if not tasks:
        raise ValueError("the eval config names no task: set eval.task_files and/or eval.niah_tasks")
    return tasks


def score_task(task: EvalTask, predictions: Sequence[str]) -> list[float]:
    spec = get_task(task.name)
    return [spec.score(pred, ex) for pred, ex in zip(predictions, task.examples, strict=True)]


def write_results(
    out_dir: Path,
    tasks: Sequence[EvalTask],
    predictions: dict[str, list[str]],
    tracker: Tracker,
    step: int = 0,
    extra_metrics: dict[str, float] | None = None,
) -> EvalResult:
    """Score, write predictions / summary / heatmap under ``out_dir`` and log them; see the module docstring."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_task: dict[str, list[float]] = {}
    heat: list[dict[str, Any]] = []
    for task in tasks:
        preds = predictions[task.name]
        scores = score_task(task, preds)
        per_task[task.name] = scores
        rows = [
            {
                "id": ex.id,
                "task": task.name,
                "prompt_sha256": hashlib.sha256(ex.prompt.encode()).hexdigest(),
                "prediction": pred,
                "answers": ex.answers,
                "score": score,
            }
            for ex, pred, score in zip(task.examples, preds, scores, strict=True)
        ]
        write_predictions_jsonl(out_dir / "predictions" / f"{task.name}.jsonl", rows)
        heat.extend(
            {"task": task.name, "length": length, "depth": depth, "score": score}
            for (length, depth), score in zip(task.cells, scores, strict=False)
        )
    summary = summarize(per_task)
    if heat:
        summary["niah_table"] = niah_summary(heat)  # Table A layout: group -> length -> ×100
    haystacks = sorted({t.haystack for t in tasks if t.haystack})
    if haystacks:
        summary["niah_haystack"] = haystacks[0]
    table = results_table(summary)
    if haystacks:
        table += f"\n\nNIAH essay haystack: {haystacks[0]}"
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (out_dir / "summary.md").write_text(table + "\n")
    if heat:
        niah_heatmap(heat, out_dir / "niah_heatmap.png")
    metrics = {f"eval/{name}": float(value) for name, value in summary["scores"].items()}
    metrics.update({f"eval/avg/{name}": float(value) for name, value in summary["averages"].items()})
    tracker.log_metrics({**metrics, **(extra_metrics or {})}, step=step)
    tracker.log_artifacts(out_dir, artifact_path=out_dir.name)
    logger.info("results (×100):\n%s", table)
    return EvalResult(summary=summary, table=table, output_dir=out_dir, per_task=per_task)
