"""Stage: test-time training (spec §4) — adapt on each batch of test prompts, then answer that batch.

For every task of ``cfg.eval`` (one run per task, each starting from the loaded weights), the test prompts are
taken in file order in batches of ``ttt.batch_size``. On each batch, the REFINE inner step (``ttt.method=refine``;
settings from the ``refine`` section) or an NTP-only step (``ttt.method=ntp``, the "SFT" TTT baseline: one
optimizer step per batch) runs on the prompts themselves — no answers are used — and then the batch is answered
greedily with the adapted weights.

``ttt.mode=cumulative`` carries weights and optimizer state from batch to batch, as the official code does (its
results depend on the file order, spec §10.1); ``ttt.mode=reset`` restores both before every batch.

Under ``torchrun --nproc_per_node N`` (``N`` > 1):

* ``ttt.mode=reset`` (and ``ttt.method=none``, plain evaluation, in either mode) shards the test prompts: rank ``r``
  adapts-then-answers batches ``r, r + N, ...`` of every task, each from the loaded weights and a fresh optimizer
  state, as one process does; no gradient is exchanged. A batch's sampling is seeded by ``(seed, batch index,
  prompt position)`` only (counter-based, :mod:`refine_core.algorithm.rollout`), never by the rank or by what ran
  before on that rank, so every batch draws what it draws in one process. Rank 0 gathers the answers, puts them
  back in file order and writes the predictions, summary and metrics exactly as one process does (the same
  predictions files, bit for bit on CPU).
* ``ttt.mode=cumulative`` with an adapting method runs on rank 0 alone: every batch starts from the weights the
  batches before it left, in file order, so the batches cannot run side by side and the result would change if
  they were split. Rank 0 logs a warning saying so and runs as one process; the other ranks log it too and exit at
  once (status 0), without joining a process group, so nothing waits on a collective while rank 0 works. Use
  ``ttt.mode=reset`` to use all ranks.
* ``parallel=fsdp`` is refused: every rank adapts its own batches on a whole copy of the model; there is nothing
  to shard a model over.

Command line::

    refine ttt --config configs/delta_net-1.3b-ttt-longbench.yaml ttt.method=refine ttt.mode=reset
    torchrun --nproc_per_node=4 -m refine_core ttt --config configs/delta_net-1.3b-ttt-longbench.yaml ttt.mode=reset
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from refine_core.config import ConfigError, RunConfig, TTTConfig
from refine_core.distributed.ddp import DistributedContext, env_world_size, get_rank, init_distributed
from refine_core.distributed.split_work import (
    broadcast_from_main,
    gather_to_main,
    node_leader_first,
    strided_share,
)
from refine_core.evaluation.answering import answer_prompts
from refine_core.evaluation.runner import EvalResult, EvalTask, collect_tasks, write_results
from refine_core.progress import Progress
from refine_core.runtime import autocast, seed_everything, select_device
from refine_core.stages.prepare_data import tokenizer_spec
from refine_core.tokenizer import Tokenizer, load_tokenizer
from refine_core.tracking import NullTracker, Tracker
from refine_core.training.optim import build_optimizer
from refine_core.training.refine_step import refine_step
from refine_core.training.setup import build_or_load_model

logger = logging.getLogger(__name__)

STAGE = "ttt"


def stable_id(example_id: str) -> int:
    """A 31-bit integer naming an example, independent of where it sits in its file."""
    return int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def order_dependent(ttt: TTTConfig) -> bool:
    """Whether a batch's answers depend on the batches before it: ``cumulative`` mode carries the adapted weights and
    optimizer state from batch to batch in file order (spec §10.1); ``reset`` mode and ``method=none`` do not."""
    return ttt.mode == "cumulative" and ttt.method != "none"


@dataclass
class BatchOutcome:
    """What one batch of test prompts produced (sent to rank 0 under torchrun)."""

    answers: list[str]
    metrics: dict[str, float] = field(default_factory=dict)  # the inner step's losses / rewards of this batch
    optimizer_steps: int = 0


def _plan(cfg: RunConfig) -> tuple[DistributedContext | None, bool]:
    """The process group to join (``None``: run as one process) and whether this rank takes part at all."""
    world = env_world_size()
    if world == 1:
        return None, True
    if cfg.parallel == "fsdp":
        raise ConfigError(
            "ttt does not support parallel=fsdp: every rank adapts its own batches of prompts on a whole copy of "
            "the model, so there is no model to shard. Use parallel=ddp (the default) with ttt.mode=reset to "
            "spread the prompts over the ranks."
        )
    if order_dependent(cfg.ttt):
        logger.warning(
            "ttt.mode=cumulative: every batch adapts the weights the batches before it left, in file order (spec "
            "§10.1), so its batches cannot be split over the %d ranks of this job; rank 0 runs them all alone and "
            "the other ranks exit now. Use ttt.mode=reset to shard the prompts over all ranks.",
            world,
        )
        return None, get_rank() == 0
    return init_distributed(cfg.device), True


def test_time_train(cfg: RunConfig, tracker: Tracker | None = None) -> EvalResult:
    """Adapt-then-answer over every task of ``cfg.eval``; see the module docstring.

    Returns the results on every rank (rank 0 wrote them), except on the idle ranks of a ``cumulative`` run under
    torchrun, which return an empty result at once (rank 0 writes the results).
    """
    tracker = tracker or NullTracker()
    ttt = cfg.ttt
    ctx, takes_part = _plan(cfg)
    if not takes_part:
        return EvalResult(summary={}, table="", output_dir=cfg.stage_dir(STAGE))
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    seed_everything(cfg.seed)
    device = ctx.device if ctx is not None else select_device(cfg.device)
    with node_leader_first(ctx):  # a remote model / tokenizer is downloaded once per node, into the shared cache
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
        n = len(task.prompts)
        stop = n - n % ttt.batch_size if ttt.drop_last else n
        batches = list(enumerate(range(0, stop, ttt.batch_size)))  # (batch index, first prompt)
        mine = strided_share(batches, rank, world)
        if world > 1:
            logger.info("%s: %d batches of prompts shared by %d ranks (rank r takes batches r, r + %d, ...)",
                        task.name, len(batches), world, world)
        label = f"ttt {task.name}" + (f" (rank {rank}: {len(mine)}/{len(batches)} batches)" if world > 1 else "")
        progress = Progress(label, total=sum(len(task.prompts[lo : lo + ttt.batch_size]) for _, lo in mine),
                            unit="prompt")
        outcomes = {
            batch_index: _adapt_and_answer(cfg, model, optimizer, tokenizer, task, batch_index, lo, amp, progress)
            for batch_index, lo in mine
        }
        progress.close()
        gathered = gather_to_main(outcomes)  # rank 0: every rank's batches; the others: None
        if stop < n:
            logger.info("%s: dropped the last %d examples (ttt.drop_last, spec §10.13)", task.name, n - stop)
            task.examples, task.prompts = task.examples[:stop], task.prompts[:stop]
        if gathered is None:
            continue
        merged = {index: outcome for part in gathered for index, outcome in part.items()}
        ordered = [merged[index] for index in sorted(merged)]  # file order
        predictions[task.name] = [answer for outcome in ordered for answer in outcome.answers]
        for outcome in ordered:  # as one process: the last batch's values are the task's
            adapt_metrics.update({f"ttt/{task.name}/{key.split('/')[-1]}": v for key, v in outcome.metrics.items()})
            optimizer_steps += outcome.optimizer_steps
        logger.info("%s: adapted and answered %d examples", task.name, len(predictions[task.name]))
    adapt_metrics["ttt/optimizer_steps"] = float(optimizer_steps)
    result = None
    if rank == 0:
        result = write_results(cfg.stage_dir(STAGE), tasks, predictions, tracker, extra_metrics=adapt_metrics)
    return broadcast_from_main(result)  # no rank returns before the results are written


def _adapt_and_answer(
    cfg: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Tokenizer,
    task: EvalTask,
    batch_index: int,
    lo: int,
    amp: Callable[[], AbstractContextManager[None]],
    progress: Progress,
) -> BatchOutcome:
    """Adapt on the batch of prompts starting at ``lo`` (unless ``ttt.method=none``), then answer it greedily; in
    ``reset`` mode the weights and optimizer state are restored afterwards."""
    ttt = cfg.ttt
    prompts = task.prompts[lo : lo + ttt.batch_size]
    saved = None
    if ttt.mode == "reset":
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    outcome = BatchOutcome(answers=[])
    if ttt.method != "none":
        inner = dataclasses.replace(
            cfg.refine,
            nsp_update=ttt.method == "refine",
            # The NTP-only TTT baseline takes one optimizer step per batch (spec §4).
            baseline_schedule="official",
            batch_size=ttt.batch_size,
            mini_batch_size=min(cfg.refine.mini_batch_size, ttt.batch_size),
            micro_batch_size=min(cfg.refine.micro_batch_size, cfg.refine.mini_batch_size, ttt.batch_size),
        )
        # Seeded by (seed, batch index, prompt position): the same draws whichever rank runs the batch.
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
        outcome.optimizer_steps = int(metrics["refine/optimizer_steps"])
        outcome.metrics = {key: metrics[key] for key in ("refine/ntp_loss", "refine/reward_mean") if key in metrics}
    outcome.answers = answer_prompts(model, tokenizer, prompts, task.max_new_tokens, len(prompts), autocast=amp,
                                     progress=progress)
    if saved is not None:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
    return outcome
