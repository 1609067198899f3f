"""The REFINE inner step on tiny float64 models: both rollout engines agree, micro-batching changes nothing,
every parameter moves, and the pieces match slow references."""

from __future__ import annotations

import contextlib

import pytest
import torch

from refine_core.algorithm.rollout import (
    derive_seed,
    policy_pass,
    sample_rollouts,
    score_positions,
)
from refine_core.config import RefineConfig
from refine_core.data.batching import left_pad
from refine_core.training.refine_step import _ntp_sum_fn, refine_step, rollout_settings
from tests.models.tiny import VOCAB, tiny_model

EOS = PAD = 1


def small_cfg(**overrides) -> RefineConfig:
    fields = dict(
        batch_size=4,
        mini_batch_size=4,
        micro_batch_size=2,
        num_chunks=3,
        rollout_tokens=3,
        margin=6,
        entropy_window=5,
        lr=1.0,
        grad_clip=1e9,
        nsp_loss_coef=0.7,
    )
    return RefineConfig(**{**fields, **overrides})


def make_docs(seed: int = 0, lengths=(64, 71, 58, 80)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen) for n in lengths]


def positions_for(model, docs, selection: str = "entropy", micro_batch_size: int = 4):
    """Step 0-1 for the four test documents with the small test settings (M = 3, k = 3, margin 6)."""
    return score_positions(
        model,
        docs,
        [0, 1, 2, 3],
        num_chunks=3,
        rollout_tokens=3,
        selection=selection,
        entropy_window=5,
        margin=6,
        seed=0,
        step=0,
        pad_id=PAD,
        micro_batch_size=micro_batch_size,
    )


def sgd_step(arch: str, cfg: RefineConfig, docs, **model_overrides) -> tuple[dict[str, torch.Tensor], dict]:
    """One refine_step with plain SGD at lr 1, so the parameter change is exactly minus the gradient."""
    model = tiny_model(arch, **model_overrides).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = refine_step(
        model,
        optimizer,
        docs,
        [10, 11, 12, 13][: len(docs)],
        cfg,
        seed=5,
        step=3,
        pad_id=PAD,
        eos_id=EOS,
        autocast=contextlib.nullcontext,
    )
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return grads, metrics


@pytest.mark.parametrize("arch", ["delta_net", "gated_deltanet", "lact_swiglu"])
def test_branch_and_faithful_engines_give_the_same_step(arch):
    docs = make_docs()
    g_branch, m_branch = sgd_step(arch, small_cfg(engine="branch"), docs)
    g_faith, m_faith = sgd_step(arch, small_cfg(engine="faithful"), docs)
    for key in ("refine/reward_mean", "refine/ntp_loss", "refine/nsp_loss", "refine/entropy_chosen"):
        assert m_branch[key] == pytest.approx(m_faith[key], rel=1e-9, abs=1e-12), key
    for name in g_branch:
        torch.testing.assert_close(g_branch[name], g_faith[name], rtol=1e-8, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mini_batch_size": 2, "micro_batch_size": 1}, {"rollouts_per_position": 2, "grouping": "position",
                                                         "mini_batch_size": 2}],
    ids=["one-minibatch", "two-minibatches", "G2-per-position"],
)
def test_fused_sampling_equals_a_separate_sampling_pass(overrides):
    """Sampling the first mini-batch's rollouts inside its policy pass changes nothing but the cost."""
    docs = make_docs(2)
    g_fused, m_fused = sgd_step("delta_net", small_cfg(**overrides), docs)
    g_sep, m_sep = sgd_step("delta_net", small_cfg(fused_sampling=False, **overrides), docs)
    for key in ("refine/reward_mean", "refine/reward_std", "refine/ntp_loss", "refine/nsp_loss", "refine/ratio_mean",
                "refine/ratio_max", "refine/clip_frac", "refine/advantage_abs_mean", "refine/frac_zero_std_groups"):
        assert m_fused[key] == pytest.approx(m_sep[key], rel=1e-9, abs=1e-12), key
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_sep[name], rtol=1e-8, atol=1e-11, msg=name)


