"""Stage: next-token-prediction training, the baseline every REFINE result is compared with.

``train_ntp(cfg, tracker)`` trains on the shards written by ``prepare_data``: AdamW with warm-up and a constant,
cosine or linear schedule, gradient accumulation over micro-batches, gradient clipping (a step whose gradient
norm is not finite is skipped and counted), bf16 autocast on CUDA and float32 on CPU, a pad-masked loss that is
a token mean over the whole optimizer batch (so it does not depend on the micro-batch size), a held-out loss on
a schedule, and atomic checkpoints that hold everything needed to continue bit for bit on CPU.

Command line::

    refine train-ntp --config configs/tiny-deltanet.yaml ntp.steps=50
    refine train-ntp --config configs/tiny-deltanet.yaml ntp.resume=true   # continue after an interruption
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refine_core.config import RunConfig, dump_yaml
from refine_core.data.batching import DocumentBatcher, iter_eval_batches, left_pad
from refine_core.data.shards import TokenizedDataset, data_fingerprint, load_manifest
from refine_core.models import FastWeightForCausalLM, save_pretrained
from refine_core.models.hub import read_state_dict
from refine_core.runtime import autocast, capture_rng_state, restore_rng_state, seed_everything, select_device
from refine_core.tokenizer import Tokenizer
from refine_core.tracking import NullTracker, Tracker
from refine_core.training.checkpoint import CheckpointManager
from refine_core.training.losses import count_targets, lm_loss_sum, ntp_targets
from refine_core.training.optim import build_optimizer, build_scheduler
from refine_core.training.setup import build_or_load_model, prepared_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training stage hands to the next one."""

    model_dir: Path  # final model in HF layout (config.json + model.safetensors + tokenizer)
    steps: int
    final_eval_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def micro_batch_loss(
    model: FastWeightForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_pad: bool,
) -> tuple[torch.Tensor, int]:
    """Summed NTP loss of one micro-batch and its number of counted targets."""
    out = model(input_ids, attention_mask=attention_mask, return_logits=False)
    labels = ntp_targets(input_ids, attention_mask, mask_pad=mask_pad)
    loss_sum = lm_loss_sum(out.hidden_states[:, :-1], model.lm_head.weight, labels)
    return loss_sum, count_targets(labels)


