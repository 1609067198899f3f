"""What every training stage does the same way: set up, resume, checkpoint, evaluate the held-out loss, export.

A stage (``train_ntp``, ``train_refine``, ...) opens a :class:`TrainingSession`, runs its own loop in the order of
its algorithm, and calls :meth:`TrainingSession.save` / :meth:`TrainingSession.finish`. Checkpoints hold the model
(HF layout), the optimizer, the scheduler, the data position and every RNG state, so that on CPU an interrupted
and resumed run ends bitwise equal to an uninterrupted one.

Each stage writes under ``{output_dir}/{stage}/``: ``checkpoints/step_*`` and the final ``model/``.

Under ``torchrun`` with more than one rank (a stage opts in with ``data_parallel=True``), every rank opens the same
session and resumes from the same checkpoint; ``session.sync`` (:class:`refine_core.distributed.ReplicaSync`)
shards batches, sums counts and synchronises gradients through DDP, and only rank 0 logs, checkpoints and exports.
In one process ``session.sync`` is the identity and nothing changes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint import CheckpointException

from refine_core.config import ConfigError, NTPConfig, PostTrainConfig, RefineConfig, RunConfig, dump_yaml
from refine_core.data.batching import DocumentBatcher, iter_eval_batches
from refine_core.data.shards import TokenizedDataset, data_fingerprint, load_manifest
from refine_core.distributed.ddp import (
    ReplicaSync,
    barrier,
    init_distributed,
    is_distributed_launch,
    launched_by_torchrun,
)
from refine_core.distributed.fsdp import FSDPSync
from refine_core.distributed.parallel import make_replica_sync
from refine_core.models import FastWeightForCausalLM, save_pretrained
from refine_core.models.hub import read_state_dict
from refine_core.progress import format_duration
from refine_core.runtime import autocast, capture_rng_state, restore_rng_state, seed_everything, select_device
from refine_core.tokenizer import Tokenizer
from refine_core.tracking import NullTracker, Tracker
from refine_core.training.checkpoint import (
    CheckpointManager,
    open_checkpoints,
    step_dir_name,
    write_directory_atomically,
)
from refine_core.training.divergence import DivergenceGuard, TrainingDiverged
from refine_core.training.losses import count_targets, lm_loss_sum, ntp_targets
from refine_core.training.optim import OptimSettings, build_optimizer, build_scheduler
from refine_core.training.recall_probe import recall_hits, recall_positions
from refine_core.training.result import TrainResult, export_result
from refine_core.training.run_identity import check_resume, claim_stage_dir, run_identity
from refine_core.training.setup import (
    build_or_load_model,
    check_model_section,
    localize_inputs,
    prepared_tokenizer,
)
from refine_core.training.sharded_state import (
    STATE_DIR,
    has_sharded_state,
    load_sharded_state,
    sharded_state,
    write_sharded_state,
)

logger = logging.getLogger(__name__)

# A wall-clock deadline, seconds since the epoch: a training stage stops at the end of the first step that ends past
# it, checkpoints and returns unfinished, as with ``stop_after``; ``resume=true`` continues it. A caller with a time
# budget (bench/repro.py) sets it for the stages it runs.
DEADLINE_ENV = "REFINE_DEADLINE"


def deadline_from_env() -> float | None:
    """``$REFINE_DEADLINE`` as seconds since the epoch (``None`` when unset); a value that is no number is refused."""
    value = os.environ.get(DEADLINE_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(
            f"${DEADLINE_ENV}={value!r} is not a time in seconds since the epoch; set it to one (e.g. "
            f"$(( $(date +%s) + 540 ))) or unset it."
        ) from None


def micro_batch_loss(
    model: FastWeightForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_pad: bool
) -> tuple[torch.Tensor, int]:
    """Summed NTP loss of one left-padded micro-batch and its number of counted targets."""
    out = model(input_ids, attention_mask=attention_mask, return_logits=False)
    labels = ntp_targets(input_ids, attention_mask, mask_pad=mask_pad)
    return lm_loss_sum(out.hidden_states[:, :-1], model.lm_head.weight, labels), count_targets(labels)


@dataclass
class TrainingSession:
    """The shared state of one training stage run."""

    cfg: RunConfig
    stage: str
    settings: NTPConfig | RefineConfig | PostTrainConfig
    tracker: Tracker
    device: torch.device
    tokenizer: Tokenizer
    model: FastWeightForCausalLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batcher: DocumentBatcher
    checkpoints: CheckpointManager
    train_set: Sequence[Any]
    eval_set: Sequence[Any]
    start_step: int = 0
    resumed_state: dict[str, Any] = field(default_factory=dict)
    # The other data-parallel ranks (the identity in a single process); see refine_core.distributed.ddp.
    sync: ReplicaSync = field(default_factory=ReplicaSync)
    guard: DivergenceGuard | None = None
    # What this run is (refine_core.training.run_identity); written into every checkpoint.
    identity: dict[str, str] = field(default_factory=dict)
    # When this process's training loop started (time.monotonic()), for :meth:`eta`.
    loop_start: float | None = None
    # Per held-out document, the (first, repeat) targets of the recall probe (found at the first evaluation).
    recall_positions: list[list[tuple[int, int]]] | None = None

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        stage: str,
        settings: NTPConfig | RefineConfig | PostTrainConfig,
        tracker: Tracker | None,
        batch_size: int,
        *,
        optim: OptimSettings | None = None,
        tokenizer: Tokenizer | None = None,
        train_set: Sequence[Any] | None = None,
        eval_set: Sequence[Any] | None = None,
        data_tag: str | None = None,
        data_parallel: bool = False,
        even_batches: bool = True,
    ) -> TrainingSession:
        """Build everything from ``cfg`` and, with ``settings.resume``, restore the newest complete checkpoint.

        By default the data are the prepared shards (``refine prepare-data``) and their tokenizer; a stage that
        trains on task files passes its own ``tokenizer``, ``train_set`` (any sequence the batcher can index),
        ``eval_set`` and a ``data_tag`` naming them. ``optim`` overrides the optimiser fields of ``settings``.
        ``data_parallel``: the stage's loop goes through ``session.sync``, so it may run under torchrun with more
        than one rank (``batch_size`` must then be a multiple of the number of ranks, unless ``even_batches=False``:
        the stage's loop then takes uneven shares itself, as post-training's task SFT does).
        """
        tracker = tracker or NullTracker()
        check_model_section(cfg)  # a bad architecture is refused before any data or weights are read
        ctx = None
        # FSDP joins a process group even with one torchrun process: the same path as on N GPUs (make_replica_sync).
        if is_distributed_launch() or (cfg.parallel == "fsdp" and data_parallel and launched_by_torchrun()):
            if not data_parallel:
                raise ValueError(
                    f"{stage} does not support data-parallel runs yet; run it as a single process (without torchrun "
                    "or with --nproc_per_node=1)."
                )
            ctx = init_distributed(cfg.device)
            if even_batches and batch_size % ctx.world_size:
                raise ValueError(
                    f"{stage}: batch_size={batch_size} is not a multiple of the {ctx.world_size} ranks of this "
                    "torchrun job; make the batch size a multiple of nproc_per_node x nodes."
                )
            if not ctx.is_main:
                tracker = NullTracker()  # only rank 0 logs
        logged_cfg = cfg  # the config as given (s3:// URIs, not this machine's cache paths) goes to the tracker
        # One rank per node downloads remote inputs; the node's other ranks then find them in the shared cache.
        if ctx is not None and ctx.local_rank != 0:
            barrier()
        cfg = localize_inputs(cfg)
        if ctx is not None and ctx.local_rank == 0:
            barrier()
        device = select_device(cfg.device) if ctx is None else ctx.device
        seed_everything(cfg.seed)
        stage_dir = cfg.stage_dir(stage)
        section = getattr(settings, "section", "post")
        if not settings.resume and (ctx is None or ctx.is_main):
            claim_stage_dir(stage_dir, section, cfg.overwrite)
        if ctx is not None:
            barrier()  # no rank looks at the stage directory before rank 0 has claimed it
        stage_dir.mkdir(parents=True, exist_ok=True)
        if ctx is None or ctx.is_main:
            dump_yaml(cfg, stage_dir / "config.yaml")

        if train_set is None:
            tokenizer = prepared_tokenizer(cfg)
            fingerprint = tokenizer.fingerprint()
            train_set = TokenizedDataset(cfg.prepared_dir, "train", expected_fingerprint=fingerprint)
            eval_set = TokenizedDataset(cfg.prepared_dir, "eval", expected_fingerprint=fingerprint)
            data_tag = data_fingerprint(load_manifest(cfg.prepared_dir))
        if tokenizer is None:
            raise ValueError("TrainingSession.open: a custom train_set needs its tokenizer")
        eval_set = eval_set if eval_set is not None else []
        model = build_or_load_model(cfg, tokenizer, device).train()
        # DDP / FSDP wrap (FSDP shards the parameters in place) before the optimizer is built on them.
        sync = make_replica_sync(model, ctx, cfg.parallel, cfg.precision)
        optim = optim or settings
        optimizer = build_optimizer(model, optim)
        session = cls(
            cfg=cfg,
            stage=stage,
            settings=settings,
            tracker=tracker,
            device=device,
            tokenizer=tokenizer,
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, optim),
            batcher=DocumentBatcher(train_set, batch_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id),
            checkpoints=open_checkpoints(cfg, stage, settings.keep_checkpoints, resume=bool(settings.resume),
                                         section=section),
            train_set=train_set,
            eval_set=eval_set,
            sync=sync,
            guard=DivergenceGuard(stage, getattr(settings, "section", "post"), settings.max_skipped_steps),
        )
        sections = (section,) if section != "post" else ("post", "refine")  # post-training uses refine's AdamW
        session.identity = run_identity(cfg, sections, data_tag)
        latest, state = session._resume_from_checkpoint(section) if settings.resume else (None, {})
        if latest is not None:
            session.scheduler.load_state_dict(state["scheduler"])
            session.batcher.load_state_dict(state["batcher"])
            restore_rng_state(state["rng"])
            session.start_step = int(state["step"])
            session.resumed_state = state
            logger.info("resumed %s from %s at step %d", stage, latest, session.start_step)
        elif settings.resume:
            logger.info("%s.resume is set but there is no complete checkpoint yet: starting at step 0", stage)

        tracker.log_config(logged_cfg)
        tracker.set_tags({"refine.data_fingerprint": data_tag or "", "refine.resumed_from": str(latest)})
        tracker.log_params({"model.num_parameters": model.num_parameters(), "data.train_docs": len(train_set)})
        return session

    def _resume_from_checkpoint(self, section: str) -> tuple[Path | None, dict[str, Any]]:
        """Load the newest complete checkpoint that can be read into the model and optimizer; its trainer state.

        A newest checkpoint that cannot be read (a disk fault after it was marked complete, a truncated file) is
        skipped with a warning for the one before it; if none can be read, the run stops naming them. Every rank
        reads the same checkpoint; the model and optimizer tensors come through ``torch.distributed.checkpoint``,
        resharded to this run's ranks (:mod:`refine_core.training.sharded_state`), whatever number of ranks saved.
        """
        complete = self.checkpoints.list_complete()
        failures = []
        for path in reversed(complete):
            try:
                state = self.checkpoints.load_trainer_state(path)
                check_resume(path, state.get("run_identity"), self.identity, section, self.settings.resume == "force")
                self._load_model_and_optimizer(path, state)
                return path, state
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError,
                    CheckpointException) as exc:  # DCP reports a rank's unreadable file as CheckpointException
                if isinstance(exc, ConfigError):
                    raise  # another run's checkpoint, or an old-format one under FSDP: not a damaged file
                failures.append(f"{path.name} ({type(exc).__name__}: {str(exc)[:120]})")
                logger.warning("checkpoint %s cannot be read (%s); trying the one before it", path, exc)
        if failures:
            raise ConfigError(
                f"no checkpoint of {self.checkpoints.root} can be read: {'; '.join(failures)}. Start afresh with "
                "overwrite=true or restore the checkpoints from a backup."
            )
        return None, {}

    def _load_model_and_optimizer(self, path: Path, state: dict[str, Any]) -> None:
        if has_sharded_state(path):
            load_sharded_state(self.model, self.optimizer, path, state["optimizer_param_groups"])
            return
        # A checkpoint written before the DCP format (model.safetensors + the optimizer's state_dict in
        # trainer_state.pt) still resumes where the whole model lives on every rank (one process, DDP).
        if isinstance(self.sync, FSDPSync):
            raise ConfigError(
                f"{path} is an older checkpoint (model.safetensors, no {STATE_DIR}/): it resumes only without FSDP. "
                "Resume it once with parallel=ddp; its next checkpoints are in the resharding format."
            )
        self.model.load_state_dict(read_state_dict(path))
        self.optimizer.load_state_dict(state["optimizer"])

    def eta(self, step: int) -> str:
        """`` | eta 3m07s``: the time left at this run's mean step time (empty before the first step)."""
        import time

        start = self.loop_start
        if start is None:
            self.loop_start = time.monotonic()
            return ""
        done = step - self.start_step
        if done <= 0 or step >= self.settings.steps:
            return ""
        left = (time.monotonic() - start) / done * (self.settings.steps - step)
        return f" | eta {format_duration(left)}"

    @property
    def model_dir(self) -> Path:
        return self.cfg.stage_dir(self.stage) / "model"

    def autocast(self):
        return autocast(self.device, self.cfg.precision)

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path:
        """Atomic checkpoint of everything needed to continue at ``step`` (``extra`` must be weights_only-safe).

        The model and optimizer state go through ``torch.distributed.checkpoint``
        (:mod:`refine_core.training.sharded_state`). FSDP: every rank writes its shards into one directory (on
        storage all ranks share), then rank 0 writes the rest (all ranks hold the same scheduler, data position and
        RNG state) and commits. One process and DDP: rank 0 writes everything. Every rank returns once the
        checkpoint is complete.
        """
        sharded = self.sync.sharded
        if not sharded and not self.sync.is_main:  # DDP: rank 0's replicated state is complete; it writes alone
            self.sync.barrier()
            return self.checkpoints.root / step_dir_name(step)
        tensors, param_groups = sharded_state(self.model, self.optimizer)
        state = {
            "step": step,
            "optimizer_param_groups": param_groups,
            "scheduler": self.scheduler.state_dict(),
            "batcher": self.batcher.state_dict(),
            "rng": capture_rng_state(),
            "run_identity": dict(self.identity),
            **(extra or {}),
        }

        def write(directory: Path) -> None:
            write_sharded_state(tensors, directory, collective=sharded)
            if self.sync.is_main:  # the architecture (and tokenizer), so that a checkpoint says what it holds
                config = json.dumps(self.model.config.to_dict(), indent=2, sort_keys=True)
                (directory / "config.json").write_text(config)
                self.tokenizer.save_pretrained(directory)

        path = self.checkpoints.save(step, write, state, ranks=self.sync if sharded else None)
        if self.cfg.tracking.log_checkpoints and self.sync.is_main:
            self.tracker.log_artifacts(path, artifact_path=f"checkpoints/{path.name}")
        self.sync.barrier()
        return path

    def finish(self, step: int) -> Path:
        """Checkpoint at ``step``; when the run is complete also export the final model (HF layout) and log it."""
        self.save(step)
        if step < self.settings.steps:
            return self.model_dir  # stopped early on purpose (stop_after): the checkpoint is what counts
        weights = self.sync.full_state_dict(self.model)  # collective: FSDP gathers its shards onto rank 0
        if self.sync.is_main:  # swapped in whole: a crash while exporting leaves no half-written model/
            write_directory_atomically(
                self.model_dir,
                lambda d: save_pretrained(self.model, d, tokenizer=self.tokenizer, state_dict=weights),
            )
            self.tracker.log_model(self.model_dir)  # an MLflow pyfunc Model holding the HF files
        self.sync.barrier()  # the exported model exists before any rank returns it
        return self.model_dir

    def result(self, step: int, final_eval_loss: float | None, history: list[dict[str, float]]) -> TrainResult:
        """:meth:`finish` at ``step`` and the stage's :class:`TrainResult`; when the run is complete and
        ``cfg.export_uri`` is set, rank 0 also publishes it there (for the launcher of a TrainJob)."""
        model_dir = self.finish(step)
        result = TrainResult(model_dir=model_dir, steps=step, final_eval_loss=final_eval_loss, history=history)
        if self.cfg.export_uri and step >= self.settings.steps:
            if self.sync.is_main:
                export_result(result, self.cfg.export_uri, self.stage)
            self.sync.barrier()  # no rank exits (and ends the job) before the export is complete
        return result

    def baseline_eval(self, history: list[dict[str, float]]) -> float | None:
        """The held-out loss before the first step of a fresh run: the reference point for "the loss falls"."""
        if self.start_step or not getattr(self.settings, "eval_every", 0):
            return None
        metrics = self.eval_metrics()
        loss = metrics.get("eval/loss")
        if loss is not None:
            self.tracker.log_metrics(metrics, step=0)
            history.append({"step": 0.0, **metrics})
            logger.info("step 0/%d | eval %.4f", self.settings.steps, loss)
        return loss

    def after_step(
        self,
        step: int,
        metrics: dict[str, float],
        history: list[dict[str, float]],
        *,
        skipped: int = 0,
        optimizer_steps: int = 1,
        doc_ids: Sequence[int] = (),
    ) -> None:
        """The end of every step: held-out loss on schedule (added to ``metrics``), history, tracker, checkpoint.

        ``skipped`` of the step's ``optimizer_steps`` had a non-finite gradient; after too many fully skipped steps in
        a row this logs the step and raises :class:`~refine_core.training.divergence.TrainingDiverged` (no
        checkpoint, no export).
        """
        settings = self.settings
        guard = self.guard or DivergenceGuard(self.stage, "train", 0)
        try:
            section = guard.section if hasattr(settings, "lr") else "refine"  # post-training uses refine's AdamW
            lr = getattr(settings, "lr", None) or self.cfg.refine.lr
            guard.update(step, skipped=skipped, optimizer_steps=optimizer_steps, doc_ids=doc_ids,
                         last_good=self.checkpoints.latest(), lr=(f"{section}.lr", lr))
        except TrainingDiverged:
            metrics["train/skipped_steps_total"] = float(guard.skipped_total)
            history.append({"step": float(step), **metrics})
            self.tracker.log_metrics(metrics, step=step)
            raise
        metrics["train/skipped_steps_total"] = float(guard.skipped_total)
        if self.device.type == "cuda":  # this rank's high-water mark of allocated memory so far (FSDP: its shards)
            metrics["system/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        every = getattr(settings, "eval_every", 0)
        if (every and step % every == 0) or step == settings.steps:
            metrics.update(self.eval_metrics())
        history.append({"step": float(step), **metrics})
        self.tracker.log_metrics(metrics, step=step)
        if settings.save_every and step % settings.save_every == 0 and step < settings.steps:
            self.save(step)
        deadline = deadline_from_env()
        if deadline is not None and step < settings.steps and self.sync.total(float(time.time() >= deadline))[0] > 0:
            logger.info("step %d: past the deadline of $%s; checkpointing and stopping (resume to go on)", step,
                        DEADLINE_ENV)
            settings.stop_after = step - self.start_step  # the stage's loop stops before its next step

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """Held-out loss and in-context recall over up to ``eval_max_docs`` documents, in one pass.

        ``eval/loss``: token-mean NTP loss (pads never count). ``eval/recall_acc``: top-1 accuracy at the targets
        that repeat a document-specific span of the same document, and ``eval/first_mention_acc`` at the same spans'
        first occurrences (:mod:`refine_core.training.recall_probe`); absent when the documents have none. Empty
        when there is no held-out set.

        Data-parallel: rank ``r`` evaluates batches ``r, r + W, ...`` and the sums are added over ranks.
        """
        if len(self.eval_set) == 0 or not self.settings.eval_max_docs:
            return {}
        if self.recall_positions is None:  # the same documents every time: found once per session
            docs = [self.eval_set[i] for i in range(min(self.settings.eval_max_docs, len(self.eval_set)))]
            self.recall_positions = recall_positions([d.tolist() if hasattr(d, "tolist") else list(d) for d in docs])
        was_training = self.model.training
        self.model.eval()
        total, count, correct, first_correct, scored = 0.0, 0, 0, 0, 0
        batches = list(iter_eval_batches(
            self.eval_set, self.settings.micro_batch_size, self.tokenizer.pad_token_id, self.settings.eval_max_docs
        ))
        world, rank = self.sync.world_size, self.sync.rank
        for first in range(0, len(batches), world):  # rank r evaluates batch first + r of each round
            if first + rank >= len(batches):
                if self.sync.lockstep:  # FSDP: every rank's forward all-gathers, so all ranks must run one
                    with self.autocast():
                        self.model(batches[first].input_ids.to(self.device),
                                   attention_mask=batches[first].attention_mask.to(self.device), return_logits=False)
                continue
            batch = batches[first + rank]
            ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
            with self.autocast():
                hidden = self.model(ids, attention_mask=mask, return_logits=False).hidden_states
                labels = ntp_targets(ids, mask, mask_pad=True)
                loss_sum = lm_loss_sum(hidden[:, :-1], self.model.lm_head.weight, labels)
                pairs = [self.recall_positions[i] for i in batch.doc_indices]
                hits, n_scored = recall_hits(hidden, self.model.lm_head.weight, ids, mask,
                                             [[repeat for _, repeat in doc] for doc in pairs])
                first_hits, _ = recall_hits(hidden, self.model.lm_head.weight, ids, mask,
                                            [[first for first, _ in doc] for doc in pairs])
            total += float(loss_sum)
            count += count_targets(labels)
            correct += hits
            first_correct += first_hits
            scored += n_scored
        total, count, correct, first_correct, scored = self.sync.total(total, count, correct, first_correct, scored)
        self.model.train(was_training)
        metrics = {"eval/loss": total / max(count, 1)}
        if scored:
            metrics["eval/recall_acc"] = correct / scored
            metrics["eval/first_mention_acc"] = first_correct / scored
        return metrics
