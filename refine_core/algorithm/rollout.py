"""REFINE's rollouts: where they start, how they are sampled, and their log-probabilities, with two engines.

The inner step (spec §2) needs, for every document and each of its M selected positions r_j:

* the true continuation ``x[r_j : r_j + k]`` and the model's own hidden states on it (the reward target);
* G sampled continuations ``y`` of k tokens from the prefix ``x[:r_j]``, their log-probabilities under the
  pre-update model and their hidden states (steps 2-3);
* later, with gradients, the log-probabilities of ``y`` under the current weights (step 6), flowing back through
  the whole prefix, i.e. through how the context was written into the fast weights.

Two engines compute the same numbers:

``faithful``
    What the official code does: every rollout re-encodes its own prefix, once to generate, once for the old
    log-probs, and once more with gradients (optionally left-padded to the full document length like the
    official code). Cost: about 3·M·G prefix passes per document on top of the NTP pass.
``branch``
    One pass over a micro-batch of documents yields the NTP loss and, in the same pass, the fast-weight state at
    every cut point of every document (``model(..., cuts=...)``; the delta rule runs all segments of all documents
    side by side, :mod:`refine_core.models.ops.cut_states`); rollouts continue from those states. With gradients,
    the rollout log-probs flow back into the shared document pass. Cost: the NTP pass, one more no-grad pass, and
    k decode steps for all B·M·G rollouts of a step together. This is exact for DeltaNet-style models, whose whole
    past is the state (spec §2.3). Kernel shapes depend only on the micro-batch's padded width, never on where the
    cuts fall, so new cut positions compile nothing.

Sampling is batch-invariant: every rollout draws its k uniforms from its own generator seeded by
``(seed, step, document, position, g)``, so both engines (which batch rollouts differently) and a resumed run
sample the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refine_core.algorithm.selection import select_positions
from refine_core.data.batching import left_pad
from refine_core.models import FastWeightCache, FastWeightForCausalLM, SamplingConfig, generate
from refine_core.models.ops import token_entropy


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (counter-based seeding: no generator state to carry or checkpoint)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def doc_generator(seed: int, step: int, doc_id: int) -> torch.Generator:
    """The generator that picks the positions of one document at one step."""
    return torch.Generator().manual_seed(derive_seed(seed, step, doc_id, 0))


def rollout_uniforms(seed: int, step: int, doc_id: int, position: int, sample: int, k: int) -> torch.Tensor:
    """The k uniforms one rollout samples its tokens with (float64, CPU)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, step, doc_id, 1 + position, sample))
    return torch.rand(k, generator=gen, dtype=torch.float64)


@dataclass
class PositionBatch:
    """Step 1 for a batch of documents: cut points and the true continuations (pre-update model, no grad)."""

    docs: list[torch.Tensor]  # B tensors [L_b] of real tokens (no padding)
    doc_ids: list[int]  # stable ids (dataset indices) that seed the sampling
    rollout_start: torch.Tensor  # [B, M] r_j: index (in the unpadded document) of the first rollout token
    target_tokens: torch.Tensor  # [B, M, k] x[r_j : r_j + k]
    target_hidden: torch.Tensor  # [B, M, k, D] float32: hidden states after reading each true token
    chosen_entropy: torch.Tensor  # [B, M] raw NTP entropy at the last prefix token r_j - 1
    doc_entropy: torch.Tensor  # [B] mean NTP entropy over the document's predictions


@dataclass
class Rollouts:
    """Steps 2-5: sampled continuations, ordered document-major, then position j, then sample g."""

    doc_index: torch.Tensor  # [N] row in the PositionBatch
    position_index: torch.Tensor  # [N] j
    rollout_start: torch.Tensor  # [N] r_j
    tokens: torch.Tensor  # [N, k] sampled y
    target_tokens: torch.Tensor  # [N, k]
    # Pre-update model, temperature-scaled, EOS not masked (spec §10.10); float32 or wider like the states below.
    old_logp: torch.Tensor  # [N, k]
    rollout_hidden: torch.Tensor  # [N, k, D] float32, hidden states after reading each y_i
    target_hidden: torch.Tensor  # [N, k, D] float32
    group_ids: torch.Tensor  # [N] GRPO groups

    @property
    def num(self) -> int:
        return self.tokens.shape[0]

    def subset(self, mask: torch.Tensor) -> Rollouts:
        return Rollouts(**{name: getattr(self, name)[mask] for name in self.__dataclass_fields__})

    @staticmethod
    def cat(parts: Sequence[Rollouts]) -> Rollouts:
        """The rollouts of several parts in the usual order (document-major; within a document as they came)."""
        joined = {name: torch.cat([getattr(p, name) for p in parts]) for name in Rollouts.__dataclass_fields__}
        order = torch.argsort(joined["doc_index"], stable=True)
        return Rollouts(**{name: value[order] for name, value in joined.items()})


