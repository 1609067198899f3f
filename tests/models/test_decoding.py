"""The static decode step (what the CUDA graph captures) and generate's loop over it, run eagerly on the CPU.

The graph itself needs a GPU (tests/gpu/test_decode_graph.py); everything it replays is checked here against the
eager model step and the eager generate loop, exactly (float64).
"""

from __future__ import annotations

import gc

import pytest
import torch

from refine_core.models import FastWeightCache, SamplingConfig, decoding, generate
from refine_core.models.decoding import StaticDecodeStep, cache_signature, decode_step, graphed_decode_step
from refine_core.models.generation import _decode_static
from tests.models.tiny import ARCHS, VOCAB, tiny_model

EOS = 1


def _tensors(cache: FastWeightCache) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for layer in cache.layers:
        out.append(layer.recurrent_state)
        out.extend(layer.conv_states or ())
    return out


def assert_same_cache(a: FastWeightCache, b: FastWeightCache) -> None:
    assert a.seen_tokens == b.seen_tokens
    assert cache_signature(a) == cache_signature(b)
    for x, y in zip(_tensors(a), _tensors(b), strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_decode_step_equals_the_eager_model_step(arch):
    name, overrides = arch
    model = tiny_model(name, **overrides)
    ids = torch.randint(2, VOCAB, (3, 6))
    prefix = model(ids, use_cache=True).cache
    if name == "lact_swiglu":  # host-side chunk/window bookkeeping every token: eager decoding only, said plainly
        with pytest.raises(NotImplementedError, match="decode eagerly"):
            decode_step(model, torch.randint(2, VOCAB, (3, 1)), prefix.clone())
        return
    new = torch.randint(2, VOCAB, (3, 1))
    ref = model(new, cache=prefix, use_cache=True)
    state = prefix.clone()
    logits = decode_step(model, new, state)
    assert logits.dtype == torch.float32 or logits.dtype == torch.float64
    assert torch.equal(logits, ref.logits[:, -1].float())
    state.seen_tokens = ref.cache.seen_tokens
    assert_same_cache(state, ref.cache)


@torch.no_grad()  # as in generate: with gradients the delta rule would take its chunked form
def test_static_step_feeds_like_the_model_and_leaves_the_callers_cache_alone():
    model = tiny_model("gated_deltanet")
    ids = torch.randint(2, VOCAB, (2, 5))
    prefix = model(ids, use_cache=True).cache
    before = prefix.clone()
    step = StaticDecodeStep(model, prefix, batch=2)
    step.load(prefix)
    cache = prefix
    for tok in torch.randint(2, VOCAB, (4, 2)):
        out = model(tok[:, None], cache=cache, use_cache=True)
        cache = out.cache
        assert torch.equal(step.feed(tok), out.logits[:, -1].float())
    assert_same_cache(step.cache(cache.seen_tokens), cache)
    assert_same_cache(prefix, before)


class EosBoost(torch.nn.Module):
    """The tiny model with a per-row bonus on the EOS logit, to make rows finish at chosen steps."""

    def __init__(self, model: torch.nn.Module, boost: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("boost", torch.tensor(boost, dtype=torch.float64))

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if out.logits is not None:
            out.logits[..., EOS] += self.boost[:, None]  # [B, T]
        return out

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, V]`` with the same bonus (generate's prefill asks only for the last position's logits)."""
        logits = self.model.lm_head(hidden)
        logits[..., EOS] += self.boost
        return logits


class CountingStep(StaticDecodeStep):
    restores = 0

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        self.restores += 1
        super().restore(snapshot)


@torch.no_grad()
def _both(model, ids, sampling, **kwargs):
    """Eager generate, and generate's static-step loop (what the graph runs), from the same prefill."""
    eager = generate(model, ids, sampling=sampling, eos_token_id=EOS, **kwargs)
    out = model(ids, use_cache=True)
    step = CountingStep(model, out.cache, ids.shape[0])
    static = _decode_static(
        step,
        sampling,
        out.cache,
        out.logits[:, -1],
        EOS,
        EOS,
        kwargs.get("generator"),
        kwargs.get("uniforms"),
    )
    return eager, static, step.restores


@pytest.mark.parametrize(
    ("boost", "min_new", "max_new", "rollbacks"),
    [
        ([100.0, 100.0, 100.0], 3, 20, 1),  # every row stops at step 3: rolled back from the check at step 7
        ([100.0, -100.0, 100.0], 11, 20, 0),  # rows 0/2 stop at step 11, row 1 never
        ([100.0, 100.0, 100.0], 9, 10, 0),  # stops at the last step, in a window cut short by max_new_tokens
        ([100.0, 100.0, 100.0], 17, 30, 1),  # stops at step 17, rolled back from the check at step 23
        ([100.0, 100.0, 100.0], 0, 2, 1),  # stops at step 0: nothing fed, the prefill cache itself comes back
        ([0.0, 0.0, 0.0], 0, 13, 0),  # greedy never picks EOS here
    ],
)
def test_static_loop_matches_eager_generate_with_early_eos(boost, min_new, max_new, rollbacks):
    model = EosBoost(tiny_model("delta_net"), boost)
    ids = torch.randint(2, VOCAB, (3, 7))
    sampling = SamplingConfig(max_new_tokens=max_new, min_new_tokens=min_new)
    eager, static, restores = _both(model, ids, sampling)
    assert restores == rollbacks
    assert torch.equal(static.tokens, eager.tokens)
    assert torch.equal(static.lengths, eager.lengths)
    assert_same_cache(static.cache, eager.cache)


def test_static_loop_matches_eager_sampling_with_a_generator_and_with_uniforms():
    model = EosBoost(tiny_model("gated_deltanet"), [4.0, 4.0, 4.0, 4.0])  # EOS likely but not certain
    ids = torch.randint(2, VOCAB, (4, 5))
    sampling = SamplingConfig(max_new_tokens=20, min_new_tokens=2, do_sample=True, temperature=1.5, top_k=30)
    eager_gen, static_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    eager = generate(model, ids, sampling=sampling, eos_token_id=EOS, generator=eager_gen)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    step = StaticDecodeStep(model, out.cache, 4)
    static = _decode_static(step, sampling, out.cache, out.logits[:, -1], EOS, EOS, static_gen, None)
    assert torch.equal(static.tokens, eager.tokens) and torch.equal(static.lengths, eager.lengths)
    assert_same_cache(static.cache, eager.cache)
    assert torch.equal(eager_gen.get_state(), static_gen.get_state())  # the RNG ends where the eager loop left it

    uniforms = torch.rand(4, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eager, static, _ = _both(model, ids, sampling, uniforms=uniforms)
    assert torch.equal(static.tokens, eager.tokens) and torch.equal(static.lengths, eager.lengths)
    assert_same_cache(static.cache, eager.cache)


@torch.no_grad()
def test_static_loop_continues_from_a_cache_and_next_logits():
    model = tiny_model("gated_deltanet")
    ids = torch.randint(2, VOCAB, (2, 10))
    out = model(ids, use_cache=True)
    sampling = SamplingConfig(max_new_tokens=6)
    eager = generate(model, ids[:, :0], cache=out.cache, next_logits=out.logits[:, -1], sampling=sampling)
    step = StaticDecodeStep(model, out.cache, 2)
    static = _decode_static(step, sampling, out.cache, out.logits[:, -1], None, 0, None, None)
    assert torch.equal(static.tokens, eager.tokens)
    assert_same_cache(static.cache, eager.cache)


def test_cuda_graph_false_is_the_eager_loop_and_true_on_cpu_says_how_to_fix_it():
    model = tiny_model("delta_net")
    ids = torch.randint(2, VOCAB, (2, 4))
    sampling = SamplingConfig(max_new_tokens=5)
    a = generate(model, ids, sampling=sampling, eos_token_id=EOS)
    b = generate(model, ids, sampling=sampling, eos_token_id=EOS, cuda_graph=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    with pytest.raises(ValueError, match=r"cuda_graph=True needs .* CUDA device.*cuda_graph=False"):
        generate(model, ids, sampling=sampling, cuda_graph=True)


def test_graph_cache_reuses_and_invalidates(monkeypatch):
    """The LRU logic of graphed_decode_step, with the eager static step standing in for a capture."""
    monkeypatch.setattr(decoding, "GraphedDecodeStep", StaticDecodeStep)
    monkeypatch.setattr(decoding, "_GRAPHS", type(decoding._GRAPHS)())
    model = tiny_model("delta_net")
    cache = model(torch.randint(2, VOCAB, (2, 4)), use_cache=True).cache
    first = graphed_decode_step(model, 2, cache, None)
    assert graphed_decode_step(model, 2, cache.clone(), None) is first  # same layout: captured once
    other = model(torch.randint(2, VOCAB, (3, 4)), use_cache=True).cache
    assert graphed_decode_step(model, 3, other, None) is not first  # another batch size: its own graph
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # in place (an optimizer step): still valid, the graph reads the weights
    assert graphed_decode_step(model, 2, cache, None) is first
    model.float()  # new parameter tensors: the capture would read freed memory
    cache32 = cache.map(lambda t: t.float())
    moved = graphed_decode_step(model, 2, cache32, None)
    model.double()
    assert graphed_decode_step(model, 2, cache, None) is not first
    assert not moved.is_valid_for(model)
    for i in range(decoding.MAX_CACHED_GRAPHS + 2):
        graphed_decode_step(model, 4 + i, model(torch.ones(4 + i, 1, dtype=torch.long), use_cache=True).cache, None)
    assert len(decoding._GRAPHS) == decoding.MAX_CACHED_GRAPHS
    del model, first, moved
    gc.collect()
    graphed_decode_step(tiny_model("delta_net", seed=1), 2, cache, None)
    assert len(decoding._GRAPHS) == 1  # the dead model's entries were pruned
