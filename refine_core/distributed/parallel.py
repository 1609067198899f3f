"""Which data-parallel wrapper a run's model gets (``RunConfig.parallel``): none, DDP or FSDP2."""

from __future__ import annotations

from torch import nn

from refine_core.distributed.ddp import DDPSync, DistributedContext, ReplicaSync
from refine_core.distributed.fsdp import FSDPSync

PARALLEL_MODES = ("ddp", "fsdp")


def make_replica_sync(
    model: nn.Module, ctx: DistributedContext | None, parallel: str = "ddp", precision: str = "auto"
) -> ReplicaSync:
    """The :class:`ReplicaSync` of a run: the identity in one process, else DDP or FSDP2 (``RunConfig.parallel``).

    ``parallel="fsdp"`` under torchrun applies FSDP2 even with one process: it has nothing to shard there, but the
    run takes the same code path, mixed-precision policy and replica as on N GPUs (the one-GPU check of the FSDP path,
    and its memory cost, measured by ``bench/bench_distributed.py``). DDP with one process is the plain model.

    FSDP shards ``model`` in place (its parameters become ``DTensor`` shards), so the optimizer must be built
    from ``model.parameters()`` after this call.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}; use one of {', '.join(PARALLEL_MODES)}.")
    if ctx is None or (ctx.world_size == 1 and parallel != "fsdp"):
        return ReplicaSync()
    if parallel == "fsdp":
        return FSDPSync(model, ctx, precision=precision)
    return DDPSync(model, ctx)
