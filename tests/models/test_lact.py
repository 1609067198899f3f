"""LaCT (``model_type: lact_swiglu``): upstream's math and weights, a recurrent cache, absent padding, cut states.

The reference is :mod:`tests.models.lact_reference`, a float64 transcription of upstream's training forward written
independently of ``refine_core.models.lact`` (and checked against upstream's own code on CPU when it was written).
"""

from __future__ import annotations

import json

import pytest
import torch

from refine_core.models import FastWeightCache, build_model, config_from_dict, generate, load_model_dir, save_pretrained
from refine_core.models.configuration import LaCTConfig
from refine_core.models.generation import SamplingConfig
from tests.models.lact_reference import reference_lact_logits

VOCAB, D, LAYERS, ATTN_HEADS, FW_HEADS, CHUNK, WINDOW, RANK = 50, 64, 2, 4, 2, 16, 8, 4
BASE = {
    "model_type": "lact_swiglu", "hidden_size": D, "num_hidden_layers": LAYERS, "num_attn_heads": ATTN_HEADS,
    "num_lact_heads": FW_HEADS, "lact_chunk_size": CHUNK, "window_size": WINDOW, "vocab_size": VOCAB,
    "w0_w2_low_rank": RANK, "initializer_range": 0.2, "eos_token_id": 2, "pad_token_id": 2,
}
VARIANTS = {
    "postnorm-momentum": {},
    "prenorm-muon": {"ttt_prenorm": True, "use_muon": True},
    "nope-qknorm-bias-no-v-silu": {"ttt_nope": True, "no_v_silu": True, "attn_qk_norm": True, "qkv_bias": True},
    "full-rank-inter2-plain": {"w0_w2_low_rank": -1, "inter_multi": 2, "use_momentum": False,
                               "learnable_ttt_scale": False},
}


def lact(extra: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny float64 LaCT whose fast-weight learning rates are large enough that every chunk update matters."""
    torch.manual_seed(seed)
    model = build_model(config_from_dict({**BASE, **(extra or {})})).double()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.lr_proj.bias.normal_(2.0, 0.5)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("length", [CHUNK, 37, 3 * CHUNK])  # no update / a partial last chunk / a complete one
def test_logits_match_upstream_formulas(variant, length):
    extra = VARIANTS[variant]
    model = lact(extra)
    ids = tokens(2, length)
    ref_logits, ref_hidden = reference_lact_logits(model.state_dict(), {**BASE, **extra}, ids)
    out = model(ids)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.hidden_states, ref_hidden, rtol=0, atol=1e-10)


def test_upstream_checkpoint_layout_loads_strictly_and_our_config_reads_back(tmp_path):
    model = lact()
    names = set(model.state_dict())
    layer = "model.layers.0."
    # upstream's names (layer_lact_swiglu.py / modeling_lact.py), written out by hand
    for key in ("attn.qkv.weight", "attn.o_proj.weight", "attn.w0.w_left", "attn.w0.w_right", "attn.w2.w_left",
                "attn.w2.w_right", "attn.w1", "attn.lr_proj.weight", "attn.lr_proj.bias", "attn.qk_scale",
                "attn.qk_offset", "attn.ttt_scale_proj.weight", "attn.ttt_scale_proj.bias", "attn.ttt_norm.weight",
                "attn.momentum_proj.0.weight", "attn.momentum_proj.0.bias", "attn_norm.weight", "mlp_norm.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        assert layer + key in names
    assert model.state_dict()[layer + "attn.w1"].shape == (FW_HEADS, D // FW_HEADS, D // FW_HEADS)
    assert model.state_dict()[layer + "attn.lr_proj.weight"].shape == (3 * FW_HEADS, D)
    save_pretrained(model, tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert written["model_type"] == "lact_swiglu" and written["num_lact_heads"] == FW_HEADS
    assert "num_heads" not in written and "use_short_conv" not in written  # DeltaNet fields are not LaCT's
    loaded = load_model_dir(tmp_path / "ckpt", dtype=torch.float64)
    ids = tokens(1, 40)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_760m_config_has_upstreams_parameter_count():
    config = LaCTConfig(hidden_size=1536, num_hidden_layers=24, num_attn_heads=24, num_lact_heads=4,
                        w0_w2_low_rank=32, use_momentum=True, vocab_size=32000, max_position_embeddings=32768)
    with torch.device("meta"):
        model = build_model(config)
    assert model.num_parameters() == 797_625_312  # models-notes §2.3, measured on upstream's classes


def test_bad_lact_configs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="lr_dim"):
        config_from_dict({**BASE, "lr_dim": 2})
    with pytest.raises(ValueError, match="num_lact_heads"):
        config_from_dict({**BASE, "num_lact_heads": 3})


def test_left_padding_is_absent():
    """A left-padded row gives the logits of the same row alone: pads are no positions, keys or fast-weight input."""
    model = lact()
    ids = tokens(2, 45)
    pads = 7
    padded = ids.clone()
    padded[1, :pads] = 2
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[0], model(ids[:1]).logits[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[1, pads:], model(ids[1:, pads:]).logits[0], rtol=0, atol=1e-10)


def test_the_official_padding_flag_writes_pads_into_the_fast_weights():
    """``pad_into_fast_weights`` reproduces the official code (spec §10.3): the padded row's logits change."""
    ids = tokens(1, 40)
    pads = 5
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[0, :pads], mask[0, :pads] = 2, 0
    ours, official = lact(), lact({"pad_into_fast_weights": True})
    official.load_state_dict(ours.state_dict())
    alone = ours(ids[:, pads:]).logits
    torch.testing.assert_close(ours(padded, attention_mask=mask).logits[:, pads:], alone, rtol=0, atol=1e-10)
    shifted = official(padded, attention_mask=mask).logits[:, pads:]
    assert (shifted - alone).abs().max() > 1e-3
    # without padding the two agree: the flag only changes what pads do
    torch.testing.assert_close(official(ids).logits, ours(ids).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["postnorm-momentum", "prenorm-muon"])
@pytest.mark.parametrize("prompt", [CHUNK, 2 * CHUNK, 20, 2 * CHUNK - 1])  # on a chunk boundary / inside a chunk
def test_cached_decoding_equals_the_full_forward(variant, prompt):
    model = lact(VARIANTS[variant])
    ids = tokens(2, 3 * CHUNK + 5)
    full = model(ids).logits
    out = model(ids[:, :prompt], use_cache=True)
    cache, pieces = out.cache, [out.logits]
    for t in range(prompt, prompt + CHUNK + 2):  # one token at a time, across a chunk boundary
        step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = step.cache
        pieces.append(step.logits)
    rest = model(ids[:, prompt + CHUNK + 2 :], cache=cache, use_cache=True)  # then a block of several tokens
    pieces.append(rest.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)
    assert rest.cache.seen_tokens == ids.shape[1]


def test_cached_decoding_of_left_padded_rows_of_different_lengths():
    model = lact()
    ids = tokens(2, 3 * CHUNK)
    pads, prompt = 9, 30
    prefix = ids[:, :prompt].clone()
    prefix[1, :pads] = 2
    mask = torch.ones_like(prefix)
    mask[1, :pads] = 0
    cache = model(prefix, attention_mask=mask, use_cache=True).cache
    steps = []
    for t in range(prompt, ids.shape[1]):
        step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = step.cache
        steps.append(step.logits)
    steps = torch.cat(steps, 1)
    torch.testing.assert_close(steps[0], model(ids[:1]).logits[0, prompt:], rtol=0, atol=1e-10)
    torch.testing.assert_close(steps[1], model(ids[1:, pads:]).logits[0, prompt - pads :], rtol=0, atol=1e-10)


def test_generate_uses_the_cache_and_matches_greedy_full_forward_decoding():
    model = lact()
    prompt = tokens(2, 2 * CHUNK - 3)
    out = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=8, do_sample=False), eos_token_id=None)
    ids = prompt
    for _ in range(8):  # no cache: re-read everything each token, as upstream's generate does
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, ids[:, prompt.shape[1] :])