def test_engines_sample_the_same_rollouts_and_scores_with_groups_per_position():
    model = tiny_model("delta_net")
    docs = make_docs(1)
    cfg = small_cfg(rollouts_per_position=2, grouping="position")
    positions = positions_for(model, docs, selection="entropy", micro_batch_size=2)
    settings = rollout_settings(cfg)
    a = sample_rollouts("branch", model, positions, settings, seed=0, step=0, eos_id=EOS, pad_id=PAD)
    b = sample_rollouts("faithful", model, positions, settings, seed=0, step=0, eos_id=EOS, pad_id=PAD)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.old_logp, b.old_logp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.rollout_hidden, b.rollout_hidden, rtol=1e-9, atol=1e-12)
    assert a.num == 4 * 3 * 2
    # Groups per position: the two samples of one prefix share a group; 12 groups in all.
    assert a.group_ids.tolist()[:4] == [0, 0, 1, 1] and len(set(a.group_ids.tolist())) == 12
    # The two samples of one position are distinct draws (different uniforms), not copies.
    assert not torch.equal(a.tokens[0::2], a.tokens[1::2])


def test_old_logprobs_match_a_full_recompute_reference():
    """Slow reference: re-run the model on prefix + rollout for every rollout, one at a time."""
    model = tiny_model("gated_deltanet")
    docs = make_docs(2)
    positions = positions_for(model, docs, selection="entropy", micro_batch_size=4)
    ro = sample_rollouts(
        "branch", model, positions, rollout_settings(small_cfg()), seed=0, step=0, eos_id=EOS, pad_id=PAD
    )
    for n in range(ro.num):
        doc, r = docs[int(ro.doc_index[n])], int(ro.rollout_start[n])
        seq = torch.cat([doc[:r], ro.tokens[n]])[None]
        out = model(seq)
        logp = torch.log_softmax(out.logits[0, r - 1 : r + 2], -1).gather(-1, ro.tokens[n][:, None]).squeeze(-1)
        torch.testing.assert_close(ro.old_logp[n], logp, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ro.rollout_hidden[n], out.hidden_states[0, r:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ro.target_hidden[n], model(doc[None]).hidden_states[0, r : r + 3])
        assert torch.equal(ro.target_tokens[n], doc[r : r + 3])


@pytest.mark.parametrize("arch", ["delta_net", "gated_deltanet", "lact_swiglu"])
def test_cut_cache_of_one_padded_pass_equals_reading_each_prefix(arch):
    """The branch engine's states: one left-padded pass over several documents, cuts in any order and repeated."""
    model = tiny_model(arch)
    docs = make_docs(3, lengths=(70, 52))
    ids, mask = left_pad(docs, PAD)
    cuts = torch.tensor([[40, 9, 23, 23], [30, 61, 25, 69]])  # padded coordinates; row 1 has 18 pads
    out = model(ids, attention_mask=mask, cuts=cuts)
    torch.testing.assert_close(out.hidden_states, model(ids, attention_mask=mask).hidden_states, rtol=1e-10, atol=1e-10)
    nxt = torch.tensor([[7]])
    for b in range(2):
        for j, cut in enumerate(cuts[b].tolist()):
            direct = model(ids[b : b + 1, :cut], attention_mask=mask[b : b + 1, :cut], use_cache=True).cache
            branch = out.cut_cache.select([b * 4 + j])
            torch.testing.assert_close(
                model(nxt, cache=branch).logits, model(nxt, cache=direct).logits, rtol=1e-10, atol=1e-10
            )


def test_loss_is_invariant_to_the_micro_batch_size():
    docs = make_docs(4)
    g1, m1 = sgd_step("delta_net", small_cfg(micro_batch_size=1), docs)
    g4, m4 = sgd_step("delta_net", small_cfg(micro_batch_size=4), docs)
    assert m1["refine/nsp_loss"] == pytest.approx(m4["refine/nsp_loss"], rel=1e-9, abs=1e-13)
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], rtol=1e-8, atol=1e-11, msg=name)


