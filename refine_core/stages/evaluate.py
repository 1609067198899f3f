"""Stage: evaluation on RULER QA, LongBench and generated RULER NIAH tasks (spec §5), with fixed weights.

``evaluate(cfg, tracker)`` loads ``cfg.model`` (a checkpoint directory, hub name or s3:// URI in
``model.source``), answers every task of ``cfg.eval`` greedily through the recurrent cache, scores the answers
with each task's metric and writes predictions, a summary table (×100) and the NIAH heatmap; see
:mod:`refine_core.evaluation.runner`.

Command line::

    refine evaluate --config configs/tiny-eval.yaml model.source=runs/tiny-refine/train-refine/model
"""

from __future__ import annotations

import logging

from refine_core.config import RunConfig
from refine_core.evaluation.answering import answer_prompts
from refine_core.evaluation.runner import EvalResult, collect_tasks, write_results
from refine_core.progress import Progress
from refine_core.runtime import autocast, seed_everything, select_device
from refine_core.stages.prepare_data import tokenizer_spec
from refine_core.tokenizer import load_tokenizer
from refine_core.tracking import NullTracker, Tracker
from refine_core.training.setup import build_or_load_model

logger = logging.getLogger(__name__)

STAGE = "evaluate"


def evaluate(cfg: RunConfig, tracker: Tracker | None = None) -> EvalResult:
    """Answer and score every task of ``cfg.eval`` with ``cfg.model``; see the module docstring."""
    tracker = tracker or NullTracker()
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    tokenizer = load_tokenizer(tokenizer_spec(cfg.model), cfg.model.cache_dir)
    model = build_or_load_model(cfg, tokenizer, device).eval()
    tracker.log_config(cfg)
    tasks = collect_tasks(cfg.eval, tokenizer, seed=cfg.seed)
    predictions = {}
    for task in tasks:
        with Progress(f"evaluate {task.name}", total=len(task.prompts), unit="prompt") as progress:
            predictions[task.name] = answer_prompts(
                model,
                tokenizer,
                task.prompts,
                task.max_new_tokens,
                cfg.eval.batch_size,
                autocast=lambda: autocast(device, cfg.precision),
                progress=progress,
            )
        logger.info("%s: answered %d examples", task.name, len(task.prompts))
    return write_results(cfg.stage_dir(STAGE), tasks, predictions, tracker)
