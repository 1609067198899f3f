"""Work split over ranks without a gradient all-reduce: strided shares that may be uneven, and results gathered on
rank 0.

Data-parallel *training* (:mod:`refine_core.distributed.ddp`) keeps every rank's share of a batch the same size
because each optimizer step all-reduces gradients once per rank. Two uses need less:

* test-time training in ``reset`` mode and plain evaluation: every batch of test prompts is its own run from the
  same initial weights, so rank ``r`` of ``W`` answers batches ``r, r + W, ...`` on its own and rank 0 gathers the
  answers (:func:`gather_to_main`) and puts them back in file order;
* task SFT in post-training, which accepts a batch that does not divide evenly (``batch_size=6`` on 4 ranks, or
  fewer examples than ranks): :func:`strided_share` then gives some ranks one document fewer, possibly none.

Both work the same in one process, where the share is everything and the gather is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch.distributed as dist

from refine_core.distributed.ddp import DistributedContext, barrier

T = TypeVar("T")


def strided_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s items ``rank, rank + W, ...`` of ``items``; shares differ by at most one item and may be
    empty (``len(items) < W``). The strided split of :func:`refine_core.distributed.ddp.shard_for_rank` without its
    evenness requirement."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(items[rank::world_size])


def largest_share(n_items: int, world_size: int) -> int:
    """The size of the largest :func:`strided_share` of ``n_items`` items (rank 0's): ``ceil(n / W)``."""
    return -(-n_items // world_size)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` (picklable) on rank 0, in rank order; ``None`` on the other ranks. Collective: every
    rank calls it. ``[obj]`` without a process group."""
    if not _initialized():
        return [obj]
    out: list[T] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank. Collective; the identity without a process group."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def node_leader_first(ctx: DistributedContext | None) -> Iterator[None]:
    """Run the block on each node's local rank 0 first and on the node's other ranks after it (one barrier), so a
    remote model or tokenizer is downloaded once per node into the cache its ranks share (``model.cache_dir``), as
    :meth:`refine_core.training.session.TrainingSession.open` does for its inputs. Nothing to order without ``ctx``.

    If the block fails on local rank 0, torchrun stops the other ranks waiting at the barrier.
    """
    if ctx is not None and ctx.local_rank != 0:
        barrier()
    yield
    if ctx is not None and ctx.local_rank == 0:
        barrier()
