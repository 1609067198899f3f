"""Sharded data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``), selected by ``parallel: fsdp``.

:class:`FSDPSync` is the :class:`~refine_core.distributed.ddp.ReplicaSync` of an FSDP2 run, so the training loops
run unchanged: every rank still takes its strided share of each batch (``shard``), the loss is still normalised by
the global token count, and the update equals the single-process one. What differs from DDP:

* Parameters are sharded: ``fully_shard`` is applied to every decoder block (``model.model.layers[i]``) and then to
  the whole model (the root, which owns the embeddings, the final norm and ``lm_head``). Each parameter becomes a
  ``DTensor`` holding ``1/W`` of the rows; a block's full weights exist only while it runs (all-gathered in its
  forward pre-hook, freed after its forward and again after its backward). The optimizer is built on the sharded
  parameters, so its state is sharded too.
* The root keeps its parameters unsharded after its forward (torch's documented heuristic for the root's
  ``reshard_after_forward``), so code that uses ``model.lm_head`` / ``model.lm_head.weight`` right after
  ``model(...)`` (the losses, the rollouts, the held-out evaluation) sees plain tensors, as in one process.
* Gradients are reduce-scattered after each block's backward. FSDP2 *averages* them over ranks by default; we set
  the divide factor to 1 (``set_gradient_divide_factor(1.0)``), so the reduction is a plain sum and
  :meth:`FSDPSync.scale` is the identity: with each rank's summed loss divided by the *global* token count,
  ``Σ_r loss_r / N`` is exactly the single-process loss of the whole batch (no ``× W`` then ``/ W`` rounding).
* Micro-batches but the last one of an optimizer step skip the reduce-scatter
  (``set_requires_gradient_sync(False)``, FSDP2's ``no_sync``): the unsharded gradients accumulate locally and the
  last micro-batch reduces their sum once.
* With bf16 (``precision: bf16``, or ``auto`` on CUDA) the blocks compute with bf16 copies of the fp32 sharded
  parameters and reduce gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, inputs
  left as they come, under the run's bf16 autocast); the optimizer updates the fp32 shards. CPU runs are fp32 and
  set no policy unless ``precision: bf16``.
* Activation checkpointing (``model.gradient_checkpointing``) composes: the model wraps each block *call* in
  ``torch.utils.checkpoint`` (non-reentrant), so a recomputation re-enters the block's FSDP pre-forward hook and
  all-gathers it again, the layering torch's FSDP2 examples use (checkpoint inside the sharded unit).

REFINE (``train-refine``, :mod:`refine_core.training.refine_step`) runs more than one kind of forward per step:

* FSDP2 needs every rank to enter the same collectives in the same order, i.e. to run the same forwards. The passes
  with gradients do (equal documents per rank, checked each step). The no-grad passes do not: the entropy pass and
  the rollout sampling run over each rank's own documents and decoding may stop at EOS. They run on
  :meth:`FSDPSync.local_model`, an unsharded, hook-free replica of the model refreshed from the shards at the start
  of each step (one ``DTensor.full_tensor`` all-gather per parameter, in the compute dtype, so it computes exactly
  what the sharded blocks compute). Its cost is one full copy of the weights per rank (2.6 GB in bf16 at 1.3B),
  allocated once and kept, so that CUDA-graph decode steps captured for it stay valid. The alternative, unsharding
  the FSDP model itself with ``reshard_after_forward`` off for the no-grad phase, still runs FSDP's forward hooks,
  which record every forward (a different number per rank) in the order that the next backward prefetches from;
  keeping FSDP out of the no-grad phase altogether leaves nothing rank-dependent in its state.
* The ``branch`` engine's grad pass calls every block twice (the documents, then the rollout tokens from the cut
  states): each block is all-gathered and reduce-scattered once per call (the second reduce-scatter adds into the
  sharded gradient). The second call skips the *root's* hooks (:func:`refine_core.algorithm.rollout.continue_pass`),
  or FSDP would reduce and free ``lm_head`` before the first call's uses of it are differentiated.
* The KL option's frozen reference is :meth:`FSDPSync.frozen_copy`, another gathered replica (FSDP modules cannot
  be deep-copied).

Checkpoints go through ``torch.distributed.checkpoint`` (:mod:`refine_core.training.sharded_state`): every rank
writes its own shards, and a checkpoint saved with ``W`` ranks loads with any number of ranks, DDP or FSDP.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from refine_core.distributed.ddp import DDPSync, DistributedContext

logger = logging.getLogger(__name__)

T = TypeVar("T")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run computes in bf16 (:func:`refine_core.runtime.autocast`'s rule)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def shard_model(model: nn.Module, mp_policy: MixedPrecisionPolicy | None = None) -> FSDPModule:
    """``fully_shard`` every decoder block of ``model``, then ``model`` itself (the root); returns the root.

    Each block is one all-gather / reduce-scatter unit; the root unit holds what is left (embeddings, final norm,
    ``lm_head``, tied or not: a tied weight is one parameter and so lands in the root unit once).
    """
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no model.layers to shard; FSDP needs a FastWeightForCausalLM.")
    # fully_shard replaces every parameter by a new DTensor parameter, which drops attributes set on the old one;
    # keep the ``_no_weight_decay`` flag (GatedDeltaNet's A_log / dt_bias) that build_optimizer reads, so the
    # AdamW groups are those of an unsharded run whatever the flagged parameters' shapes.
    no_decay = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    units = [fully_shard(block, **kwargs) for block in blocks]
    root = fully_shard(model, **kwargs)
    for name, param in model.named_parameters():
        if name in no_decay:
            param._no_weight_decay = True  # type: ignore[attr-defined]
    for unit in [*units, root]:  # these setters act on one module's own parameter group, not its children's
        # Sum, not mean, over ranks: the loops already divide by the global token count (module docstring).
        unit.set_gradient_divide_factor(1.0)
        # A custom factor would otherwise become NCCL's PREMUL_SUM, which gloo lacks; a plain SUM (the factor 1
        # then scales nothing) works on both and is NCCL's zero-copy-friendly op.
        unit.set_force_sum_reduction_for_comms(True)
    return root


class FSDPSync(DDPSync):
    """:class:`ReplicaSync` over an FSDP2-sharded ``model`` (sharded in place when this is built).

    Batch sharding, counts, barriers and broadcasts are DDP's (same process group); forward, accumulation, loss
    scaling and the export differ (module docstring).

    Args:
        model: the model on ``ctx.device`` with the same initial weights on every rank (built from the same seed or
            loaded from the same files); ``fully_shard`` keeps each rank's slice of them.
        ctx: from :func:`refine_core.distributed.ddp.init_distributed`.
        precision: ``RunConfig.precision``; bf16 adds the mixed-precision policy.
    """

    def __init__(self, model: nn.Module, ctx: DistributedContext, precision: str = "auto") -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        policy = None
        if uses_bf16(precision, ctx.device):
            # cast_forward_inputs off: a block then gets what it gets without FSDP under bf16 autocast. The default
            # would round every float input to bf16, among them the float32 recurrent state that REFINE's branch
            # engine passes into its continuation (the hidden states are bf16 from the bf16 embeddings anyway).
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        # DDP broadcasts rank 0's weights when it wraps; fully_shard keeps each rank's own slice, so broadcast first
        # (the ranks built the same weights from the same seed or files; this makes sure of it).
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        # The dtype the blocks compute with: bf16 under the policy, else the parameters' own (float32 on CPU).
        self.compute_dtype = policy.param_dtype if policy else next(model.parameters()).dtype
        self._replica: nn.Module | None = None  # see local_model
        self.root = shard_model(model, policy)
        # The branch engine's cut states are views (rows of each layer's state stack) returned by the blocks and the
        # root. FSDP2 warns once per module because an in-place op on such a view would drop its pre-backward hook;
        # nothing writes into them in place (the REFINE tests compare FSDP's gradients with DDP's and one process's).
        warnings.filterwarnings(
            "ignore", message=r"FSDP2-wrapped module \(FSDP(FastWeightForCausalLM|FastWeightBlock)\) returned a view"
        )
        logger.info("FSDP2: %d blocks + root sharded over %d ranks (mixed precision: %s)",
                    len(model.model.layers), ctx.world_size, "bf16/fp32" if policy else "off")

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # No wrapper module: the model's own FSDP hooks gather and reduce around whatever ``fn`` computes.
        return fn(*args, **kwargs)

    @contextlib.contextmanager
    def _accumulate(self, last: bool) -> Iterator[None]:
        # FSDP2's no_sync: recurse=True sets it on every block and the root. Restored even if the step fails.
        self.root.set_requires_gradient_sync(last, recurse=True)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True, recurse=True)

    @property
    def lockstep(self) -> bool:
        return True

    @property
    def sharded(self) -> bool:
        return True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss  # the reduce-scatter sums (divide factor 1), see the module docstring

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # All-gathers every shard (collective); cpu_offload=True keeps the full tensors on rank 0 only, on the CPU.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return state if self.is_main else {}

    def local_model(self, model: nn.Module) -> nn.Module:
        # One persistent replica, refreshed in place: its tensors keep their addresses, so the CUDA-graph decode
        # steps captured for it (refine_core.models.decoding) stay valid from step to step.
        if self._replica is None:
            self._replica = _empty_replica(model, self.ctx.device, self.compute_dtype)
        _gather_into(model, self._replica)
        return self._replica.train(model.training)

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        # FSDP modules cannot be deep-copied; a separate replica with the gathered weights is the frozen copy.
        replica = _empty_replica(model, self.ctx.device, self.compute_dtype)
        _gather_into(model, replica)
        return replica.eval()


def _empty_replica(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A plain (unsharded, hook-free) model of ``model``'s architecture on ``device`` in ``dtype``, uninitialised.

    Built on the meta device first, so no initialisation runs and no second full fp32 copy is ever allocated.
    """
    from refine_core.models import build_model  # models do not depend on distributed; imported where needed

    with torch.device("meta"):
        replica = build_model(model.config).to(dtype)  # on meta: a dtype change allocates nothing
    replica = replica.to_empty(device=device).requires_grad_(False)
    if getattr(model.config, "tie_word_embeddings", False):  # to_empty gives each module its own new tensor
        replica.lm_head.weight = replica.model.embeddings.weight
    ours = [name for name, _ in replica.named_parameters()]
    theirs = [name for name, _ in model.named_parameters()]
    if ours != theirs:  # e.g. a model class this module does not know; never copy into the wrong tensors
        raise TypeError(f"cannot mirror {type(model).__name__}: parameters {theirs[:3]}... vs {ours[:3]}...")
    return replica


@torch.no_grad()
def _gather_into(model: nn.Module, replica: nn.Module) -> None:
    """Copy ``model``'s full current weights into ``replica`` (collective: one all-gather per sharded parameter).

    A parameter is a ``DTensor`` shard, or a plain tensor while its unit is unsharded (the root after a forward);
    either way the copy is the value FSDP computes with: the fp32 shard cast to ``replica``'s dtype is exactly
    FSDP's bf16 all-gather under the mixed-precision policy. Every rank iterates the parameters in the same order.
    """
    targets = dict(replica.named_parameters())
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        targets[name].copy_(full)
    buffers = dict(replica.named_buffers())
    for name, buffer in model.named_buffers():  # buffers are not sharded: every rank holds them whole
        buffers[name].copy_(buffer)
