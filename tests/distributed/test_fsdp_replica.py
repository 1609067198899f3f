"""The pieces FSDP REFINE rests on, in two real processes (gloo over a file store, CPU): the unsharded replica that the
no-grad passes run on, the frozen copy of the KL option, and the rank-agreement check.

References are plain: the replica must hold, bitwise, the weights the model had before it was sharded (then, after an
update, each parameter's own all-gathered ``full_tensor``), and compute, bitwise, what the sharded model computes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from refine_core.algorithm.rollout import continue_pass
from refine_core.distributed.ddp import DDPSync, DistributedContext
from refine_core.distributed.fsdp import FSDPSync
from tests.models.tiny import tiny_model

pytestmark = pytest.mark.slow

WORLD = 2
CASES = [("delta_net", {}), ("delta_net", {"tie_word_embeddings": True}), ("gated_deltanet", {}), ("lact_swiglu", {})]


def _check_replica(ctx: DistributedContext, arch: str, overrides: dict) -> None:
    model = tiny_model(arch, dtype=torch.float32, **overrides).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sync = FSDPSync(model, ctx)
    assert all(isinstance(p, DTensor) for p in model.parameters())

    replica = sync.local_model(model)
    assert replica is not model and replica.training
    assert [name for name, _ in replica.named_parameters()] == list(before)
    for name, p in replica.named_parameters():
        assert not isinstance(p, DTensor) and not p.requires_grad, name
        assert torch.equal(p, before[name]), name
    if overrides.get("tie_word_embeddings"):
        assert replica.lm_head.weight is replica.model.embeddings.weight

    # The replica computes what the sharded model computes (same full weights, same operations).
    ids = torch.randint(2, 90, (2, 37), generator=torch.Generator().manual_seed(ctx.rank))
    with torch.no_grad():
        sharded = model(ids, return_logits=True)
        plain = replica(ids, return_logits=True)
    assert torch.equal(sharded.logits, plain.logits)

    # An update of the shards reaches the replica at the next call, in place (the same tensors: captured CUDA-graph
    # decode steps stay valid); a frozen copy taken before it keeps the old weights.
    frozen = sync.frozen_copy(model)
    assert not frozen.training and frozen is not replica
    pointers = [p.data_ptr() for p in replica.parameters()]
    model(ids).logits.float().square().mean().backward()  # every rank: one FSDP forward and backward
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    again = sync.local_model(model)
    assert again is replica and [p.data_ptr() for p in again.parameters()] == pointers
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p.full_tensor(), q), name
        changed += not torch.equal(q, before[name])
    assert changed > len(before) // 2  # the update moved most tensors, so the refresh was tested
    for name, p in frozen.named_parameters():
        assert torch.equal(p, before[name]), name


def _check_bf16_branch_pass(ctx: DistributedContext) -> None:
    """Mixed precision (bf16 compute, fp32 shards): the branch engine's two calls on the sharded model (the
    documents with cuts, then the rollout tokens from the cut states) compute, bitwise, what the bf16 replica
    computes; in particular the float32 recurrent state enters the continuation's blocks as float32, as it does
    without FSDP (FSDP's default ``cast_forward_inputs`` would round it to bf16). Both without gradients: with them
    the delta rule takes another (differentiable) route, on any model."""
    model = tiny_model("delta_net", dtype=torch.float32).train()
    sync = FSDPSync(model, ctx, precision="bf16")
    replica = sync.local_model(model)
    assert all(p.dtype == torch.bfloat16 for p in replica.parameters())
    gen = torch.Generator().manual_seed(ctx.rank)
    ids, y = torch.randint(2, 90, (2, 40), generator=gen), torch.randint(2, 90, (4, 3), generator=gen)
    cuts = torch.tensor([[10, 20], [15, 30]])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(ids, cuts=cuts, return_logits=False)
        cont = continue_pass(model, y, out.cut_cache)
        ref = replica(ids, cuts=cuts, return_logits=False)
        ref_cont = replica(y, cache=ref.cut_cache)
    assert out.cut_cache.layers[0].recurrent_state.dtype == torch.float32
    assert torch.equal(out.hidden_states, ref.hidden_states)
    assert torch.equal(cont.logits, ref_cont.logits)


def _worker(rank: int, store: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        ctx = DistributedContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"),
                                 backend="gloo")
        torch.set_num_threads(1)
        for arch, overrides in CASES:
            _check_replica(ctx, arch, overrides)
        _check_bf16_branch_pass(ctx)

        sync = DDPSync(torch.nn.Linear(2, 2), ctx)
        sync.check_same(6, "the number of documents")  # equal everywhere: passes
        with pytest.raises(ValueError, match=r"the number of documents differs between the ranks .*\(3 to 4; this"):
            sync.check_same(3 + rank, "the number of documents")
    finally:
        dist.destroy_process_group()


def test_replica_frozen_copy_and_rank_check_in_two_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
