"""Stage: REFINE mid-training on long documents (spec §2-3), and its NTP-only baseline on the same data.

``train_refine(cfg, tracker)`` loads (or builds) the model, then for every step takes ``refine.batch_size``
documents and runs the REFINE inner step (:func:`refine_core.training.refine_step.refine_step`): entropy-based
positions, rollouts from the prefixes, rewards against the true continuation, GRPO advantages, and one AdamW step
per mini-batch on ``c_ntp · NTP + c_nsp · PPO``. The learning-rate scheduler steps once per REFINE step (spec
§2 step 6.4). With ``refine.nsp_update=false`` the same loop trains the NTP-only baseline on the same documents.

Sampling is seeded per (seed, step, document), so a resumed run follows the uninterrupted trajectory exactly, and
under ``torchrun`` (each rank takes documents ``r, r + W, ...`` of the batch, :mod:`refine_core.distributed.ddp`)
a document draws the same positions and rollouts on whichever rank it lands. Logged metrics are averaged over ranks.
``parallel: fsdp`` shards the model with FSDP2 instead of replicating it (:mod:`refine_core.distributed.fsdp`).

Command line::

    refine prepare-data --config configs/tiny-refine.yaml
    refine train-refine --config configs/tiny-refine.yaml
    refine train-refine --config configs/tiny-refine.yaml refine.nsp_update=false   # the NTP-only baseline
    torchrun --nproc_per_node=2 -m refine_core train-refine --config configs/tiny-refine.yaml parallel=fsdp
"""

from __future__ import annotations

import logging
import time

from refine_core.config import ConfigError, RunConfig
from refine_core.data.shards import load_manifest
from refine_core.tracking import Tracker
from refine_core.training.refine_step import refine_step
from refine_core.training.result import TrainResult
from refine_core.training.session import TrainingSession

logger = logging.getLogger(__name__)

STAGE = "train-refine"


def check_document_lengths(cfg: RunConfig) -> None:
    """Refuse settings the shortest training document cannot satisfy (spec §2 step 1: one position per chunk,
    ``margin`` tokens kept on both sides), from the prepared data's manifest, before anything is built."""
    if not cfg.refine.nsp_update or (cfg.data.prepared_dir or "").startswith("s3://"):
        return  # NTP only, or the data is downloaded later (the step checks each batch then)
    try:
        shortest = int(load_manifest(cfg.prepared_dir)["splits"]["train"]["token_lengths"]["min"])
    except (OSError, KeyError, ValueError):
        return  # no manifest yet: the session's own checks name what is missing
    rcfg = cfg.refine
    if shortest < rcfg.num_chunks or shortest < 2 * rcfg.margin:
        raise ConfigError(
            f"the shortest training document has {shortest} tokens, fewer than refine.num_chunks={rcfg.num_chunks} "
            f"or 2 x refine.margin={2 * rcfg.margin}: lower refine.num_chunks / refine.margin, or prepare longer "
            "documents (data.min_tokens)"
        )


def train_refine(cfg: RunConfig, tracker: Tracker | None = None) -> TrainResult:
    """Mid-train ``cfg.model`` with REFINE on ``cfg.prepared_dir``; see the module docstring."""
    rcfg = cfg.refine
    stage = STAGE if rcfg.nsp_update else f"{STAGE}-baseline"
    check_document_lengths(cfg)  # before the model is built: the corpus must fit the selection settings
    session = TrainingSession.open(cfg, stage, rcfg, tracker, batch_size=rcfg.batch_size, data_parallel=True)
    sync = session.sync
    model, tokenizer = session.model, session.tokenizer
    reference = None
    if rcfg.kl_coef > 0:
        # The KL option anchors the policy to the starting weights (not in the paper: spec §10.9).
        # Under FSDP a whole frozen replica on every rank (a deep copy cannot copy a sharded model).
        reference = sync.frozen_copy(model)

    history: list[dict[str, float]] = []
    eval_loss = session.baseline_eval(history)

    step = session.start_step
    session.eta(step)  # starts the clock of the time-left estimate
    while step < rcfg.steps:
        if rcfg.stop_after is not None and step - session.start_step >= rcfg.stop_after:
            logger.info("stopping after %d steps of this run (refine.stop_after)", rcfg.stop_after)
            break
        t0 = time.perf_counter()
        indices = sync.shard(session.batcher.next_indices(), what="refine.batch_size")  # this rank's documents
        docs = [session.train_set.get_tensor(i) for i in indices]
        lr = session.scheduler.get_last_lr()[0]
        metrics = refine_step(
            model,
            session.optimizer,
            docs,
            indices,
            rcfg,
            seed=cfg.seed,
            step=step,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
            autocast=session.autocast,
            reference_model=reference,
            sync=sync,
        )
        if sync.distributed:  # the mean over ranks (token-mean losses are already global inside refine_step)
            summed = sync.total(*metrics.values())
            metrics = {name: value / sync.world_size for name, value in zip(metrics, summed, strict=True)}
        session.scheduler.step()
        step += 1
        elapsed = time.perf_counter() - t0
        metrics.update(
            {
                "refine/lr": lr,
                "refine/step_time_s": elapsed,
                "refine/tokens_per_s": sync.total(sum(d.numel() for d in docs))[0] / elapsed,
            }
        )
        session.after_step(
            step, metrics, history, skipped=round(metrics["refine/skipped_steps"]),
            optimizer_steps=round(metrics["refine/optimizer_steps"]), doc_ids=indices,
        )
        eval_loss = metrics.get("eval/loss", eval_loss)
        if step % rcfg.log_every == 0 or step == rcfg.steps:
            logger.info(
                "step %d/%d | ntp %.4f | nsp %.4f | reward %.3f±%.3f (cos %.3f, em %.3f) | clip %.3f | %.1fs%s",
                step,
                rcfg.steps,
                metrics["refine/ntp_loss"],
                metrics.get("refine/nsp_loss", 0.0),
                metrics.get("refine/reward_mean", 0.0),
                metrics.get("refine/reward_std", 0.0),
                metrics.get("refine/reward_cosine_mean", 0.0),
                metrics.get("refine/reward_em_mean", 0.0),
                metrics.get("refine/clip_frac", 0.0),
                elapsed,
                (f" | eval {eval_loss:.4f}" if "eval/loss" in metrics else "") + session.eta(step),
            )

    return session.result(step, eval_loss, history)
