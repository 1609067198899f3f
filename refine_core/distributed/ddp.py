"""Data-parallel training under ``torchrun`` with PyTorch's own ``DistributedDataParallel``.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` turns that environment into a process group (NCCL on CUDA, gloo on CPU)
and a :class:`DistributedContext`. A training loop then talks to the other ranks only through a
:class:`ReplicaSync`, which is the identity in a single process, so the one-process path runs exactly the code it
always ran:

* :meth:`ReplicaSync.shard` — this rank's share of an optimizer batch. Rank ``r`` of ``W`` takes the documents at
  positions ``r, r + W, r + 2W, ...`` of the batch (a strided split). The batch size must be a multiple of ``W``.
  A strided split also keeps every contiguous mini-batch of a multiple of ``W`` documents evenly split, which the
  REFINE inner step (several optimizer steps per batch) relies on.
* :meth:`ReplicaSync.total_count` / :meth:`ReplicaSync.total` — sums over ranks (one ``all_reduce``), used for the
  global token counts that normalise the loss and for logged metrics.
* :meth:`ReplicaSync.forward` runs a loss function through the DDP wrapper and :meth:`ReplicaSync.accumulate`
  suppresses the gradient all-reduce on every micro-batch but the last one of an optimizer step (``no_sync``).
* :meth:`ReplicaSync.scale` multiplies a loss by ``W``: DDP *averages* gradients over ranks, and each rank divides
  its summed loss by the *global* token count, so ``W · Σ_r (loss_r / N) / W = Σ_r loss_r / N`` — the gradient of
  the single-process loss on the whole batch.

Gradients are synchronised by DDP (bucketed all-reduce during backward). The only other collectives are the
count/metric sums and barriers around checkpoints.

Usage::

    torchrun --nproc_per_node=2 -m refine_core train-ntp --config configs/tiny-deltanet.yaml
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

T = TypeVar("T")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes (ranks) in the job.
        local_rank: rank on this node; picks the CUDA device.
        device: the device this rank trains on (``cuda:<local_rank>`` or ``cpu``).
        backend: the process-group backend (``nccl`` or ``gloo``).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``$WORLD_SIZE`` as set by ``torchrun`` (1 when unset: a plain single-process run)."""
    value = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        size = int(value)
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE={value!r} is not an integer; torchrun sets it, do not set it by hand.") from exc
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size} must be >= 1.")
    return size


def is_distributed_launch() -> bool:
    """Whether this process was started by ``torchrun`` (or a Trainer runtime) with more than one rank."""
    return env_world_size() > 1


def launched_by_torchrun() -> bool:
    """Whether torchrun (or a Trainer runtime) started this process, whatever the number of ranks."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def get_rank() -> int:
    """This process's global rank: from the process group when there is one, else ``$RANK`` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """True on rank 0 (and in every single-process run): the rank that logs, checkpoints and exports."""
    return get_rank() == 0


def _device_for(spec: str, local_rank: int) -> torch.device:
    """The device of this rank for a ``RunConfig.device`` string: one GPU per process under torchrun."""
    spec = spec.strip().lower()
    want_cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if not want_cuda:
        if spec not in ("auto", "cpu"):
            raise ValueError(f"device={spec!r} is not usable under torchrun; use 'auto', 'cpu' or 'cuda'.")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but CUDA is not available on this node; use device=cpu for gloo runs.")
    count = torch.cuda.device_count()
    # Each process owns one GPU. When a runtime already narrowed CUDA_VISIBLE_DEVICES to one GPU per process,
    # that GPU is cuda:0 for everyone.
    index = local_rank % count
    if spec not in ("auto", "cuda", f"cuda:{index}"):
        logger.warning("device=%s ignored under torchrun: local rank %d trains on cuda:%d", spec, local_rank, index)
    return torch.device("cuda", index)


