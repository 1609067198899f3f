"""Stage: test-time training (spec §4) — adapt on each batch of test prompts, then answer that batch.

For every task of ``cfg.eval`` (one run per task, each starting from the loaded weights), the test prompts are
taken in file order in batches of ``ttt.batch_size``. On each batch, the REFINE inner step (``ttt.method=refine``;
settings from the ``refine`` section) or an NTP-only step (``ttt.method=ntp``, the "SFT" TTT baseline: one
optimizer step per batch) runs on the prompts themselves — no answers are used — and then the batch is answered
greedily with the adapted weights.

``ttt.mode=cumulative`` carries weights and optimizer state from batch to batch, as the official code does (its
results depend on the file order, spec §10.1); ``ttt.mode=reset`` restores both before every batch.

Command line::

    refine ttt --config configs/tiny-eval.yaml model.source=... ttt.method=refine ttt.mode=reset
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging

import torch

from refine_core.config import RunConfig
from refine_core.evaluation.answering import answer_prompts
from refine_core.evaluation.runner import EvalResult, collect_tasks, write_results
from refine_core.progress import Progress
from refine_core.runtime import autocast, seed_everything, select_device
from refine_core.stages.prepare_data import tokenizer_spec
from refine_core.tokenizer import load_tokenizer
from refine_core.tracking import NullTracker, Tracker
from refine_core.training.optim import build_optimizer
from refine_core.training.refine_step import refine_step
from refine_core.training.setup import build_or_load_model

logger = logging.getLogger(__name__)

STAGE = "ttt"


def stable_id(example_id: str) -> int:
    """A 31-bit integer naming an example, independent of where it sits in its file."""
    return int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def test_time_train(cfg: RunConfig, tracker: Tracker | None = None) -> EvalResult:
    """Adapt-then-answer over every task of ``cfg.eval``; see the module docstring."""
    tracker = tracker or NullTracker()
    ttt = cfg.ttt
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    tokenizer = load_tokenizer(tokenizer_spec(cfg.model), cfg.model.cache_dir)
    model = build_or_load_model(cfg, tokenizer, device).train()
    initial = copy.deepcopy(model.state_dict())
    tracker.log_config(cfg)
    tasks = collect_tasks(cfg.eval, tokenizer, seed=cfg.seed)

    def amp():
        return autocast(device, cfg.precision)

    predictions: dict[str, list[str]] = {}
    adapt_metrics: dict[str, float] = {}
    optimizer_steps = 0
    for task in tasks:
        model.load_state_dict(initial)  # every task is its own TTT run, from the same weights
        optimizer = build_optimizer(model, cfg.refine)
        inner = dataclasses.replace(
            cfg.refine,
            nsp_update=ttt.method == "refine",
            # The NTP-only TTT baseline takes one optimizer step per batch (spec §4).
            baseline_schedule="official",
            batch_size=ttt.batch_size,
            mini_batch_size=min(cfg.refine.mini_batch_size, ttt.batch_size),
            micro_batch_size=min(cfg.refine.micro_batch_size, cfg.refine.mini_batch_size, ttt.batch_size),
        )
        answers: list[str] = []
        n = len(task.prompts)
        stop = n - n % ttt.batch_size if ttt.drop_last else n
        progress = Progress(f"ttt {task.name}", total=stop, unit="prompt")
        for batch_index, lo in enumerate(range(0, stop, ttt.batch_size)):
            prompts = task.prompts[lo : lo + ttt.batch_size]
            saved = None
            if ttt.mode == "reset":
                saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
            if ttt.method != "none":
                metrics = refine_step(
                    model,
                    optimizer,
                    [torch.tensor(p) for p in prompts],
                    list(range(lo, lo + len(prompts))),
                    inner,
                    seed=cfg.seed,
                    step=batch_index,
                    pad_id=tokenizer.pad_token_id,
                    eos_id=tokenizer.eos_token_id,
                    autocast=amp,
                )
                optimizer_steps += int(metrics["refine/optimizer_steps"])
                for key in ("refine/ntp_loss", "refine/reward_mean"):
                    if key in metrics:
                        adapt_metrics[f"ttt/{task.name}/{key.split('/')[-1]}"] = metrics[key]
            answers.extend(answer_prompts(model, tokenizer, prompts, task.max_new_tokens, len(prompts), autocast=amp,
                                          progress=progress))
            if saved is not None:
                model.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
        progress.close()
        if stop < n:
            logger.info("%s: dropped the last %d examples (ttt.drop_last, spec §10.13)", task.name, n - stop)
            task.examples, task.prompts = task.examples[:stop], task.prompts[:stop]
        predictions[task.name] = answers
        logger.info("%s: adapted and answered %d examples", task.name, len(answers))
    adapt_metrics["ttt/optimizer_steps"] = float(optimizer_steps)
    return write_results(cfg.stage_dir(STAGE), tasks, predictions, tracker, extra_metrics=adapt_metrics)
