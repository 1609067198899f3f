"""GPU: our model running fla's kernels against the same model on the PyTorch path, and against fla's own classes.

Run on the GPU device (fla 0.6.0 wheels carried in): ``pytest -m gpu tests/gpu -s``. The measured errors are
printed and recorded in BENCHMARKS.md; the asserts hold a margin above them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla (flash-linear-attention 0.6.0)"),
]

from refine_core.models import DeltaNetConfig, GatedDeltaNetConfig, build_model, save_pretrained  # noqa: E402
from refine_core.models.ops import fla_backend  # noqa: E402

VOCAB = 1000


def _config(arch: str):
    if arch == "delta_net":
        return DeltaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB)
    return GatedDeltaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, head_dim=64, vocab_size=VOCAB)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("arch", ["delta_net", "gated_deltanet"])
def test_model_with_fla_kernels_matches_torch_path(arch):
    torch.manual_seed(0)
    model = build_model(_config(arch)).cuda()
    ids = torch.randint(0, VOCAB, (2, 777), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # left padding on one row
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(ids, attention_mask=mask).logits.float()
    # The same model on our PyTorch ops in float32 on the GPU (disabled() keeps fla's fused norms and conv out too).
    with fla_backend.disabled():
        ref = model(ids, attention_mask=mask).logits.float()
    err = _rel(fast[:, 100:], ref[:, 100:])
    print(f"\n{arch}: fla-bf16 vs torch-fp32 logits, max rel err {err:.3e} (logit std {ref.std():.3f})")
    assert err < 5e-2


def test_our_checkpoint_loads_into_fla_and_gives_the_same_logits(tmp_path):
    from fla.models import DeltaNetForCausalLM  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(_config("delta_net")).cuda().eval()
    save_pretrained(model, tmp_path / "ckpt")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).cuda().eval()
    assert set(theirs.state_dict()) == set(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 300), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = model(ids).logits.float()
        ref = theirs(input_ids=ids).logits.float()
    err = _rel(ours, ref)
    print(f"\nours vs fla DeltaNetForCausalLM (both bf16 autocast): max rel err {err:.3e}")
    assert err < 5e-2
