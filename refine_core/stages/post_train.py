"""Stage: post-training on a long-context task (spec §3-4) — task SFT, Nested SFT or Nested REFINE.

For each batch of task prompts (``prompt`` / ``answer`` columns, RULER QA layout):

(a) the inner update on the prompt tokens only: nothing (``sft``), one NTP step over the batch (``nested_sft``), or
    the REFINE inner step with its mini-batch optimizer steps (``nested_refine``, reward from ``refine.reward``,
    ``hybrid`` in the paper);
(b) one task-SFT step: cross-entropy on the first gold answer given the prompt, with EOS appended unless
    ``post.append_eos=false`` reproduces the official target (spec §10.15).

Both use one AdamW (the ``refine`` section's optimiser fields); the scheduler steps once per batch.

Command line::

    refine post-train --config configs/tiny-posttrain.yaml post.mode=nested_refine
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

from refine_core.config import RunConfig
from refine_core.data.batching import left_pad
from refine_core.data.tasks import expand_task_files, read_task_file
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


def sft_step(
    session: TrainingSession, samples: Sequence[TaskSample], micro_batch_size: int, coef: float
) -> tuple[float, bool]:
    """One optimizer step of answer cross-entropy over ``samples`` (token mean over the whole batch)."""
    model, pad_id = session.model, session.tokenizer.pad_token_id
    parts = [sft_batch(samples[i : i + micro_batch_size], pad_id) for i in range(0, len(samples), micro_batch_size)]
    total = sum(count_targets(labels) for _, _, labels in parts)
    loss_sum = 0.0
    for ids, mask, labels in parts:
        with session.autocast():
            hidden = model(ids.to(model.device), attention_mask=mask.to(model.device), return_logits=False)
            part = lm_loss_sum(hidden.hidden_states[:, :-1], model.lm_head.weight, labels.to(model.device))
        (coef * part / total).backward()
        loss_sum += float(part.detach())
    _, took = clip_and_step(model, session.optimizer, session.cfg.refine.grad_clip)
    return loss_sum / total, took


def post_train(cfg: RunConfig, tracker: Tracker | None = None) -> TrainResult:
    """Post-train ``cfg.model`` on ``cfg.post.train_files``; see the module docstring."""
    post = cfg.post
    if not post.train_files:
        raise ValueError("post.train_files is empty: name the task parquet files to train on (RULER QA layout)")
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
    )
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
        indices = session.batcher.next_indices()
        batch = [samples[i] for i in indices]
        metrics: dict[str, float] = {}
        if post.mode != "sft":
            metrics.update(
                refine_step(
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
                )
            )
        metrics["post/sft_loss"], took = sft_step(session, batch, post.micro_batch_size, post.sft_loss_coef)
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