def test_every_trainable_parameter_changes_after_one_step():
    docs = make_docs(5)
    model = tiny_model("gated_deltanet", dtype=torch.float32).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    metrics = refine_step(
        model,
        optimizer,
        docs,
        [0, 1, 2, 3],
        small_cfg(lr=1e-3, grad_clip=1.0, mini_batch_size=2),
        seed=0,
        step=0,
        pad_id=PAD,
        eos_id=EOS,
        autocast=contextlib.nullcontext,
    )
    assert metrics["refine/optimizer_steps"] == 2
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    # The pad row of the embedding has no gradient by construction (padding_idx, as in fla).
    assert unchanged == [], unchanged
    expected = {
        "refine/ntp_loss",
        "refine/nsp_loss",
        "refine/reward_mean",
        "refine/reward_std",
        "refine/reward_cosine_mean",
        "refine/reward_cosine_std",
        "refine/reward_em_mean",
        "refine/reward_em_std",
        "refine/frac_zero_std_groups",
        "refine/clip_frac",
        "refine/ratio_mean",
        "refine/ratio_max",
        "refine/grad_norm",
        "refine/entropy_chosen",
        "refine/entropy_document",
        "time/entropy_s",
        "time/rollout_s",
        "time/update_s",
    }
    assert expected <= set(metrics)


def test_first_minibatch_is_on_policy():
    """Ratios are exactly 1 in the first mini-batch: the training forward reproduces the old log-probs."""
    docs = make_docs(6)
    _, metrics = sgd_step("delta_net", small_cfg(mini_batch_size=4), docs)
    assert metrics["refine/ratio_max"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["refine/clip_frac"] == 0.0


def test_kl_option_needs_and_uses_a_reference_model():
    docs = make_docs(7)
    model = tiny_model("delta_net").train()
    with pytest.raises(ValueError, match="reference model"):
        refine_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            docs,
            [0, 1, 2, 3],
            small_cfg(kl_coef=0.1),
            seed=0,
            step=0,
            pad_id=PAD,
            eos_id=EOS,
            autocast=contextlib.nullcontext,
        )
    reference = tiny_model("delta_net")
    metrics = refine_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        docs,
        [0, 1, 2, 3],
        small_cfg(kl_coef=0.1),
        seed=0,
        step=0,
        pad_id=PAD,
        eos_id=EOS,
        autocast=contextlib.nullcontext,
        reference_model=reference,
    )
    assert metrics["refine/kl"] == pytest.approx(0.0, abs=1e-12)  # same weights as the reference before the step


def test_ntp_only_baseline_schedules():
    docs = make_docs(8)
    model = tiny_model("delta_net").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(seed=0, step=0, pad_id=PAD, eos_id=EOS, autocast=contextlib.nullcontext)
    matched = refine_step(model, opt, docs, [0, 1, 2, 3], small_cfg(nsp_update=False, mini_batch_size=2), **kw)
    official = refine_step(
        model,
        opt,
        docs,
        [0, 1, 2, 3],
        small_cfg(nsp_update=False, mini_batch_size=2, baseline_schedule="official"),
        **kw,
    )
    assert matched["refine/optimizer_steps"] == 2 and official["refine/optimizer_steps"] == 1


def test_policy_pass_ntp_sum_equals_a_plain_ntp_loss():
    model = tiny_model("delta_net")
    docs = make_docs(9)
    positions = positions_for(model, docs, selection="argmax", micro_batch_size=4)
    settings = rollout_settings(small_cfg())
    ro = sample_rollouts("branch", model, positions, settings, seed=0, step=0, eos_id=EOS, pad_id=PAD)
    fn = _ntp_sum_fn(True, model.lm_head)
    ntp_sum, _ = policy_pass("branch", model, positions, [0, 1, 2, 3], ro, settings, pad_id=PAD, ntp_labels_fn=fn)
    reference = sum(
        torch.nn.functional.cross_entropy(model(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs
    )
    torch.testing.assert_close(ntp_sum, reference)


def test_seeds_are_stable_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(0, s, d) for s in range(20) for d in range(20)}) == 400