def _entropies_and_hidden(
    model: FastWeightForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_tokens: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """NTP entropy ``[B, S]`` (float32) and final hidden states ``[B, S, D]`` without ``[B, S, V]`` logits."""
    hidden = model(input_ids, attention_mask=attention_mask, return_logits=False).hidden_states
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [token_entropy(model.lm_head(flat[i : i + chunk_tokens])) for i in range(0, flat.shape[0], chunk_tokens)]
    return torch.cat(parts).view(hidden.shape[:2]).float(), hidden


@torch.no_grad()
def score_positions(
    model: FastWeightForCausalLM,
    docs: Sequence[torch.Tensor],
    doc_ids: Sequence[int],
    *,
    num_chunks: int,
    rollout_tokens: int,
    selection: str,
    entropy_window: int,
    margin: int,
    seed: int,
    step: int,
    pad_id: int,
    micro_batch_size: int,
    zero_pad_entropy: bool = True,
) -> PositionBatch:
    """Step 0-1 and the targets of step 4: the entropy pass, the chosen cut points, the true continuations.

    ``zero_pad_entropy`` (``refine.zero_pad_entropy``): zero the pads' entropies before the centred smoothing, so a
    document's positions do not depend on how much it was padded; ``False`` smooths over the pads' own entropies as
    the official code does (spec §10.8), which moves the probabilities of the first ``window // 2`` real positions.
    """
    k = rollout_tokens
    starts, tgt_tokens, tgt_hidden, chosen, doc_entropy = [], [], [], [], []
    device = model.device
    for lo in range(0, len(docs), micro_batch_size):
        chunk = list(docs[lo : lo + micro_batch_size])
        ids, mask = left_pad(chunk, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        entropy, hidden = _entropies_and_hidden(model, ids, mask)
        gens = [doc_generator(seed, step, doc_ids[lo + i]) for i in range(len(chunk))]
        picked = select_positions(
            entropy.cpu(), mask.cpu(), num_chunks, mode=selection, window=entropy_window, margin=margin,
            generators=gens, zero_pad_entropy=zero_pad_entropy,
        )
        width = ids.shape[1]
        for i, doc in enumerate(chunk):
            pad = width - doc.numel()
            r = picked.rollout_start[i].to(device)  # [M] in padded coordinates
            offsets = r[:, None] + torch.arange(k, device=device)  # [M, k]
            starts.append((r - pad).cpu())
            tgt_tokens.append(ids[i, offsets].cpu())
            tgt_hidden.append(_fp32_or_wider(hidden[i, offsets]).cpu())
            chosen.append(picked.chosen_entropy[i].float())
            # Mean entropy of the document's own predictions (positions 0..L-2, i.e. those with a next token).
            doc_entropy.append(entropy[i, pad : width - 1].mean().float().cpu())
    return PositionBatch(
        docs=[d.cpu() for d in docs],
        doc_ids=list(doc_ids),
        rollout_start=torch.stack(starts),
        target_tokens=torch.stack(tgt_tokens),
        target_hidden=torch.stack(tgt_hidden),
        chosen_entropy=torch.stack(chosen),
        doc_entropy=torch.stack(doc_entropy),
    )


def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 activations are promoted, spec §10.18; float64 test models stay float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at ``tokens``, in float32 or wider: ``[..., V], [...] -> [...]``."""
    return F.log_softmax(_fp32_or_wider(logits) / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def _cut_batch(
    batch: PositionBatch, rows: Sequence[int], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents ``rows`` left-padded together, with their cut points in padded coordinates ``[b, M]``."""
    docs = [batch.docs[b] for b in rows]
    ids, mask = left_pad(docs, pad_id)
    pads = torch.tensor([ids.shape[1] - d.numel() for d in docs])
    cuts = batch.rollout_start[list(rows)] + pads[:, None]
    return ids.to(device), mask.to(device), cuts


def continue_pass(model: FastWeightForCausalLM, input_ids: torch.Tensor, cache: FastWeightCache):
    """``model(input_ids, cache=cache)`` for tokens that continue a differentiable pass of the same ``model`` call.

    The grad passes of the branch engine read the documents once (:func:`branch_states`) and then the rollout tokens
    from the cut states. Under FSDP2 the second call must not be a second forward of the *root* module: its input
    (the cache) needs gradients, so FSDP would run the root's post-backward (reduce-scatter, then free the
    all-gathered embeddings / ``lm_head``) as soon as the gradient reaches it, while the first call's ``lm_head``
    products are still to be differentiated (their backward then reads freed weights). Calling ``forward`` directly
    skips only the root's hooks: the root's weights are still gathered from the first call (it keeps them after its
    forward), its one post-backward runs at the end of the backward, and each block's own hooks gather and reduce
    it around both of its calls. Without FSDP this is ``model(...)`` exactly (the model has no hooks).
    """
    return model.forward(input_ids, cache=cache)


def branch_states(
    model: FastWeightForCausalLM, batch: PositionBatch, rows: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, FastWeightCache, torch.Tensor]:
    """One pass over documents ``rows``: their states at the cut points and the logits of each first rollout token.

    Returns ``(hidden [b, S, D], ids, mask, cut_cache, first_logits)``: the final hidden states of the left-padded
    documents (for the NTP loss), the cache after each cut (b·M rows ordered (doc, j)) and ``[b·M, V]`` logits of the
    token after each cut, predicted from the last prefix position. Differentiable when grad is enabled.
    """
    ids, mask, cuts = _cut_batch(batch, rows, pad_id, model.device)
    out = model(ids, attention_mask=mask, cuts=cuts, return_logits=False)
    last_prefix = (cuts - 1).to(model.device)  # [b, M]
    index = last_prefix[..., None].expand(*last_prefix.shape, out.hidden_states.shape[-1])
    first = model.lm_head(out.hidden_states.gather(1, index)).flatten(0, 1)
    return out.hidden_states, ids, mask, out.cut_cache, first


def _rollout_index(
    batch: PositionBatch, group_size: int, grouping: str, rows: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Who each rollout of documents ``rows`` (default all) is: document, position, targets and GRPO group."""
    m = batch.rollout_start.shape[1]
    rows = list(range(len(batch.docs))) if rows is None else list(rows)
    doc = torch.tensor(rows, dtype=torch.long).repeat_interleave(m * group_size)
    pos = torch.arange(m).repeat_interleave(group_size).repeat(len(rows))
    groups = doc if grouping == "document" else doc * m + pos
    return {
        "doc_index": doc,
        "position_index": pos,
        "rollout_start": batch.rollout_start[doc, pos],
        "target_tokens": batch.target_tokens[doc, pos],
        "target_hidden": batch.target_hidden[doc, pos],
        "group_ids": groups,
    }


@dataclass
class RolloutSettings:
    """How rollouts are sampled and scored (a view of :class:`refine_core.config.RefineConfig`)."""

    rollout_tokens: int = 5
    rollouts_per_position: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    block_eos: bool = True
    grouping: str = "document"
    pad_prefix_to_full_length: bool = False
    micro_batch_size: int = 2

    def sampling(self) -> SamplingConfig:
        k = self.rollout_tokens
        return SamplingConfig(
            max_new_tokens=k,
            min_new_tokens=k if self.block_eos else 0,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )


def _uniforms(batch: PositionBatch, idx: dict[str, torch.Tensor], settings: RolloutSettings, seed: int, step: int):
    g = settings.rollouts_per_position
    sample = torch.arange(g).repeat(idx["doc_index"].numel() // g)
    rows = [
        rollout_uniforms(seed, step, batch.doc_ids[int(d)], int(p), int(s), settings.rollout_tokens)
        for d, p, s in zip(idx["doc_index"], idx["position_index"], sample, strict=True)
    ]
    return torch.stack(rows)


def _prefix_rows(batch: PositionBatch, doc_index: torch.Tensor, start: torch.Tensor) -> list[torch.Tensor]:
    return [batch.docs[int(d)][: int(r)] for d, r in zip(doc_index, start, strict=True)]


def _pad_prefixes(
    prefixes: list[torch.Tensor], pad_id: int, full_length: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_pad(prefixes, pad_id, length=full_length)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_rollouts(
    engine: str,
    model: FastWeightForCausalLM,
    batch: PositionBatch,
    settings: RolloutSettings,
    *,
    seed: int,
    step: int,
    eos_id: int | None,
    pad_id: int,
    rows: Sequence[int] | None = None,
) -> Rollouts:
    """Steps 2-3: sample G continuations per position and score them under the current (pre-update) model.

    ``rows`` restricts this to some of the documents (default all; at least one).
    """
    rows = list(range(len(batch.docs))) if rows is None else list(rows)
    idx = _rollout_index(batch, settings.rollouts_per_position, settings.grouping, rows)
    uniforms = _uniforms(batch, idx, settings, seed, step)
    sampling = settings.sampling()
    k, g, device = settings.rollout_tokens, settings.rollouts_per_position, model.device
    tokens, old_logp, hidden = [], [], []
    if engine == "faithful":
        rows_per_micro = settings.micro_batch_size * batch.rollout_start.shape[1] * g
        full = max(d.numel() for d in batch.docs) if settings.pad_prefix_to_full_length else None
        for lo in range(0, idx["doc_index"].numel(), rows_per_micro):
            sl = slice(lo, lo + rows_per_micro)
            prefixes = _prefix_rows(batch, idx["doc_index"][sl], idx["rollout_start"][sl])
            ids, mask = _pad_prefixes(prefixes, pad_id, full, device)
            y = generate(
                model, ids, mask, sampling, eos_token_id=eos_id, pad_token_id=pad_id, uniforms=uniforms[sl].to(device)
            ).tokens
            # Old log-probs and rollout states from a separate pass over prefix + y, as the official code does.
            out = model(
                torch.cat([ids, y], 1), attention_mask=torch.cat([mask, torch.ones_like(y)], 1), return_logits=False
            )
            logits = model.lm_head(out.hidden_states[:, -k - 1 : -1])  # no [rows, T, V] logits over the prefixes
            old_logp.append(_token_logp(logits, y, settings.temperature).cpu())
            hidden.append(_fp32_or_wider(out.hidden_states[:, -k:]).cpu())
            tokens.append(y.cpu())
    elif engine == "branch":
        # The states at all cuts of all documents, one pass per micro-batch; then all rollouts decode together.
        caches, firsts = [], []
        for lo in range(0, len(rows), settings.micro_batch_size):
            _, _, _, cut_cache, first = branch_states(model, batch, rows[lo : lo + settings.micro_batch_size], pad_id)
            caches.append(cut_cache)
            firsts.append(first)
        state = FastWeightCache.cat(caches).repeat_interleave(g)  # rows (doc, j, g)
        first = torch.cat(firsts).repeat_interleave(g, dim=0)
        y = generate(
            model,
            first.new_empty((first.shape[0], 0), dtype=torch.long),
            sampling=sampling,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            cache=state,
            next_logits=first,
            uniforms=uniforms.to(device),
        ).tokens
        out = model(y, cache=state)
        logp = torch.cat([first[:, None], out.logits[:, :-1]], 1)
        old_logp.append(_token_logp(logp, y, settings.temperature).cpu())
        hidden.append(_fp32_or_wider(out.hidden_states).cpu())
        tokens.append(y.cpu())
    else:
        raise ValueError(f"unknown rollout engine {engine!r}; use 'branch' or 'faithful'")
    return Rollouts(tokens=torch.cat(tokens), old_logp=torch.cat(old_logp), rollout_hidden=torch.cat(hidden), **idx)


def policy_pass(
    engine: str,
    model: FastWeightForCausalLM,
    batch: PositionBatch,
    doc_rows: Sequence[int],
    rollouts: Rollouts,
    settings: RolloutSettings,
    *,
    pad_id: int,
    ntp_labels_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6 forward with gradients for the documents ``doc_rows`` and exactly their ``rollouts``.

    Args:
        ntp_labels_fn: ``(hidden [B, T, D], ids [B, T], mask [B, T]) -> summed NTP loss`` of documents.

    Returns:
        ``(ntp_sum, logp)``: the documents' summed NTP loss and the current log-probs ``[n, k]`` of the rollout
        tokens, both differentiable; with ``branch`` the rollout log-probs depend on the prefix through the state.
    """
    k, g, device = settings.rollout_tokens, settings.rollouts_per_position, model.device
    if engine == "faithful":
        docs = [batch.docs[b] for b in doc_rows]
        ids, mask = left_pad(docs, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        ntp_sum = ntp_labels_fn(model(ids, attention_mask=mask, return_logits=False).hidden_states, ids, mask)
        prefixes = _prefix_rows(batch, rollouts.doc_index, rollouts.rollout_start)
        full = max(d.numel() for d in batch.docs) if settings.pad_prefix_to_full_length else None
        p_ids, p_mask = _pad_prefixes(prefixes, pad_id, full, device)
        y = rollouts.tokens.to(device)
        out = model(
            torch.cat([p_ids, y], 1), attention_mask=torch.cat([p_mask, torch.ones_like(y)], 1), return_logits=False
        )
        logits = model.lm_head(out.hidden_states[:, -k - 1 : -1])
        return ntp_sum, _token_logp(logits, y, settings.temperature)
    if engine == "branch":
        doc_hidden, ids, mask, cut_cache, first = branch_states(model, batch, doc_rows, pad_id)
        ntp_sum = ntp_labels_fn(doc_hidden, ids, mask)
        y = rollouts.tokens.to(device)  # rows ordered (doc, j, g), the documents in doc_rows order
        state = cut_cache.repeat_interleave(g)
        first = first.repeat_interleave(g, dim=0)
        if k > 1:
            rest = continue_pass(model, y[:, : k - 1], state).logits
        else:
            rest = first.new_zeros(first.shape[0], 0, first.shape[1])
        return ntp_sum, _token_logp(torch.cat([first[:, None], rest], 1), y, settings.temperature)
    raise ValueError(f"unknown rollout engine {engine!r}; use 'branch' or 'faithful'")


def sampling_policy_pass(
    model: FastWeightForCausalLM,
    batch: PositionBatch,
    doc_rows: Sequence[int],
    settings: RolloutSettings,
    *,
    seed: int,
    step: int,
    eos_id: int | None,
    pad_id: int,
    ntp_labels_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    decoder: FastWeightForCausalLM | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2, 3 and the step-6 forward of the ``branch`` engine in one pass, for weights not yet updated this step.

    While the weights are those of the entropy pass (the first mini-batch of a step), sampling the rollouts from the
    cut states of the policy pass itself is exact: the tokens are those :func:`sample_rollouts` would draw (same
    per-rollout uniforms), their old log-probs are the current ones (the ratio is 1, as in the official code's first
    mini-batch, spec §2 step 6.4) and their hidden states are the pre-update ones. It saves the separate no-grad pass
    over these documents.

    ``decoder`` (default ``model``) decodes the tokens (no grad): a model with the same weights whose forwards need
    no collectives, e.g. the unsharded replica of an FSDP run (``ReplicaSync.local_model``), since decoding may stop
    early at EOS and its number of forwards must not have to match across ranks.

    Returns:
        ``(ntp_sum, logp, tokens, rollout_hidden)``: as :func:`policy_pass`, plus the sampled ``[n, k]`` tokens and
        their detached float32 hidden states ``[n, k, D]``, rows ordered (document, j, g).
    """
    idx = _rollout_index(batch, settings.rollouts_per_position, settings.grouping, doc_rows)
    uniforms = _uniforms(batch, idx, settings, seed, step)
    g = settings.rollouts_per_position
    doc_hidden, ids, mask, cut_cache, first = branch_states(model, batch, doc_rows, pad_id)
    ntp_sum = ntp_labels_fn(doc_hidden, ids, mask)
    state = cut_cache.repeat_interleave(g)
    first = first.repeat_interleave(g, dim=0)
    with torch.no_grad():
        y = generate(
            decoder if decoder is not None else model,
            first.new_empty((first.shape[0], 0), dtype=torch.long),
            sampling=settings.sampling(),
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            cache=state.detach(),
            next_logits=first.detach(),
            uniforms=uniforms.to(model.device),
        ).tokens
    out = continue_pass(model, y, state)
    logp = _token_logp(torch.cat([first[:, None], out.logits[:, :-1]], 1), y, settings.temperature)
    return ntp_sum, logp, y, _fp32_or_wider(out.hidden_states.detach())


def rollouts_from_pass(
    batch: PositionBatch, doc_rows: Sequence[int], settings: RolloutSettings, logp: torch.Tensor, tokens: torch.Tensor,
    rollout_hidden: torch.Tensor,
) -> Rollouts:
    """The :class:`Rollouts` that :func:`sampling_policy_pass` sampled (old log-probs = its detached log-probs)."""
    idx = _rollout_index(batch, settings.rollouts_per_position, settings.grouping, doc_rows)
    return Rollouts(tokens=tokens.cpu(), old_logp=logp.detach().cpu(), rollout_hidden=rollout_hidden.cpu(), **idx)
