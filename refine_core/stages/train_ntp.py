"""Stage: next-token-prediction training, the baseline every REFINE result is compared with.

``train_ntp(cfg, tracker)`` trains on the shards written by ``prepare_data``: AdamW with warm-up and a constant,
cosine or linear schedule, gradient accumulation over micro-batches, gradient clipping (a step whose gradient
norm is not finite is skipped and counted), bf16 autocast on CUDA and float32 on CPU, a pad-masked loss that is
a token mean over the whole optimizer batch (so it does not depend on the micro-batch size), a held-out loss on
a schedule, and atomic checkpoints that hold everything needed to continue bit for bit on CPU.

Under ``torchrun`` each rank trains on its share of every batch (documents ``r, r + W, ...``) with the loss
normalised by the batch's global token count, so the update equals the single-process one (DDP averages the
gradients; ``session.sync`` scales by the number of ranks); see :mod:`refine_core.distributed.ddp`.

Command line::

    refine train-ntp --config configs/tiny-deltanet.yaml ntp.steps=50
    refine train-ntp --config configs/tiny-deltanet.yaml ntp.resume=true   # continue after an interruption
    torchrun --nproc_per_node=2 -m refine_core train-ntp --config configs/tiny-deltanet.yaml   # data-parallel
"""

from __future__ import annotations

import logging
import time

from refine_core.config import RunConfig
from refine_core.data.batching import left_pad
from refine_core.tracking import Tracker
from refine_core.training.losses import count_targets, ntp_targets
from refine_core.training.optim import clip_and_step
from refine_core.training.result import TrainResult
from refine_core.training.session import TrainingSession, micro_batch_loss

logger = logging.getLogger(__name__)

STAGE = "train-ntp"


def train_ntp(cfg: RunConfig, tracker: Tracker | None = None) -> TrainResult:
    """Train ``cfg.model`` with next-token prediction on ``cfg.prepared_dir``; see the module docstring."""
    ntp = cfg.ntp
    session = TrainingSession.open(cfg, STAGE, ntp, tracker, batch_size=ntp.batch_size, data_parallel=True)
    model, tokenizer, device, sync = session.model, session.tokenizer, session.device, session.sync
    pad_id = tokenizer.pad_token_id

    history: list[dict[str, float]] = []
    eval_loss = session.baseline_eval(history)

    skipped = 0
    step = session.start_step
    session.eta(step)  # starts the clock of the time-left estimate
    while step < ntp.steps:
        if ntp.stop_after is not None and step - session.start_step >= ntp.stop_after:
            logger.info("stopping after %d steps of this run (ntp.stop_after)", ntp.stop_after)
            break
        t0 = time.perf_counter()
        indices = sync.shard(session.batcher.next_indices())  # this rank's share
        docs = [session.train_set[i] for i in indices]
        padded = [
            left_pad(docs[i : i + ntp.micro_batch_size], pad_id) for i in range(0, len(docs), ntp.micro_batch_size)
        ]
        # Token mean over the whole optimizer batch: each micro-batch's summed loss is divided by the batch total
        # (summed over all ranks; only the last micro-batch of each rank all-reduces the gradients).
        n_targets = sync.total_count(
            sum(count_targets(ntp_targets(ids, mask, ntp.mask_pad_in_loss)) for ids, mask in padded)
        )
        loss_total = 0.0
        for index, (input_ids, attention_mask) in enumerate(padded):
            with sync.accumulate(last=index == len(padded) - 1):
                with session.autocast():
                    loss_sum, _ = sync.forward(
                        micro_batch_loss, model, input_ids.to(device), attention_mask.to(device), ntp.mask_pad_in_loss
                    )
                sync.scale(loss_sum / max(n_targets, 1)).backward()
            loss_total += float(loss_sum.detach())
        loss_total, n_tokens = sync.total(loss_total, sum(int(mask.sum()) for _, mask in padded))
        lr = session.scheduler.get_last_lr()[0]
        grad_norm, took = clip_and_step(model, session.optimizer, ntp.grad_clip)
        session.scheduler.step()
        skipped += not took
        step += 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "ntp/loss": loss_total / max(n_targets, 1),
            "ntp/lr": lr,
            "ntp/grad_norm": grad_norm,
            "ntp/skipped_steps": float(skipped),
            "ntp/tokens_per_s": n_tokens / elapsed,
            "ntp/step_time_s": elapsed,
        }
        session.after_step(step, metrics, history, skipped=int(not took), doc_ids=indices)
        eval_loss = metrics.get("eval/loss", eval_loss)
        if step % ntp.log_every == 0 or step == ntp.steps:
            logger.info(
                "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s%s",
                step,
                ntp.steps,
                metrics["ntp/loss"],
                lr,
                grad_norm,
                metrics["ntp/tokens_per_s"],
                (f" | eval {eval_loss:.4f}" if "eval/loss" in metrics else "") + session.eta(step),
            )

    return session.result(step, eval_loss, history)