@pytest.mark.parametrize("variant", ["postnorm-momentum", "prenorm-muon"])
def test_cut_states_continue_like_rereading_the_prefix_with_the_same_gradients(variant):
    """REFINE's branch rollouts for LaCT: the state after the first ``cuts[b, j]`` positions, from the one document
    pass, continues exactly like re-reading that prefix, and gradients through it equal the re-reading ones."""
    model = lact(VARIANTS[variant])
    ids = tokens(2, 45)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 2
    cuts = torch.tensor([[5, 16, 33, 1], [12, 22, 38, 40]])  # inside chunks, on a boundary, near the start / end
    k = 4
    rollouts = tokens(8, k, seed=3)
    weights = torch.randn(8, k, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    out = model(ids, attention_mask=mask, cuts=cuts)
    branched = model(rollouts, cache=out.cut_cache).logits
    loss = (branched * weights).sum() + out.hidden_states.sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))

    reread, row = [], 0
    for b in range(2):
        for j in range(4):
            c = int(cuts[b, j])
            seq = torch.cat([ids[b, :c], rollouts[row]])[None]
            seq_mask = torch.cat([mask[b, :c], torch.ones(k, dtype=torch.long)])[None]
            reread.append(model(seq, attention_mask=seq_mask).logits[0, -k:])
            row += 1
    reread = torch.stack(reread)
    torch.testing.assert_close(branched, reread, rtol=0, atol=1e-10)
    loss_ref = (reread * weights).sum() + model(ids, attention_mask=mask).hidden_states.sum()
    for got, want in zip(grads, torch.autograd.grad(loss_ref, list(model.parameters())), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cache_rows_select_repeat_and_concatenate():
    model = lact()
    ids = tokens(2, 20)
    cache = model(ids, use_cache=True).cache
    both = FastWeightCache.cat([cache.select([1]), cache.select([0])])
    nxt = tokens(2, 3, seed=5)
    swapped = model(nxt.flip(0), cache=both).logits
    torch.testing.assert_close(swapped.flip(0), model(nxt, cache=cache).logits, rtol=0, atol=1e-12)
    assert cache.repeat_interleave(3).batch_size == 6 and cache.nbytes() > 0


def test_bf16_autocast_with_checkpointing_runs_the_branch_engines_passes():
    """The dtypes the GPU sees (bf16 matmul outputs next to float32 fast q/k and learning rates): cut states, eager
    decoding from them, the k-token pass and the backward through recomputed blocks."""
    torch.manual_seed(0)
    model = build_model(config_from_dict({**BASE, "use_muon": True, "ttt_nope": True})).train()
    model.gradient_checkpointing = True
    ids = tokens(2, 45)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, cuts=torch.tensor([[5, 16, 33], [12, 22, 40]]), return_logits=False)
        rollouts = generate(
            model, torch.empty(6, 0, dtype=torch.long), sampling=SamplingConfig(max_new_tokens=4, min_new_tokens=4),
            eos_token_id=None, cache=out.cut_cache.detach(), next_logits=torch.randn(6, VOCAB),
        ).tokens
        cont = model(rollouts, cache=out.cut_cache)
        loss = cont.logits.float().logsumexp(-1).mean() + out.hidden_states.float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
