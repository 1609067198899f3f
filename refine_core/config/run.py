"""The whole configuration of one experiment: :class:`RunConfig`, which holds every section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from refine_core.config.errors import ConfigError
from refine_core.config.resources import TrainJobConfig, check_location
from refine_core.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    NTPConfig,
    PostTrainConfig,
    RefineConfig,
    RulerQAConfig,
    TrackingConfig,
    TTTConfig,
)


@dataclass
class RunConfig:
    """Everything one experiment needs; each stage reads its own sections."""

    name: str = "refine"
    # Root of everything a run writes: prepared data, checkpoints, the resolved config.
    output_dir: str = "runs/default"
    seed: int = 0
    # ``auto`` picks CUDA when available; ``cpu`` / ``cuda`` / ``cuda:N`` force it.
    device: str = "auto"
    # ``auto``: bf16 autocast on CUDA, fp32 on CPU.
    precision: str = "auto"
    # How a training stage run under torchrun with more than one process splits the work: ``ddp`` keeps the whole
    # model and optimizer on every rank (PyTorch DDP); ``fsdp`` shards parameters, gradients and optimizer state over
    # the ranks (FSDP2 ``fully_shard`` per decoder block; bf16 compute with fp32 gradient reduce when precision is
    # bf16; train-ntp, train-refine, whose no-grad rollout passes use one extra unsharded copy of the weights per
    # rank, and post-train; ttt, which keeps a whole model per rank, refuses it). Checkpoints of either resume with
    # the other and with any number of processes. One process without torchrun: no effect (under torchrun with one
    # process, fsdp still wraps the model: the same code path as on N GPUs).
    parallel: str = "ddp"
    # Where a training stage also publishes its final model and summary when it completes
    # (``{export_uri}/model/`` and ``{export_uri}/result.json``): an ``s3://`` prefix or a directory on a shared
    # volume. The TrainJob launcher sets it, so that the KFP task can take the model of its trainer pods back
    # (refine_core.distributed.handover); ``None`` publishes nothing.
    export_uri: str | None = None
    # Where training checkpoints are kept so that they outlive the pod (a retried or pre-empted job resumes from
    # them): a directory on a mounted volume, where checkpoints are written directly (``{checkpoint_uri}/{stage}/
    # step_*``), or an ``s3://`` prefix, to which each checkpoint written under ``output_dir`` is uploaded (its
    # ``COMPLETE`` marker last); a resumed run whose ``output_dir`` holds no complete checkpoint as new as the newest
    # uploaded one downloads that one. ``None``: under ``output_dir`` only. The TrainJob launcher sets it.
    checkpoint_uri: str | None = None
    # Triton's cache of compiled and autotuned fla kernels (``$TRITON_CACHE_DIR``; fla caches its autotuning results
    # there too). ``None``: ``$TRITON_CACHE_DIR`` if set, else ``<repo>/.triton_cache``. A directory on a volume that
    # outlives the job (e.g. next to the checkpoints) spares a resumed or repeated job minutes of autotuning; fill
    # it ahead of time with ``refine warmup``.
    triton_cache_dir: str | None = None
    # A fresh training run (resume false) refuses a stage directory holding an earlier run's checkpoints or model;
    # ``true`` deletes them first.
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ntp: NTPConfig = field(default_factory=NTPConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    post: PostTrainConfig = field(default_factory=PostTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    ruler_qa: RulerQAConfig = field(default_factory=RulerQAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainjob: TrainJobConfig = field(default_factory=TrainJobConfig)

    def __post_init__(self) -> None:
        if self.checkpoint_uri is not None:
            check_location("checkpoint_uri", self.checkpoint_uri)
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty; name the directory the run writes into (e.g. runs/my-run).")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r}; use 'auto', 'fp32' or 'bf16'.")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel={self.parallel!r}; use 'ddp' or 'fsdp'.")
        if self.triton_cache_dir is not None:
            if not self.triton_cache_dir.strip():
                raise ConfigError(
                    "triton_cache_dir is empty; set a local directory (e.g. on the checkpoint volume) or null for "
                    "the default ($TRITON_CACHE_DIR, else <repo>/.triton_cache)."
                )
            if "://" in self.triton_cache_dir:
                # Triton reads and writes its cache with plain file operations, so it must be a mounted path.
                raise ConfigError(
                    f"triton_cache_dir={self.triton_cache_dir!r} is a URI; Triton needs a local directory: mount "
                    "the volume and give its path (e.g. /mnt/checkpoints/triton-cache)."
                )

    @property
    def prepared_dir(self) -> Path:
        """The prepared data as a local path (an ``s3://`` ``data.prepared_dir`` is downloaded first by the training
        stages, :func:`refine_core.training.setup.localize_prepared_data`)."""
        if self.data.prepared_dir and self.data.prepared_dir.startswith("s3://"):
            raise ConfigError(
                f"data.prepared_dir={self.data.prepared_dir!r} is an s3:// URI, which only the training stages read "
                "(they download it); prepare-data and the evaluation stages need a local directory."
            )
        return Path(self.data.prepared_dir or Path(self.output_dir) / "data")

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes its checkpoints and final model: ``{output_dir}/{stage}``."""
        return Path(self.output_dir) / stage