@pytest.mark.parametrize(
    "overrides,factor",
    [
        ({"loss_agg_mode": "seq-mean-token-mean"}, 1.0),
        ({"loss_agg_mode": "seq-mean-token-sum"}, 3.0),  # k = 3 tokens per rollout: a token sum is k token means
        ({"loss_agg_mode": "seq-mean-token-sum-norm"}, 1.0),  # Dr. GRPO: (1/N) Σ_i Σ_t ℓ / k
        ({"loss_scale": "micro_batch"}, 1.0),  # every official micro-batch of 2 rollouts holds 2·k tokens
        ({"loss_scale": "micro_batch", "loss_agg_mode": "seq-mean-token-sum-norm"}, 2.0),  # verl: × micro size
        ({"loss_scale": "micro_batch", "ppo_micro_batch_size": 3, "loss_agg_mode": "seq-mean-token-sum"}, 3.0),
    ],
)
def test_loss_aggregation_options_scale_the_ppo_gradient(overrides, factor):
    """Every rollout has k tokens, so each mode is a fixed multiple of the token-mean (NSP term alone, SGD at lr 1)."""
    docs = make_docs(10)
    base = dict(ntp_loss_coef=0.0, mini_batch_size=4, micro_batch_size=2)  # one optimizer step, two micro-batches
    g_ref, m_ref = sgd_step("delta_net", small_cfg(**base), docs)
    g_opt, m_opt = sgd_step("delta_net", small_cfg(**base, **overrides), docs)
    assert m_opt["refine/nsp_loss"] == pytest.approx(factor * m_ref["refine/nsp_loss"], rel=1e-9, abs=1e-13)
    for name in g_ref:
        torch.testing.assert_close(g_opt[name], factor * g_ref[name], rtol=1e-8, atol=1e-11, msg=name)


def test_official_micro_batch_scale_of_the_ntp_term():
    """``loss_scale: micro_batch`` averages the per-micro-batch CE means (official); ours is the mini-batch mean."""
    docs = make_docs(11)  # lengths 64, 71, 58, 80: micro-batches of 2 hold 133 and 136 targets
    cfg = small_cfg(nsp_loss_coef=0.0, loss_scale="micro_batch")
    grads, metrics = sgd_step("delta_net", cfg, docs)

    model = tiny_model("delta_net").train()
    sums = [
        torch.nn.functional.cross_entropy(model(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs
    ]
    counts = [d.numel() - 1 for d in docs]
    official = ((sums[0] + sums[1]) / (counts[0] + counts[1]) + (sums[2] + sums[3]) / (counts[2] + counts[3])) / 2
    ours = sum(sums) / sum(counts)
    assert abs(float(official.detach() - ours.detach())) > 1e-6  # the normalisations differ on these documents
    assert metrics["refine/ntp_loss"] == pytest.approx(float(official.detach()), rel=1e-9)
    reference = torch.autograd.grad(official, list(model.parameters()), allow_unused=True)
    for (name, _), want in zip(model.named_parameters(), reference, strict=True):
        want = torch.zeros_like(grads[name]) if want is None else want
        torch.testing.assert_close(grads[name], want, rtol=1e-7, atol=1e-10, msg=name)


def test_advantage_options_reach_the_gradient():
    """One document, one group: on-policy, the PPO gradient is linear in the advantages, so dividing by the group's
    std scales it by exactly the ratio of the mean |advantage|."""
    doc = make_docs(12)[:1]
    base = dict(batch_size=1, mini_batch_size=1, micro_batch_size=1, ntp_loss_coef=0.0)
    g_std, m_std = sgd_step("delta_net", small_cfg(**base), doc)
    g_centred, m_centred = sgd_step("delta_net", small_cfg(**base, norm_adv_by_std_in_grpo=False), doc)
    factor = m_std["refine/advantage_abs_mean"] / m_centred["refine/advantage_abs_mean"]
    assert factor != pytest.approx(1.0)
    for name in g_std:
        torch.testing.assert_close(g_std[name], factor * g_centred[name], rtol=1e-7, atol=1e-11, msg=name)

    # M = 1: every group is a single rollout. Ours gives it advantage 0 (no policy gradient at all); verl's
    # mean 0 / std 1 gives A = R / (1 + 1e-6).
    single = dict(base, num_chunks=1)
    g_zero, m_zero = sgd_step("delta_net", small_cfg(**single), doc)
    assert m_zero["refine/advantage_abs_mean"] == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in g_zero.values())
    g_official, m_official = sgd_step("delta_net", small_cfg(**single, singleton_advantage="official"), doc)
    assert m_official["refine/advantage_abs_mean"] == pytest.approx(abs(m_official["refine/reward_mean"]) / (1 + 1e-6))
    assert max(float(g.abs().max()) for g in g_official.values()) > 0
