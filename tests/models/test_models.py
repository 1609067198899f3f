"""Model-level equivalences on CPU: cached decoding == full forward, left padding == no padding, cache ops."""

from __future__ import annotations

import pytest
import torch

from refine_core.models import FastWeightCache
from tests.models.tiny import ARCHS, VOCAB, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_token_by_token_decoding_equals_full_forward(arch):
    name, overrides = arch
    model = tiny_model(name, **overrides)
    ids = torch.randint(2, VOCAB, (2, 37))
    full = model(ids).logits
    # Prefill 20 tokens in one call, then feed the rest one at a time through the cache.
    out = model(ids[:, :20], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(20, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)
    assert cache.seen_tokens == ids.shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_unpadded_sequences(arch):
    name, overrides = arch
    model = tiny_model(name, **overrides)
    lengths = [23, 9, 16]
    seqs = [torch.randint(2, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    pad = model.config.pad_id
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    batch = model(ids, attention_mask=mask, use_cache=True)
    for row, seq in enumerate(seqs):
        single = model(seq[None], use_cache=True)
        torch.testing.assert_close(batch.logits[row, width - len(seq) :], single.logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batch.hidden_states[row, width - len(seq) :], single.hidden_states[0])
        # The state after the padded row is the state after the bare sequence: decoding continues identically.
        nxt = torch.tensor([[5]])
        a = model(nxt, cache=batch.cache.select([row]), use_cache=True).logits
        b = model(nxt, cache=single.cache, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_cache_is_not_modified_and_branches_are_independent():
    model = tiny_model("delta_net")
    ids = torch.randint(2, VOCAB, (2, 12))
    cache = model(ids, use_cache=True).cache
    before = cache.clone()
    branches = cache.repeat_interleave(3)
    assert branches.batch_size == 6
    model(torch.randint(2, VOCAB, (6, 4)), cache=branches, use_cache=True)
    for a, b in zip(cache.layers, before.layers, strict=True):
        assert torch.equal(a.recurrent_state, b.recurrent_state)
        assert all(torch.equal(x, y) for x, y in zip(a.conv_states, b.conv_states, strict=True))
    # Row 4 of the repeated cache is a copy of row 1 of the original.
    for a, b in zip(branches.layers, cache.layers, strict=True):
        assert torch.equal(a.recurrent_state[4], b.recurrent_state[1])
    assert cache.nbytes() > 0
    assert FastWeightCache.empty(2).batch_size == 0


def test_backward_reaches_every_parameter():
    model = tiny_model("gated_deltanet", dtype=torch.float32).train()
    ids = torch.randint(2, VOCAB, (2, 70))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "model.embeddings.weight":
            assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(2, VOCAB, (2, 40))
    grads = []
    for ckpt in (False, True):
        model = tiny_model("delta_net", dtype=torch.float64).train()
        model.gradient_checkpointing = ckpt
        model(ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_cat_of_caches_continues_each_row_as_before():
    model = tiny_model("gated_deltanet")
    a, b = torch.randint(2, VOCAB, (1, 9)), torch.randint(2, VOCAB, (2, 5))
    ca, cb = model(a, use_cache=True).cache, model(b, use_cache=True).cache
    nxt = torch.randint(2, VOCAB, (3, 3))
    joint = model(nxt, cache=FastWeightCache.cat([ca, cb])).logits
    torch.testing.assert_close(joint[:1], model(nxt[:1], cache=ca).logits)
    torch.testing.assert_close(joint[1:], model(nxt[1:], cache=cb).logits)
