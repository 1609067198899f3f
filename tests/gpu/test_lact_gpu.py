"""GPU: LaCT on CUDA (SDPA attention blocks, fla's fused norms, batched fast-weight updates) against the float64
reference of upstream's formulas, and its cut states and cache under bf16 autocast.

Run on the GPU device: ``pytest -m gpu tests/gpu/test_lact_gpu.py -s``; the measured errors are printed.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from refine_core.models import build_model, config_from_dict  # noqa: E402
from tests.models.lact_reference import reference_lact_logits  # noqa: E402

CONFIG = {
    "model_type": "lact_swiglu", "hidden_size": 256, "num_hidden_layers": 2, "num_attn_heads": 4,
    "num_lact_heads": 2, "lact_chunk_size": 256, "window_size": 128, "w0_w2_low_rank": 16, "vocab_size": 500,
    "use_muon": False, "initializer_range": 0.05,
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _model(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config_from_dict({**CONFIG, **extra})).cuda()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.lr_proj.bias.normal_(1.0, 0.3)  # chunk updates that matter
    return model


def test_fp32_on_cuda_matches_the_float64_reference():
    model = _model()
    ids = torch.randint(0, 500, (2, 700))
    ref, _ = reference_lact_logits({k: v.cpu() for k, v in model.state_dict().items()}, CONFIG, ids)
    got = model(ids.cuda()).logits.cpu()
    err = _rel(got, ref)
    print(f"lact fp32 cuda vs float64 reference: max rel err {err:.2e}")
    assert err < 1e-3


def test_bf16_autocast_cut_states_continue_like_rereading_the_prefix():
    model = _model()
    ids = torch.randint(3, 500, (2, 900), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    cuts = torch.tensor([[100, 256, 600, 899], [300, 512, 513, 700]])
    k = 5
    y = torch.randint(3, 500, (8, k), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, cuts=cuts)
        branched = model(y, cache=out.cut_cache).logits.float()
        reread = []
        for n, (b, j) in enumerate((b, j) for b in range(2) for j in range(4)):
            c = int(cuts[b, j])
            seq = torch.cat([ids[b, :c], y[n]])[None]
            seq_mask = torch.cat([mask[b, :c], torch.ones(k, dtype=mask.dtype, device="cuda")])[None]
            reread.append(model(seq, attention_mask=seq_mask).logits[0, -k:].float())
    err = _rel(branched, torch.stack(reread))
    print(f"lact bf16 cut states vs re-reading each prefix: max rel err {err:.2e}")
    assert err < 3e-2


def test_bf16_cached_decoding_follows_the_full_forward():
    model = _model().eval()
    ids = torch.randint(3, 500, (2, 600), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(ids).logits.float()
        out = model(ids[:, :500], use_cache=True)
        cache, steps = out.cache, []
        for t in range(500, 600):
            step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = step.cache
            steps.append(step.logits.float())
    err = _rel(torch.cat(steps, 1), full[:, 500:])
    print(f"lact bf16 token-by-token decoding vs full forward: max rel err {err:.2e}")
    assert err < 3e-2
