"""Multi-GPU and multi-node training: DDP under ``torchrun`` and the Kubeflow Trainer v2 ``TrainJob`` launcher.

* :mod:`refine_core.distributed.ddp` — the process group from torchrun's environment and :class:`ReplicaSync`,
  through which the training loops shard batches, sum token counts and synchronise gradients with PyTorch's
  ``DistributedDataParallel``. Imported here.
* :mod:`refine_core.distributed.fsdp` — the same interface over an FSDP2-sharded model (``parallel: fsdp``), and
  :mod:`refine_core.distributed.parallel`, which picks one of them for a run (``make_replica_sync``, imported here).
* :mod:`refine_core.distributed.split_work` — work split over ranks without a gradient all-reduce: uneven strided
  shares (post-training's task SFT), and results gathered on rank 0 (TTT in ``reset`` mode shards its prompts).
* :mod:`refine_core.distributed.trainjob` — builds, validates, creates and watches a ``TrainJob``
  (``trainer.kubeflow.org/v1alpha1``) that runs ``torchrun -m refine_core <stage>`` with our image. It needs the
  ``kubernetes`` and ``kubeflow-trainer-api`` packages (the ``kfp`` extra), so it is not imported here.
* :mod:`refine_core.distributed.handover` — what the launcher component and the TrainJob's pods exchange through a
  staging location (``s3://`` or a shared volume): the prepared data in, the exported model and result out.
"""

from __future__ import annotations

from refine_core.distributed.ddp import (
    DDPSync,
    DistributedContext,
    ReplicaSync,
    barrier,
    cleanup,
    env_world_size,
    get_rank,
    init_distributed,
    is_distributed_launch,
    is_main_process,
    shard_for_rank,
)
from refine_core.distributed.parallel import make_replica_sync

__all__ = [
    "DDPSync",
    "DistributedContext",
    "ReplicaSync",
    "barrier",
    "cleanup",
    "env_world_size",
    "get_rank",
    "init_distributed",
    "is_distributed_launch",
    "is_main_process",
    "make_replica_sync",
    "shard_for_rank",
]
