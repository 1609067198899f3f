"""GPU: generate with the captured CUDA-graph decode step against the eager loop on the same card.

Run on the GPU device (fla 0.6.0 wheels carried in): ``pytest -m gpu tests/gpu/test_decode_graph.py -s``. A replay
runs the same kernels on the same inputs as the eager step, so tokens, lengths and the returned cache are expected
to be bitwise identical, in bf16 too.
"""

from __future__ import annotations

import pytest
import torch

from refine_core.models import DeltaNetConfig, GatedDeltaNetConfig, SamplingConfig, build_model, decoding, generate
from refine_core.models.ops import fla_available

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if not fla_available():
    pytest.skip("needs fla 0.6.0 and triton (pip install '.[gpu]')", allow_module_level=True)

VOCAB = 1000
EOS = 1
BATCH = 8


def _model(arch: str, weights: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "delta_net":
        config = DeltaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB, eos_token_id=EOS)
    else:
        config = GatedDeltaNetConfig(
            hidden_size=256, num_hidden_layers=2, num_heads=4, head_dim=64, vocab_size=VOCAB, eos_token_id=EOS
        )
    model = build_model(config).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)  # sharper logits than the 0.02 init: fewer near-ties between tokens
    return model.to(torch.bfloat16) if weights == "bf16" else model


def _amp(weights: str) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights == "fp32+autocast")


def _tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.recurrent_state, *(layer.conv_states or ())) if t is not None]


def assert_same(graph, eager) -> None:
    assert torch.equal(graph.tokens, eager.tokens), (graph.tokens != eager.tokens).float().mean()
    assert torch.equal(graph.lengths, eager.lengths)
    assert graph.cache.seen_tokens == eager.cache.seen_tokens
    for g, e in zip(_tensors(graph.cache), _tensors(eager.cache), strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e), (g.float() - e.float()).abs().max()


def _prompt(seed: int = 0, batch: int = BATCH, length: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # a left-padded row
    return ids, mask


CASES = [
    pytest.param("delta_net", "bf16", id="deltanet-bf16"),
    pytest.param("delta_net", "fp32+autocast", id="deltanet-autocast"),
    pytest.param("gated_deltanet", "fp32+autocast", id="gdn-autocast"),
]


@pytest.mark.parametrize(("arch", "weights"), CASES)
def test_graph_greedy_equals_eager(arch, weights):
    model = _model(arch, weights)
    ids, mask = _prompt()
    sampling = SamplingConfig(max_new_tokens=20)
    with _amp(weights):
        graph = generate(model, ids, mask, sampling, eos_token_id=EOS, cuda_graph=True)
        eager = generate(model, ids, mask, sampling, eos_token_id=EOS, cuda_graph=False)
        auto = generate(model, ids, mask, sampling, eos_token_id=EOS)  # None: the graph on CUDA
    assert_same(graph, eager)
    assert_same(auto, eager)


@pytest.mark.parametrize(("arch", "weights"), CASES)
def test_graph_sampling_with_uniforms_equals_eager(arch, weights):
    model = _model(arch, weights)
    ids, mask = _prompt(1)
    sampling = SamplingConfig(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.2, top_p=0.95)
    uniforms = torch.rand(BATCH, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64).cuda()
    with _amp(weights):
        graph = generate(model, ids, mask, sampling, eos_token_id=EOS, uniforms=uniforms, cuda_graph=True)
        eager = generate(model, ids, mask, sampling, eos_token_id=EOS, uniforms=uniforms, cuda_graph=False)
    assert_same(graph, eager)


def test_graph_continues_from_a_cache_and_next_logits():
    model = _model("delta_net", "fp32+autocast")
    ids, _ = _prompt(3)
    sampling = SamplingConfig(max_new_tokens=12)
    with torch.no_grad(), _amp("fp32+autocast"):
        out = model(ids, use_cache=True)
        before = [t.clone() for t in _tensors(out.cache)]
        kwargs = dict(sampling=sampling, cache=out.cache, next_logits=out.logits[:, -1])
        graph = generate(model, ids[:, :0], cuda_graph=True, **kwargs)
        eager = generate(model, ids[:, :0], cuda_graph=False, **kwargs)
    assert_same(graph, eager)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(out.cache), strict=True))  # caller's cache intact


def _boost_eos(model: torch.nn.Module) -> torch.nn.Module:
    """A bonus on the EOS logit, so that every row stops at ``min_new_tokens`` (inside the captured step too).

    The bonus is a bias on the LM head: ``generate`` calls ``model.lm_head`` on the prefill's last hidden state itself
    (the prefill returns no ``[B, T, V]`` logits), so a wrapper around ``forward`` would miss the first token.
    """
    head = model.lm_head
    boosted = torch.nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device,
                              dtype=head.weight.dtype)
    with torch.no_grad():
        boosted.weight.copy_(head.weight)
        boosted.bias.zero_()
        boosted.bias[EOS] = 100.0
    model.lm_head = boosted
    return model


def test_graph_early_eos_returns_the_eager_cache():
    model = _boost_eos(_model("delta_net", "bf16"))
    ids, mask = _prompt(4)
    sampling = SamplingConfig(max_new_tokens=30, min_new_tokens=11)  # all stop at step 11, checked at step 15
    graph = generate(model, ids, mask, sampling, eos_token_id=EOS, cuda_graph=True)
    eager = generate(model, ids, mask, sampling, eos_token_id=EOS, cuda_graph=False)
    assert graph.lengths.tolist() == [12] * BATCH
    assert_same(graph, eager)


def test_graph_is_reused_and_sees_in_place_weight_updates():
    decoding.clear_decode_graphs()
    model = _model("delta_net", "fp32+autocast")
    ids, mask = _prompt(5)
    sampling = SamplingConfig(max_new_tokens=10)
    with _amp("fp32+autocast"):
        first = generate(model, ids, mask, sampling, cuda_graph=True)
        (step,) = decoding._GRAPHS.values()
    # An optimizer step between autocast regions, as in training: the same tensors, new values. (Inside one region,
    # autocast's own cast cache would hand the *eager* loop the old bf16 weights; the graph never uses that cache.)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    with _amp("fp32+autocast"):
        graph = generate(model, ids, mask, sampling, cuda_graph=True)
    with _amp("fp32+autocast"):
        eager = generate(model, ids, mask, sampling, cuda_graph=False)
    assert list(decoding._GRAPHS.values()) == [step]  # captured once
    assert not torch.equal(first.tokens, graph.tokens)  # the new weights were read (not a stale bf16 cast)
    assert_same(graph, eager)

    model.to(torch.bfloat16)  # new parameter tensors under the same key: the capture is stale and must be redone
    with _amp("fp32+autocast"):
        graph = generate(model, ids, mask, sampling, cuda_graph=True)
    with _amp("fp32+autocast"):
        eager = generate(model, ids, mask, sampling, cuda_graph=False)
    assert len(decoding._GRAPHS) == 1 and step not in decoding._GRAPHS.values()
    assert_same(graph, eager)
    decoding.clear_decode_graphs()
