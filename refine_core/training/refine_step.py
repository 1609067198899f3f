"""One REFINE inner step on a batch of documents (spec §2), shared by mid-training, post-training and TTT.

In the algorithm's order:

0. an entropy pass of the current model over the documents (no grad);
1. M positions per document chosen from the smoothed NTP entropy;
2. G rollouts of k tokens per position, sampled from the prefix (pre-update model);
3. their old log-probabilities and hidden states;
4. rewards against the true continuation (cosine of hidden states, exact match, or both; float32);
5. GRPO advantages within groups;
6. for each mini-batch of documents with its rollouts: c_ntp · NTP + c_nsp · PPO-clip (+ optional KL), summed
   over micro-batches with global token counts, then one clipped AdamW step (skipped if the norm is not finite).

With the ``branch`` engine (and ``fused_sampling``, the default), steps 2-3 of the first mini-batch's documents run
inside that mini-batch's own policy pass: its weights are still the pre-update ones, so the rollouts, their old
log-probabilities (ratio exactly 1) and hidden states are the same as from a separate no-grad pass, which this saves.
The other mini-batches' rollouts are sampled before the first update, as the algorithm requires. ``time/rollout_s``
then covers only those; the fused sampling is counted in ``time/update_s``.

``nsp_update=False`` runs only the NTP half on the same documents (the NTP-only baseline), with one optimizer
step per mini-batch (``matched``) or per batch (``official``, spec §10.7).

Data-parallel (``sync`` from a torchrun session, :mod:`refine_core.distributed.ddp`): ``docs`` are this rank's
share of the batch, split so that every mini-batch is split evenly; each rank runs steps 0-5 on its documents. GRPO
groups never span documents (``grouping`` is per document or per position), so the advantages need nothing from
the other ranks. In step 6 the token counts of each mini-batch are summed over ranks, the loss is scaled by the
number of ranks (DDP averages gradients) and the gradients are all-reduced once per optimizer step, so the update
equals the single-process one on the whole batch.

FSDP2 (``parallel: fsdp``, :mod:`refine_core.distributed.fsdp`): the same, except that the reduce-scatter sums (no
scaling), that every rank must run the same forwards in the same order (each all-gathers weights), and that the
model's parameters are shards. So steps 0-3 (no grad) run on ``sync.local_model(model)``, an unsharded replica with
the step's starting weights whose forwards need no collectives (the model itself without FSDP); the fused sampling
decodes with it too (``time/gather_s`` is the replica's refresh). The grad passes of step 6 use the sharded model;
there is one per micro-batch and every rank has the same number of documents (checked), hence of micro-batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from refine_core.algorithm.grpo import (
    aggregate_loss,
    group_advantages,
    kl_penalty,
    official_micro_batch_loss,
    policy_loss_stats,
    ppo_clip_token_losses,
)
from refine_core.algorithm.rewards import RewardBreakdown, compute_rewards
from refine_core.algorithm.rollout import (
    PositionBatch,
    Rollouts,
    RolloutSettings,
    policy_pass,
    rollouts_from_pass,
    sample_rollouts,
    sampling_policy_pass,
    score_positions,
)
from refine_core.config import RefineConfig
from refine_core.data.batching import left_pad
from refine_core.distributed.ddp import ReplicaSync
from refine_core.models import FastWeightForCausalLM
from refine_core.training.losses import count_targets, lm_loss_sum, ntp_targets
from refine_core.training.optim import clip_and_step
from refine_core.training.timing import PhaseTimer


def rollout_settings(cfg: RefineConfig) -> RolloutSettings:
    return RolloutSettings(
        rollout_tokens=cfg.rollout_tokens,
        rollouts_per_position=cfg.rollouts_per_position,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        block_eos=cfg.block_eos,
        grouping=cfg.grouping,
        pad_prefix_to_full_length=cfg.pad_prefix_to_full_length,
        micro_batch_size=cfg.micro_batch_size,
    )


def _ntp_sum_fn(mask_pad: bool, lm_head: nn.Module) -> Callable:
    """``(hidden, ids, mask) -> summed NTP loss`` with ``lm_head``'s weight as it is when called.

    Read at call time, not captured: under FSDP the registered weight is the sharded ``DTensor`` between passes and
    the all-gathered tensor only after the model's forward.
    """

    def ntp_sum(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(hidden[:, :-1], lm_head.weight, ntp_targets(ids, mask, mask_pad))

    return ntp_sum


def _ntp_micro_sum(model: FastWeightForCausalLM, ids: torch.Tensor, mask: torch.Tensor, mask_pad: bool) -> torch.Tensor:
    hidden = model(ids, attention_mask=mask, return_logits=False).hidden_states
    return _ntp_sum_fn(mask_pad, model.lm_head)(hidden, ids, mask)


def _ntp_count(docs: Sequence[torch.Tensor], pad_id: int, mask_pad: bool) -> int:
    ids, mask = left_pad(list(docs), pad_id)
    return count_targets(ntp_targets(ids, mask, mask_pad))


def ntp_only_step(
    model: FastWeightForCausalLM,
    optimizer: torch.optim.Optimizer,
    docs: Sequence[torch.Tensor],
    cfg: RefineConfig,
    *,
    pad_id: int,
    autocast: Callable[[], AbstractContextManager[None]],
    sync: ReplicaSync | None = None,
) -> dict[str, float]:
    """The NTP-only baseline on the same documents as a REFINE step."""
    device = model.device
    sync = sync or ReplicaSync()
    per_step = (cfg.mini_batch_size if cfg.baseline_schedule == "matched" else cfg.batch_size) // sync.world_size
    losses, norms, skipped = [], [], 0
    for lo in range(0, len(docs), per_step):
        group = list(docs[lo : lo + per_step])
        total = sync.total_count(_ntp_count(group, pad_id, cfg.mask_pad_in_loss))
        loss_sum = 0.0
        starts = range(0, len(group), cfg.micro_batch_size)
        scale = _LossScale(cfg, sync, pad_id, n_rows=len(group), rollouts_per_doc=0, n_micro=len(starts))
        for mlo in starts:
            micro_docs = group[mlo : mlo + cfg.micro_batch_size]
            ids, mask = left_pad(micro_docs, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with sync.accumulate(last=mlo == starts[-1]):
                with autocast():
                    part = sync.forward(_ntp_micro_sum, model, ids, mask, cfg.mask_pad_in_loss)
                ntp = scale.ntp(part, micro_docs=micro_docs, mini_total=total)
                sync.scale(cfg.ntp_loss_coef * ntp).backward()
            loss_sum += float(ntp.detach())
        (loss_sum,) = sync.total(loss_sum)
        grad_norm, took = clip_and_step(model, optimizer, cfg.grad_clip)
        losses.append(loss_sum)
        norms.append(grad_norm)
        skipped += not took
    return {
        "refine/ntp_loss": sum(losses) / len(losses),
        "refine/grad_norm": sum(norms) / len(norms),
        "refine/optimizer_steps": float(len(losses)),
        "refine/skipped_steps": float(skipped),
    }


def refine_step(
    model: FastWeightForCausalLM,
    optimizer: torch.optim.Optimizer,
    docs: Sequence[torch.Tensor],
    doc_ids: Sequence[int],
    cfg: RefineConfig,
    *,
    seed: int,
    step: int,
    pad_id: int,
    eos_id: int | None,
    autocast: Callable[[], AbstractContextManager[None]],
    reference_model: FastWeightForCausalLM | None = None,
    sync: ReplicaSync | None = None,
) -> dict[str, float]:
    """Run spec §2 steps 0-6 on ``docs`` (1-D token tensors without padding); returns the step's metrics.

    ``doc_ids`` are stable document ids (dataset indices) that, with ``seed`` and ``step``, seed the position and
    rollout sampling, so a resumed run and both rollout engines draw the same positions and tokens. ``sync``: this
    rank's view of a data-parallel run (see the module docstring); ``None`` is a single process.
    """
    sync = sync or ReplicaSync()
    if sync.distributed:  # the same number of mini- and micro-batches, hence of collectives, on every rank
        sync.check_same(len(docs), "the number of documents of a REFINE step")
    if cfg.mini_batch_size % sync.world_size:
        raise ValueError(
            f"refine.mini_batch_size={cfg.mini_batch_size} is not a multiple of the {sync.world_size} ranks of this "
            "torchrun job; every rank needs the same number of documents in each optimizer step."
        )
    if not cfg.nsp_update:
        return ntp_only_step(model, optimizer, docs, cfg, pad_id=pad_id, autocast=autocast, sync=sync)
    device = model.device
    timer = PhaseTimer(device)
    settings = rollout_settings(cfg)
    k = cfg.rollout_tokens
    # The no-grad passes (steps 0-3) run on a model whose forwards need no collectives, so ranks may run different
    # numbers of them: the model itself, or under FSDP a replica with the gathered weights (module docstring).
    with timer("time/gather_s") if sync.sharded else nullcontext():
        local = sync.local_model(model)

    # 0-1. Entropy pass, positions, true continuations and their hidden states (pre-update model).
    with timer("time/entropy_s"), autocast():
        positions: PositionBatch = score_positions(
            local,
            docs,
            doc_ids,
            num_chunks=cfg.num_chunks,
            rollout_tokens=k,
            selection=cfg.selection,
            entropy_window=cfg.entropy_window,
            margin=cfg.margin,
            seed=seed,
            step=step,
            pad_id=pad_id,
            micro_batch_size=cfg.micro_batch_size,
            zero_pad_entropy=cfg.zero_pad_entropy,
        )
    mini = cfg.mini_batch_size // sync.world_size  # this rank's documents per optimizer step
    # The branch engine samples the first mini-batch's rollouts inside its policy pass (exact: no update yet).
    fused = cfg.engine == "branch" and cfg.fused_sampling and cfg.kl_coef == 0
    fused_rows = set(range(min(mini, len(docs)))) if fused else set()
    rest_rows = [b for b in range(len(docs)) if b not in fused_rows]
    # 2-3. Rollouts with their old log-probs and hidden states (pre-update model, no grad).
    rest = None
    if rest_rows:
        with timer("time/rollout_s"), autocast():
            rest = sample_rollouts(
                cfg.engine, local, positions, settings, seed=seed, step=step, eos_id=eos_id, pad_id=pad_id,
                rows=rest_rows,
            )
    # 4-5. Rewards in float32 and GRPO advantages (groups never span documents: per part is the same as over all).
    rest_advantages = None if rest is None else _advantages(cfg, rest)
    ref_logp = None
    if cfg.kl_coef > 0:
        if reference_model is None:
            raise ValueError("refine.kl_coef > 0 needs a reference model")
        with timer("time/reference_s"), torch.no_grad(), autocast():
            ref_logp = _all_logps(cfg, reference_model, positions, rest, settings, pad_id)

    # 6. Mini-batches of documents with exactly their rollouts; one optimizer step each.
    sums: dict[str, float] = defaultdict(float)
    stats: list[dict[str, float]] = []
    norms, skipped, n_mini = [], 0, 0
    parts: list[Rollouts] = [] if rest is None else [rest]
    ntp_fn = _ntp_sum_fn(cfg.mask_pad_in_loss, model.lm_head)
    m_g = cfg.num_chunks * cfg.rollouts_per_position
    with timer("time/update_s"):
        for lo in range(0, len(docs), mini):
            rows = list(range(lo, min(lo + mini, len(docs))))
            # Global token counts of the mini-batch (summed over ranks).
            ntp_total = sync.total_count(_ntp_count([positions.docs[b] for b in rows], pad_id, cfg.mask_pad_in_loss))
            rollout_total = sync.total_count(len(rows) * m_g * k)
            starts = range(0, len(rows), cfg.micro_batch_size)
            scale = _LossScale(cfg, sync, pad_id, n_rows=len(rows), rollouts_per_doc=m_g, n_micro=len(starts))
            for mlo in starts:
                micro = rows[mlo : mlo + cfg.micro_batch_size]
                with sync.accumulate(last=mlo == starts[-1]):
                    if micro[0] in fused_rows:
                        with timer("time/policy_forward_s"), autocast():
                            ntp_sum, logp, tokens, hidden = sync.forward(
                                sampling_policy_pass, model, positions, micro, settings, seed=seed, step=step,
                                eos_id=eos_id, pad_id=pad_id, ntp_labels_fn=ntp_fn, decoder=local,
                            )
                        part = rollouts_from_pass(positions, micro, settings, logp, tokens, hidden)
                        parts.append(part)
                        part_advantages = _advantages(cfg, part)
                        sel = None
                    else:
                        sel = torch.isin(rest.doc_index, torch.tensor(micro))
                        part, part_advantages = rest.subset(sel), rest_advantages[sel]
                        with timer("time/policy_forward_s"), autocast():
                            ntp_sum, logp = sync.forward(
                                policy_pass, cfg.engine, model, positions, micro, part, settings, pad_id=pad_id,
                                ntp_labels_fn=ntp_fn,
                            )
                    terms = ppo_clip_token_losses(
                        logp,
                        part.old_logp.to(device),
                        part_advantages.to(device),
                        clip_eps=cfg.clip_eps,
                        dual_clip=cfg.dual_clip,
                        log_ratio_clamp=cfg.log_ratio_clamp,
                        clip_low=cfg.clip_ratio_low,
                        clip_high=cfg.clip_ratio_high,
                    )
                    # Every rollout has k tokens: EOS cannot end one early (spec §2 step 2: the mask is all ones).
                    ones = torch.ones_like(terms.losses)
                    ppo = scale.ppo(terms.losses, ones, first_row=(micro[0] - lo) * m_g)
                    ntp = scale.ntp(ntp_sum, micro_docs=[positions.docs[b] for b in micro], mini_total=ntp_total)
                    loss = cfg.ntp_loss_coef * ntp + cfg.nsp_loss_coef * ppo
                    if ref_logp is not None:
                        kl = kl_penalty(logp, ref_logp[sel].to(device), cfg.kl_kind)
                        loss = loss + cfg.kl_coef * kl.sum() / rollout_total
                        sums["refine/kl"] += float(kl.detach().sum()) / rollout_total
                    with timer("time/backward_s"):
                        sync.scale(loss).backward()
                sums["refine/ntp_loss"] += float(ntp.detach())
                sums["refine/nsp_loss"] += float(ppo.detach())
                stats.append({**policy_loss_stats(terms, ones), "tokens": float(ones.sum())})
            grad_norm, took = clip_and_step(model, optimizer, cfg.grad_clip)
            norms.append(grad_norm)
            skipped += not took
            n_mini += 1

    rollouts = Rollouts.cat(parts)
    rewards = _rewards(cfg, rollouts)
    advantages = _group_advantages(cfg, rewards.reward, rollouts.group_ids)
    weight = torch.tensor([s["tokens"] for s in stats])
    # Each rank holds its part of the global token means: add them up (the identity in one process).
    sums = dict(zip(sums, sync.total(*sums.values()), strict=True))
    metrics = {name: value / n_mini for name, value in sums.items()}
    metrics.update(_reward_metrics(rewards, rollouts.group_ids))
    metrics.update(
        {
            "refine/clip_frac": float((torch.tensor([s["clip_frac"] for s in stats]) * weight).sum() / weight.sum()),
            "refine/dual_clip_frac": float(
                (torch.tensor([s["dual_clip_frac"] for s in stats]) * weight).sum() / weight.sum()
            ),
            "refine/ratio_mean": float((torch.tensor([s["ratio_mean"] for s in stats]) * weight).sum() / weight.sum()),
            "refine/ratio_max": max(s["ratio_max"] for s in stats),
            "refine/grad_norm": sum(norms) / len(norms),
            "refine/optimizer_steps": float(n_mini),
            "refine/skipped_steps": float(skipped),
            "refine/advantage_abs_mean": float(advantages.abs().mean()),
            "refine/entropy_chosen": float(positions.chosen_entropy.mean()),
            "refine/entropy_document": float(positions.doc_entropy.mean()),
            "refine/rollouts": float(rollouts.num),
            **timer.seconds,
        }
    )
    return metrics


class _LossScale:
    """How one mini-batch's micro-batch losses are normalised (``refine.loss_scale``, spec §2 step 6.2-6.3).

    ``mini_batch`` (ours): every micro-batch divides by the counts of the whole mini-batch (summed over ranks), so
    the micro-batch losses add up to the mini-batch's NTP token-mean and PPO ``loss_agg_mode`` value whatever the
    memory micro-batch. ``micro_batch`` (official): each micro-batch's own mean, divided by the number of
    micro-batches; the two agree when every micro-batch holds the same number of tokens, which for the NTP term
    needs documents of equal length.
    """

    def __init__(
        self, cfg: RefineConfig, sync: ReplicaSync, pad_id: int, *, n_rows: int, rollouts_per_doc: int, n_micro: int
    ):
        self.cfg, self.pad_id = cfg, pad_id
        k = cfg.rollout_tokens
        self.sequences = sync.total_count(n_rows * rollouts_per_doc)
        self.tokens = self.sequences * k
        if cfg.loss_scale == "micro_batch":
            self.ntp_micro = sync.total_count(n_micro)
            self.ppo_micro = sync.total_count(-(-n_rows * rollouts_per_doc // cfg.ppo_micro_batch_size))

    def ppo(self, losses: torch.Tensor, mask: torch.Tensor, *, first_row: int) -> torch.Tensor:
        mode, k = self.cfg.loss_agg_mode, self.cfg.rollout_tokens
        if self.cfg.loss_scale == "micro_batch":
            return official_micro_batch_loss(
                losses, mask, mode, first_row=first_row, micro_size=self.cfg.ppo_micro_batch_size,
                num_micro_batches=self.ppo_micro,
            )
        # seq-mean-token-sum-norm: Dr. GRPO's (1/N) Σ_i Σ_t ℓ / k; verl 0.5 leaves the 1/N out, so its value grows
        # with the micro-batch size (loss_scale: micro_batch reproduces that).
        return aggregate_loss(
            losses, mask, mode, num_sequences=self.sequences, num_tokens=self.tokens, horizon=k * self.sequences
        )

    def ntp(self, ntp_sum: torch.Tensor, *, micro_docs: Sequence[torch.Tensor], mini_total: int) -> torch.Tensor:
        if self.cfg.loss_scale == "micro_batch":
            own = _ntp_count(micro_docs, self.pad_id, self.cfg.mask_pad_in_loss)
            return ntp_sum / max(own, 1) / self.ntp_micro
        return ntp_sum / max(mini_total, 1)


def _rewards(cfg: RefineConfig, rollouts: Rollouts) -> RewardBreakdown:
    return compute_rewards(
        cfg.reward, rollouts.rollout_hidden, rollouts.target_hidden, rollouts.tokens, rollouts.target_tokens
    )


def _advantages(cfg: RefineConfig, rollouts: Rollouts) -> torch.Tensor:
    return _group_advantages(cfg, _rewards(cfg, rollouts).reward, rollouts.group_ids)


def _group_advantages(cfg: RefineConfig, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    return group_advantages(
        rewards, group_ids, singleton=cfg.singleton_advantage, norm_by_std=cfg.norm_adv_by_std_in_grpo
    )


def _all_logps(
    cfg: RefineConfig,
    model: FastWeightForCausalLM,
    positions: PositionBatch,
    rollouts: Rollouts,
    settings: RolloutSettings,
    pad_id: int,
) -> torch.Tensor:
    """Log-probs ``[N, k]`` of every rollout under ``model`` (used for the reference model of the KL option)."""
    out = torch.empty_like(rollouts.old_logp)
    ntp_fn = _ntp_sum_fn(True, model.lm_head)
    for lo in range(0, len(positions.docs), cfg.micro_batch_size):
        micro = list(range(lo, min(lo + cfg.micro_batch_size, len(positions.docs))))
        sel = torch.isin(rollouts.doc_index, torch.tensor(micro))
        _, logp = policy_pass(
            cfg.engine, model, positions, micro, rollouts.subset(sel), settings, pad_id=pad_id, ntp_labels_fn=ntp_fn
        )
        out[sel] = logp.to(out.dtype).cpu()
    return out


def _reward_metrics(rewards: RewardBreakdown, group_ids: torch.Tensor) -> dict[str, float]:
    """Mean and std of every reward part, and the fraction of GRPO groups whose rewards are all equal."""
    out = {}
    parts = {"reward": rewards.reward, "reward_cosine": rewards.cosine, "reward_em": rewards.exact_match}
    for name, values in parts.items():
        out[f"refine/{name}_mean"] = float(values.mean())
        out[f"refine/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
    # A group learns nothing when its rewards are all equal (GRPO advantages are then 0).
    _, inverse = torch.unique(group_ids, return_inverse=True)
    spread = torch.zeros(int(inverse.max()) + 1).scatter_reduce(0, inverse, rewards.reward.float(), "amax")
    spread -= torch.zeros_like(spread).scatter_reduce(0, inverse, rewards.reward.float(), "amin", include_self=False)
    out["refine/frac_zero_std_groups"] = float((spread.abs() < 1e-8).float().mean())
    return out
