"""Stage: post-training on a long-context task (spec §3-4) — task SFT, Nested SFT or Nested REFINE.

For each batch of task prompts (``prompt`` / ``answer`` columns, RULER QA layout):

(a) the inner update on the prompt tokens only: nothing (``sft``), one NTP step over the batch (``nested_sft``), or
    the REFINE inner step with its mini-batch optimizer steps (``nested_refine``, reward from ``refine.reward``,
    ``hybrid`` in the paper);
(b) one task-SFT step: cross-entropy on the first gold answer given the prompt, with EOS appended unless
    ``post.append_eos=false`` reproduces the official target (spec §10.15).

Both use one AdamW (the ``refine`` section's optimiser fields); the scheduler steps once per batch.

Under ``torchrun`` documents (task examples) are the unit of data parallelism: rank ``r`` of ``W`` takes examples
``r, r + W, ...`` of every batch, runs the inner step on them through ``refine_step(..., sync=...)`` (which sums
the token counts of each mini-batch over ranks) and the SFT step with its token mean over the *global* batch, the
gradients all-reduced once per optimizer step; so the losses and the update do not depend on ``W`` (up to float
rounding). Rank 0 logs the global means and writes the checkpoints, which resume on any number of ranks.

* ``post.mode=sft`` accepts uneven splits (``post.batch_size=6`` on 4 ranks, or fewer examples per batch than
  ranks): every rank runs as many micro-batch passes as the largest share needs, the missing ones on a stand-in
  example with weight 0, so that each rank joins the one gradient all-reduce (DDP) or every all-gather and
  reduce-scatter (FSDP) of the step. It also runs under ``parallel: fsdp``.
* The nested modes need ``post.batch_size`` and their inner mini-batch (``min(refine.mini_batch_size,
  post.batch_size)``) to be multiples of ``W``: the inner step splits every mini-batch evenly over the ranks. They
  run under ``parallel: fsdp`` as train-refine does (:mod:`refine_core.distributed.fsdp`).

Command line::

    refine post-train --config configs/delta_net-1.3b-post-train.yaml post.mode=nested_refine
    torchrun --nproc_per_node=4 -m refine_core post-train --config configs/delta_net-1.3b-post-train.yaml
    torchrun --nproc_per_node=4 -m refine_core post-train --config configs/delta_net-1.3b-post-train.yaml \
        post.resume=true   # continue from the newest checkpoint, with any number of processes
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refine_core.config import ConfigError, RunConfig
from refine_core.data.batching import left_pad
from refine_core.data.tasks import expand_task_files, read_task_file
from refine_core.distributed.ddp import env_world_size, init_distributed, is_distributed_launch
from refine_core.distributed.split_work import largest_share, node_leader_first, strided_share
from refine_core.stages.prepare_data import tokenizer_spec
from refine_core.tokenizer import Tokenizer, load_tokenizer
from refine_core.tracking import Tracker
from refine_core.training.losses import IGNORE_INDEX, count_targets, lm_loss_sum
from refine_core.training.optim import clip_and_step
from refine_core.training.refine_step import refine_step
from refine_core.training.result import TrainResult
from refine_core.training.session import TrainingSession

logger = logging.getLogger(__name__)


@dataclass
class TaskSample:
    """One encoded training example: the prompt (inner step input) and the SFT target."""

    prompt: torch.Tensor  # [P] prompt ids, first max_prompt_tokens kept
    answer: torch.Tensor  # [A] first gold answer (+ EOS), at most max_answer_tokens (+ 1)


def encode_task_samples(
    files: Sequence[Path],
    tokenizer: Tokenizer,
    max_prompt_tokens: int,
    max_answer_tokens: int,
    append_eos: bool,
    max_examples: int | None = None,
) -> list[TaskSample]:
    samples, truncated = [], 0
    for path in files:
        for example in read_task_file(path):
            prompt = tokenizer.encode(example.prompt)
            truncated += len(prompt) > max_prompt_tokens
            # spec §2.2: the SFT target is the first gold answer, at most 32 tokens.
            answer = tokenizer.encode(example.answers[0])[:max_answer_tokens]
            if append_eos:
                answer = [*answer, tokenizer.eos_token_id]
            samples.append(TaskSample(torch.tensor(prompt[:max_prompt_tokens]), torch.tensor(answer)))
            if max_examples is not None and len(samples) >= max_examples:
                break
    if truncated:
        logger.warning(
            "%d prompts were longer than post.max_prompt_tokens=%d and kept their beginning (spec §10.14)",
            truncated,
            max_prompt_tokens,
        )
    if not samples:
        raise ValueError(f"no training examples in {[str(f) for f in files]}")
    return samples


def sft_batch(samples: Sequence[TaskSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``[prompt ; answer]`` rows and labels that count only the answer tokens."""
    seqs = [torch.cat([s.prompt, s.answer]).tolist() for s in samples]
    ids, mask = left_pad(seqs, pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, s in enumerate(samples):
        labels[row, ids.shape[1] - s.answer.numel() :] = s.answer
    return ids, mask, labels[:, 1:]


def _answer_loss_sum(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed answer cross-entropy of one micro-batch (the forward that ``sync.forward`` wraps)."""
    hidden = model(ids, attention_mask=mask, return_logits=False)
    return lm_loss_sum(hidden.hidden_states[:, :-1], model.lm_head.weight, labels)


def sft_step(
    session: TrainingSession,
    samples: Sequence[TaskSample],
    micro_batch_size: int,
    coef: float,
    *,
    passes: int = 0,
    filler: TaskSample | None = None,
) -> tuple[float, bool]:
    """One optimizer step of answer cross-entropy: the token mean over the whole (global) batch.

    ``samples``: this rank's share of the batch (all of it in one process; possibly empty under torchrun). Each
    micro-batch's summed loss is divided by the batch's answer-token count summed over ranks, and the gradients
    are all-reduced once, on the last pass (``session.sync``, as the NTP loop does).

    ``passes``: how many micro-batch forward/backward passes every rank makes (the largest share's count under
    torchrun); a rank with fewer micro-batches makes the rest on ``filler`` with loss weight 0, so that every rank
    takes part in each collective of the step (DDP's one all-reduce; FSDP's all-gathers and reduce-scatters).
    """
    model, pad_id, sync = session.model, session.tokenizer.pad_token_id, session.sync
    parts = [sft_batch(samples[i : i + micro_batch_size], pad_id) for i in range(0, len(samples), micro_batch_size)]
    total = sync.total_count(sum(count_targets(labels) for _, _, labels in parts))
    n_passes = max(len(parts), passes, 1)
    if len(parts) < n_passes and filler is None:
        raise ValueError("sft_step: a rank with fewer micro-batches than the others needs a filler example")
    loss_sum = 0.0
    for index in range(n_passes):
        real = index < len(parts)
        ids, mask, labels = parts[index] if real else sft_batch([filler], pad_id)
        with sync.accumulate(last=index == n_passes - 1):
            with session.autocast():
                part = sync.forward(
                    _answer_loss_sum, model, ids.to(model.device), mask.to(model.device), labels.to(model.device)
                )
            # A stand-in pass adds exact zeros to the gradients (its loss weight is 0; its example is one of
            # this batch's, so its loss is finite whenever the step's is).
            sync.scale(coef * part / total if real else part * 0.0).backward()
        if real:
            loss_sum += float(part.detach())
    (loss_sum,) = sync.total(loss_sum)
    _, took = clip_and_step(model, session.optimizer, session.cfg.refine.grad_clip)
    return loss_sum / total, took


def check_data_parallel(cfg: RunConfig, world_size: int) -> None:
    """Refuse, before anything is built, what post-training cannot do on ``world_size`` ranks (module docstring)."""
    post = cfg.post
    if world_size == 1 or post.mode == "sft":
        return  # task SFT takes any split, DDP or FSDP
    mini = min(cfg.refine.mini_batch_size, post.batch_size)
    if post.batch_size % world_size or mini % world_size:
        raise ConfigError(
            f"post.mode={post.mode} on {world_size} ranks needs post.batch_size={post.batch_size} and the inner "
            f"mini-batch (min(refine.mini_batch_size, post.batch_size) = {mini}) to be multiples of {world_size}: the "
            "inner step splits every mini-batch of documents evenly over the ranks. Pick both as multiples of "
            "nproc_per_node x nodes, or use post.mode=sft, which takes uneven splits."
        )


def post_train(cfg: RunConfig, tracker: Tracker | None = None) -> TrainResult:
    """Post-train ``cfg.model`` on ``cfg.post.train_files``; see the module docstring."""
    post = cfg.post
    if not post.train_files:
        raise ValueError("post.train_files is empty: name the task parquet files to train on (RULER QA layout)")
    check_data_parallel(cfg, env_world_size())
    ctx = init_distributed(cfg.device) if is_distributed_launch() else None  # the session joins the same group
    with node_leader_first(ctx):  # a remote tokenizer is downloaded once per node, into the shared cache
        tokenizer = load_tokenizer(tokenizer_spec(cfg.model), cfg.model.cache_dir)
    files = expand_task_files(post.train_files)
    samples = encode_task_samples(
        files, tokenizer, post.max_prompt_tokens, post.max_answer_tokens, post.append_eos, post.max_examples
    )
    tag = hashlib.sha256("".join(f"{f}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:16]
    # One AdamW for the inner and the outer update, with the ``refine`` section's settings (spec §3).
    optim = dataclasses.replace(cfg.refine, steps=post.steps, warmup_steps=min(cfg.refine.warmup_steps, post.steps))
    session = TrainingSession.open(
        cfg,
        f"post-train-{post.mode}",
        post,
        tracker,
        post.batch_size,
        optim=optim,
        tokenizer=tokenizer,
        train_set=samples,
        data_tag=tag,
        data_parallel=True,
        even_batches=post.mode != "sft",  # the nested modes' inner step needs even shares (check_data_parallel)
    )
    sync = session.sync
    inner = dataclasses.replace(
        cfg.refine,
        batch_size=post.batch_size,
        micro_batch_size=min(cfg.refine.micro_batch_size, post.batch_size),
        mini_batch_size=min(cfg.refine.mini_batch_size, post.batch_size),
        # Nested SFT: NTP on the prompts with one optimizer step over the batch (spec §4).
        nsp_update=post.mode == "nested_refine",
        baseline_schedule="official",
    )
    history: list[dict[str, float]] = []
    step = session.start_step
    while step < post.steps:
        if post.stop_after is not None and step - session.start_step >= post.stop_after:
            break
        t0 = time.perf_counter()
        batch_indices = session.batcher.next_indices()
        # This rank's examples: an even share for the nested modes (checked above), any share for task SFT.
        if post.mode == "sft":
            indices = strided_share(batch_indices, sync.rank, sync.world_size)
        else:
            indices = sync.shard(batch_indices, what="post.batch_size")
        batch = [samples[i] for i in indices]
        metrics: dict[str, float] = {}
        if post.mode != "sft":
            inner_metrics = refine_step(
                session.model,
                session.optimizer,
                [s.prompt for s in batch],
                indices,
                inner,
                seed=cfg.seed,
                step=step,
                pad_id=tokenizer.pad_token_id,
                eos_id=tokenizer.eos_token_id,
                autocast=session.autocast,
                sync=sync,
            )
            if sync.distributed:  # the mean over ranks (token-mean losses are already global inside refine_step)
                summed = sync.total(*inner_metrics.values())
                inner_metrics = {k: v / sync.world_size for k, v in zip(inner_metrics, summed, strict=True)}
            metrics.update(inner_metrics)
        passes = -(-largest_share(len(batch_indices), sync.world_size) // post.micro_batch_size)
        metrics["post/sft_loss"], took = sft_step(
            session, batch, post.micro_batch_size, post.sft_loss_coef, passes=passes,
            filler=samples[batch_indices[0]],
        )
        session.scheduler.step()
        step += 1
        metrics["post/step_time_s"] = time.perf_counter() - t0
        session.after_step(
            step, metrics, history, skipped=round(metrics.get("refine/skipped_steps", 0)) + (not took),
            optimizer_steps=round(metrics.get("refine/optimizer_steps", 0)) + 1, doc_ids=indices,
        )
        if step % post.log_every == 0 or step == post.steps:
            logger.info(
                "post-train %s step %d/%d | sft %.4f%s",
                post.mode,
                step,
                post.steps,
                metrics["post/sft_loss"],
                f" | reward {metrics['refine/reward_mean']:.3f}" if "refine/reward_mean" in metrics else "",
            )
    return session.result(step, None, history)
