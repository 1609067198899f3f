"""Generation through the cache against a slow reference that re-encodes the whole sequence for every token."""

from __future__ import annotations

import pytest
import torch

from refine_core.models import SamplingConfig, generate
from refine_core.models.generation import process_logits
from tests.models.tiny import VOCAB, tiny_model

EOS = 1


def reference_generate(model, prompt: torch.Tensor, sampling: SamplingConfig, generator=None) -> list[int]:
    """Obviously correct: full forward over prompt + generated tokens at every step, one row at a time."""
    seq = prompt.tolist()
    new = []
    for step in range(sampling.max_new_tokens):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        if step < sampling.min_new_tokens:
            logits[EOS] = float("-inf")
        if sampling.do_sample:
            probs = process_logits(logits[None], sampling).softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=generator))
        else:
            tok = int(logits.argmax())
        new.append(tok)
        seq.append(tok)
        if tok == EOS:
            break
    return new


@pytest.mark.parametrize("arch", ["delta_net", "gated_deltanet"])
def test_greedy_left_padded_batch_matches_reference(arch):
    model = tiny_model(arch)
    prompts = [torch.randint(2, VOCAB, (n,)) for n in (11, 4, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), EOS)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    sampling = SamplingConfig(max_new_tokens=12)
    out = generate(model, ids, mask, sampling, eos_token_id=EOS)
    for i, p in enumerate(prompts):
        expected = reference_generate(model, p, sampling)
        got = out.tokens[i, : out.lengths[i]].tolist()
        assert got == expected
        assert (out.tokens[i, out.lengths[i] :] == EOS).all()


def test_sampling_is_reproducible_and_matches_reference():
    model = tiny_model("delta_net")
    prompt = torch.randint(2, VOCAB, (1, 9))
    sampling = SamplingConfig(
        max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9, top_k=20
    )
    a = generate(model, prompt, sampling=sampling, eos_token_id=EOS, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, sampling=sampling, eos_token_id=EOS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens)
    ref = reference_generate(model, prompt[0], sampling, generator=torch.Generator().manual_seed(3))
    assert a.tokens[0].tolist() == ref


def test_min_new_tokens_blocks_eos():
    model = tiny_model("delta_net")

    class EosLoving(torch.nn.Module):
        """EOS would win every greedy step (generate reads logits from forward and, at the prefill, lm_head)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            out = self.model(*args, **kwargs)
            if out.logits is not None:
                out.logits[..., EOS] += 100.0
            return out

        def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
            logits = self.model.lm_head(hidden)
            logits[..., EOS] += 100.0
            return logits

    eos_loving = EosLoving()
    prompt = torch.randint(2, VOCAB, (2, 5))
    out = generate(eos_loving, prompt, sampling=SamplingConfig(max_new_tokens=6, min_new_tokens=4), eos_token_id=EOS)
    assert (out.tokens[:, :4] != EOS).all()
    assert (out.tokens[:, 4] == EOS).all() and out.lengths.tolist() == [5, 5]


def test_process_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top-k 2 keeps the two largest.
    kept = process_logits(logits, SamplingConfig(do_sample=True, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # top-p 0.8: cumulative mass before each token is 0, 0.5, 0.8, 0.95 -> keep the first two (0.8 reached).
    kept = process_logits(logits, SamplingConfig(do_sample=True, top_p=0.8)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # top-p 0.81 needs the third token too.
    kept = process_logits(logits, SamplingConfig(do_sample=True, top_p=0.81)).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


def test_continue_from_a_cache_without_a_prompt():
    model = tiny_model("gated_deltanet")
    ids = torch.randint(2, VOCAB, (2, 10))
    out = model(ids, use_cache=True)
    sampling = SamplingConfig(max_new_tokens=5)
    a = generate(model, ids[:, :0], cache=out.cache, next_logits=out.logits[:, -1], sampling=sampling)
    b = generate(model, ids, sampling=sampling)
    assert torch.equal(a.tokens, b.tokens)


def test_invalid_sampling_settings_say_what_is_wrong():
    with pytest.raises(ValueError, match="min_new_tokens=5 exceeds"):
        SamplingConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_sampling_with_per_row_uniforms_is_batch_invariant():
    model = tiny_model("gated_deltanet")
    prompts = torch.randint(2, VOCAB, (4, 7))
    sampling = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.3)
    uniforms = torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = generate(model, prompts, sampling=sampling, uniforms=uniforms)
    for row in (3, 0, 2, 1):
        alone = generate(model, prompts[row : row + 1], sampling=sampling, uniforms=uniforms[row : row + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[row])


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).expand(20000, 3)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    from refine_core.models.generation import pick_tokens

    counts = torch.bincount(pick_tokens(logits, SamplingConfig(do_sample=True), uniforms=u), minlength=3) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)