@torch.no_grad()
def evaluate_loss(
    model: FastWeightForCausalLM,
    dataset: TokenizedDataset,
    tokenizer: Tokenizer,
    cfg: RunConfig,
    device: torch.device,
) -> float | None:
    """Token-mean NTP loss over up to ``ntp.eval_max_docs`` held-out documents (pads never count)."""
    if len(dataset) == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in iter_eval_batches(dataset, cfg.ntp.micro_batch_size, tokenizer.pad_token_id, cfg.ntp.eval_max_docs):
        with autocast(device, cfg.precision):
            loss_sum, n = micro_batch_loss(
                model, batch.input_ids.to(device), batch.attention_mask.to(device), mask_pad=True
            )
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float
) -> tuple[float, bool]:
    """Clip, then step unless the gradient norm is not finite. Returns (grad norm, whether the step was taken)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    took = math.isfinite(grad_norm)
    if took:
        optimizer.step()
    else:
        logger.warning("gradient norm is %s: skipping this optimizer step", grad_norm)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, took


def train_ntp(cfg: RunConfig, tracker: Tracker | None = None) -> TrainResult:
    """Train ``cfg.model`` with next-token prediction on ``cfg.prepared_dir``; see the module docstring."""
    tracker = tracker or NullTracker()
    ntp = cfg.ntp
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, output_dir / "train-ntp.config.yaml")

    tokenizer = prepared_tokenizer(cfg)
    manifest = load_manifest(cfg.prepared_dir)
    train_set = TokenizedDataset(cfg.prepared_dir, "train", expected_fingerprint=tokenizer.fingerprint())
    eval_set = TokenizedDataset(cfg.prepared_dir, "eval", expected_fingerprint=tokenizer.fingerprint())
    model = build_or_load_model(cfg, tokenizer, device).train()
    optimizer = build_optimizer(model, ntp)
    scheduler = build_scheduler(optimizer, ntp)
    batcher = DocumentBatcher(train_set, ntp.batch_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id)
    checkpoints = CheckpointManager(cfg.checkpoint_dir, keep=ntp.keep_checkpoints)

    start_step = 0
    latest = checkpoints.latest() if ntp.resume else None
    if latest is not None:
        state = checkpoints.load_trainer_state(latest)
        model.load_state_dict(read_state_dict(latest))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batcher.load_state_dict(state["batcher"])
        restore_rng_state(state["rng"])
        start_step = int(state["step"])
        logger.info("resumed from %s at step %d", latest, start_step)
    elif ntp.resume:
        logger.info("ntp.resume is set but %s has no complete checkpoint: starting from step 0", cfg.checkpoint_dir)

    tracker.log_config(cfg)
    tracker.set_tags({"refine.data_fingerprint": data_fingerprint(manifest), "refine.resumed_from": str(latest)})
    tracker.log_params({"model.num_parameters": model.num_parameters(), "data.train_docs": len(train_set)})

    def save(step: int) -> Path:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "batcher": batcher.state_dict(),
            "rng": capture_rng_state(),
        }
        path = checkpoints.save(step, lambda d: save_pretrained(model, d, tokenizer=tokenizer), state)
        if cfg.tracking.log_checkpoints:
            tracker.log_artifacts(path, artifact_path=f"checkpoints/{path.name}")
        return path

    history: list[dict[str, float]] = []
    eval_loss: float | None = None
    if start_step == 0 and ntp.eval_every:
        # The untrained model's held-out loss: the reference point for "the loss falls".
        eval_loss = evaluate_loss(model, eval_set, tokenizer, cfg, device)
        if eval_loss is not None:
            tracker.log_metrics({"eval/loss": eval_loss}, step=0)
            history.append({"step": 0.0, "eval/loss": eval_loss})
            logger.info("step 0/%d | eval %.4f", ntp.steps, eval_loss)
    skipped = 0
    steps_this_run = 0
    step = start_step
    while step < ntp.steps:
        if ntp.stop_after is not None and steps_this_run >= ntp.stop_after:
            logger.info("stopping after %d steps of this run (ntp.stop_after)", steps_this_run)
            break
        t0 = time.perf_counter()
        indices = batcher.next_indices()
        docs = [train_set[i] for i in indices]
        micro = [docs[i : i + ntp.micro_batch_size] for i in range(0, len(docs), ntp.micro_batch_size)]
        padded = [left_pad(m, tokenizer.pad_token_id) for m in micro]
        # Token mean over the whole optimizer batch: each micro-batch's summed loss is divided by the batch total.
        n_targets = sum(count_targets(ntp_targets(ids, mask, ntp.mask_pad_in_loss)) for ids, mask in padded)
        loss_total = 0.0
        for input_ids, attention_mask in padded:
            with autocast(device, cfg.precision):
                loss_sum, _ = micro_batch_loss(
                    model, input_ids.to(device), attention_mask.to(device), ntp.mask_pad_in_loss
                )
            (loss_sum / max(n_targets, 1)).backward()
            loss_total += float(loss_sum.detach())
        lr = scheduler.get_last_lr()[0]
        grad_norm, took = optimizer_step(model, optimizer, scheduler, ntp.grad_clip)
        skipped += not took
        step += 1
        steps_this_run += 1
        elapsed = time.perf_counter() - t0
        tokens = int(sum(int(mask.sum()) for _, mask in padded))
        metrics = {
            "ntp/loss": loss_total / max(n_targets, 1),
            "ntp/lr": lr,
            "ntp/grad_norm": grad_norm,
            "ntp/skipped_steps": float(skipped),
            "ntp/tokens_per_s": tokens / elapsed,
            "ntp/step_time_s": elapsed,
        }
        if (ntp.eval_every and step % ntp.eval_every == 0) or step == ntp.steps:
            eval_loss = evaluate_loss(model, eval_set, tokenizer, cfg, device)
            if eval_loss is not None:
                metrics["eval/loss"] = eval_loss
        history.append({"step": float(step), **metrics})
        tracker.log_metrics(metrics, step=step)
        if step % ntp.log_every == 0 or step == ntp.steps:
            logger.info(
                "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s%s",
                step,
                ntp.steps,
                metrics["ntp/loss"],
                lr,
                grad_norm,
                metrics["ntp/tokens_per_s"],
                f" | eval {eval_loss:.4f}" if "eval/loss" in metrics else "",
            )
        if ntp.save_every and step % ntp.save_every == 0 and step < ntp.steps:
            save(step)

    final_dir = output_dir / "model"
    if step >= ntp.steps:
        save(step)
        save_pretrained(model, final_dir, tokenizer=tokenizer)
        tracker.log_artifacts(final_dir, artifact_path="model")
    else:
        save(step)  # interrupted on purpose (stop_after): leave a checkpoint to resume from
    return TrainResult(model_dir=final_dir, steps=step, final_eval_loss=eval_loss, history=history)