def init_distributed(device_spec: str = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by torchrun's environment (idempotent).

    Args:
        device_spec: ``RunConfig.device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; under torchrun each
            rank uses ``cuda:<LOCAL_RANK>`` whatever index is given.
        timeout_s: how long a collective may wait for the other ranks before the job fails.

    Returns:
        The :class:`DistributedContext`. The backend is NCCL on CUDA and gloo on CPU. The group is destroyed when
        the process exits (or by :func:`cleanup`).
    """
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed: {', '.join(missing)} not set; start the job with torchrun "
            "(e.g. `torchrun --nproc_per_node=2 -m refine_core train-ntp ...`) or a Kubeflow Trainer TrainJob."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _device_for(device_spec, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        atexit.register(cleanup)
        logger.info(
            "joined process group: rank %d/%d (local %d) on %s with %s",
            dist.get_rank(), dist.get_world_size(), local_rank, device, backend,
        )
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
    )


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (idempotent; registered with ``atexit`` by :func:`init_distributed`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_for_rank(items: Sequence[T], rank: int, world_size: int, *, what: str = "batch_size") -> list[T]:
    """Rank ``rank``'s share of ``items``: positions ``rank, rank + W, ...`` (strided; see the module docstring).

    Args:
        items: the whole optimizer batch (e.g. dataset indices), the same on every rank.
        rank: this rank.
        world_size: ``W``; must divide ``len(items)``.
        what: the config key to name in the error.

    Returns:
        ``len(items) // W`` items.
    """
    if len(items) % world_size:
        raise ValueError(
            f"{what}={len(items)} is not a multiple of the {world_size} ranks of this torchrun job; every rank must "
            f"get the same number of documents. Pick {what} as a multiple of {world_size} (nproc_per_node x nodes)."
        )
    return list(items[rank::world_size])


class _CallThrough(nn.Module):
    """Owns the model's parameters and runs an arbitrary loss function as its forward.

    DDP hooks the backward of whatever its ``forward`` computed, so wrapping the whole loss computation (which may
    call the model several times, or use ``lm_head.weight`` outside ``model.forward``) keeps one DDP forward per
    backward, as DDP requires.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


class ReplicaSync:
    """The single-process implementation: every method is the identity, so the plain path is unchanged."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T], *, what: str = "batch_size") -> list[T]:
        """This rank's share of an optimizer batch (all of it in one process)."""
        return list(items)

    def total_count(self, count: int) -> int:
        """``count`` summed over ranks."""
        return count

    def total(self, *values: float) -> tuple[float, ...]:
        """Each of ``values`` summed over ranks (one collective for all of them)."""
        return values

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``: a forward pass whose result will be backpropagated.

        ``fn`` must compute with the parameters of the model this sync was built for (pass the model in ``args``).
        """
        return fn(*args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-batch's forward *and* backward; only the ``last`` one of a step all-reduces."""
        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate for a loss normalised by global counts (see the module docstring)."""
        return loss

    def barrier(self) -> None:
        """Wait for every rank."""

    @property
    def sharded(self) -> bool:
        """Whether each rank holds only part of the model and optimizer state (FSDP), so every rank must write
        its part of a checkpoint; otherwise rank 0's copy is complete and rank 0 writes alone."""
        return False

    @property
    def lockstep(self) -> bool:
        """Whether every rank must run the same number of forward passes (FSDP: each one all-gathers weights)."""
        return False

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable; used for small control values such as a directory name)."""
        return obj

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (CPU tensors; other ranks get ``{}``). Collective: every rank calls it.

        One process and DDP hold the whole model on every rank; FSDP gathers its shards (see ``FSDPSync``).
        """
        if not self.is_main:
            return {}
        return {name: tensor.detach().to("cpu") for name, tensor in model.state_dict().items()}

    def local_model(self, model: nn.Module) -> nn.Module:
        """A model with ``model``'s current weights whose forwards run no collectives, for no-grad passes.

        Every rank may then run a different number of forwards with it (entropy passes over its own documents,
        rollout decoding). One process and DDP: ``model`` itself. FSDP: a plain, unsharded replica refreshed from the
        shards (``FSDPSync.local_model``), valid until the next optimizer step. Collective: every rank calls it.
        """
        return model

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A frozen copy of ``model``'s current weights on this rank (eval mode, no gradients), e.g. a KL reference.

        Collective under FSDP (it gathers the shards); a deep copy otherwise.
        """
        return copy.deepcopy(model).eval().requires_grad_(False)

    def check_same(self, value: int, what: str) -> None:
        """Raise ``ValueError`` unless every rank passed the same ``value`` (one collective; nothing in one process).

        For counts that decide how many collectives follow (e.g. micro-batches, each an FSDP reduce-scatter): a rank
        that disagrees would otherwise hang the job or silently pair the wrong collectives.
        """


class DDPSync(ReplicaSync):
    """:class:`ReplicaSync` over a ``DistributedDataParallel`` wrapper of ``model``.

    Args:
        model: the model on ``ctx.device``; its parameters are broadcast from rank 0 when this is built.
        ctx: from :func:`init_distributed`.
    """

    def __init__(self, model: nn.Module, ctx: DistributedContext) -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        # device_ids=None: DDP does not move the inputs (they are already on the device and include non-tensor
        # objects such as the loss function and the model); it still reduces the gradients on ctx.device.
        self.ddp = DistributedDataParallel(_CallThrough(model), device_ids=None, find_unused_parameters=False)

    def shard(self, items: Sequence[T], *, what: str = "batch_size") -> list[T]:
        return shard_for_rank(items, self.rank, self.world_size, what=what)

    def total_count(self, count: int) -> int:
        return int(round(self.total(float(count))[0]))

    def total(self, *values: float) -> tuple[float, ...]:
        # float64 holds integer counts exactly up to 2**53; NCCL needs the tensor on the GPU.
        buffer = torch.tensor(values, dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return tuple(buffer.tolist())

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.ddp(fn, *args, **kwargs)

    @contextlib.contextmanager
    def _accumulate(self, last: bool) -> Iterator[None]:
        if last:
            yield
        else:
            with self.ddp.no_sync():
                yield

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[None]:
        return self._accumulate(last)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.world_size

    def barrier(self) -> None:
        barrier()

    def broadcast_object(self, obj: T) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.ctx.device)
        return box[0]

    def check_same(self, value: int, what: str) -> None:
        # One all-reduce: the max of (v, -v) is (max, -min) over ranks.
        both = torch.tensor([value, -value], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        high, low = int(both[0]), -int(both[1])
        if high != low:
            raise ValueError(
                f"{what} differs between the ranks of this torchrun job ({low} to {high}; this rank: {value}); every "
                "rank must take the same number of documents: shard the batch with ReplicaSync.shard."
            )
