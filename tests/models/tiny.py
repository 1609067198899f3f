"""Tiny model builders shared by the model tests (no downloads: every model is built from a config)."""

from __future__ import annotations

import pytest
import torch

from refine_core.models import DeltaNetConfig, FastWeightForCausalLM, GatedDeltaNetConfig, build_model
from refine_core.models.configuration import FastWeightConfig, LaCTConfig

VOCAB = 97


def tiny_config(arch: str, **overrides) -> FastWeightConfig:
    if arch == "delta_net":
        fields = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=VOCAB, eos_token_id=1)
        return DeltaNetConfig(**{**fields, **overrides})
    if arch == "gated_deltanet":
        fields = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_heads=2,
            head_dim=16,
            expand_v=1.0,
            vocab_size=VOCAB,
            eos_token_id=1,
        )
        return GatedDeltaNetConfig(**{**fields, **overrides})
    if arch == "lact_swiglu":
        # chunk 16 and window 8: the test sequences (tens of tokens) cross several chunk updates and windows
        fields = dict(
            hidden_size=32, num_hidden_layers=2, num_attn_heads=4, num_lact_heads=2, lact_chunk_size=16,
            window_size=8, w0_w2_low_rank=4, vocab_size=VOCAB, eos_token_id=1,
        )
        return LaCTConfig(**{**fields, **overrides})
    raise ValueError(arch)


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> FastWeightForCausalLM:
    torch.manual_seed(seed)
    model = build_model(tiny_config(arch, **overrides)).to(dtype)
    # Larger weights than the 0.02 init so that the layers do visibly non-linear work in the tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


ARCHS = [
    pytest.param(("delta_net", {}), id="deltanet"),
    pytest.param(("delta_net", {"use_gate": True}), id="deltanet-gate"),
    pytest.param(
        ("delta_net", {"use_short_conv": False, "qk_norm": "sum", "qk_activation": "relu"}), id="deltanet-noconv"
    ),
    pytest.param(("gated_deltanet", {}), id="gdn"),
    pytest.param(("gated_deltanet", {"num_v_heads": 4, "use_gate": False}), id="gdn-gva"),
    pytest.param(("lact_swiglu", {}), id="lact"),
    pytest.param(("lact_swiglu", {"ttt_prenorm": True, "use_muon": True, "ttt_nope": True}), id="lact-prenorm-muon"),
]
