"""Tiny model builders shared by the model tests (no downloads: every model is built from a config)."""

from __future__ import annotations

import pytest
import torch

from refine_core.models import DeltaNetConfig, FastWeightForCausalLM, GatedDeltaNetConfig, build_model

VOCAB = 97


def tiny_config(arch: str, **overrides) -> DeltaNetConfig | GatedDeltaNetConfig:
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
]
