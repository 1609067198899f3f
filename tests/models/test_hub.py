"""Checkpoint IO: fla's exact layout loads strictly; our saves round-trip; bad checkpoints fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from refine_core.models import DeltaNetConfig, config_from_dict, load_model_dir, load_pretrained, save_pretrained
from refine_core.models.configuration import GatedDeltaNetConfig
from tests.models.tiny import VOCAB, tiny_model

# Shapes written out by hand from fla 0.6.0 (fla/layers/delta_net.py, fla/layers/gated_deltanet.py,
# fla/modules/mlp.py, fla/models/*/modeling_*.py), independent of our module code.
D, H, W, LAYERS, INTER = 32, 2, 4, 2, 256


def fla_delta_net_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    state = {"model.embeddings.weight": r(VOCAB, D), "model.norm.weight": 1 + r(D), "lm_head.weight": r(VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "attn_norm.weight": 1 + r(D),
                p + "attn.q_proj.weight": r(D, D),
                p + "attn.k_proj.weight": r(D, D),
                p + "attn.v_proj.weight": r(D, D),
                p + "attn.b_proj.weight": r(H, D),
                p + "attn.q_conv1d.weight": r(D, 1, W),
                p + "attn.k_conv1d.weight": r(D, 1, W),
                p + "attn.v_conv1d.weight": r(D, 1, W),
                p + "attn.o_norm.weight": 1 + r(D // H),
                p + "attn.o_proj.weight": r(D, D),
                p + "mlp_norm.weight": 1 + r(D),
                p + "mlp.gate_proj.weight": r(INTER, D),
                p + "mlp.up_proj.weight": r(INTER, D),
                p + "mlp.down_proj.weight": r(D, INTER),
            }
        )
    return state


# config.json as fla's DeltaNetConfig.save_pretrained writes it (fields abridged to what fla 0.6.0 emits).
FLA_CONFIG = {
    "architectures": ["DeltaNetForCausalLM"],
    "model_type": "delta_net",
    "attn": None,
    "attn_mode": "chunk",
    "hidden_size": D,
    "num_hidden_layers": LAYERS,
    "num_heads": H,
    "expand_k": 1,
    "expand_v": 1,
    "use_gate": False,
    "use_short_conv": True,
    "conv_size": W,
    "use_beta": True,
    "use_output_norm": True,
    "qk_norm": "l2",
    "qk_activation": "silu",
    "hidden_ratio": 4,
    "intermediate_size": None,
    "hidden_act": "swish",
    "norm_eps": 1e-6,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "fuse_norm": True,
    "fuse_swiglu": True,
    "fuse_cross_entropy": True,
    "fuse_linear_cross_entropy": False,
    "use_l2warp": False,
    "use_cache": True,
    "initializer_range": 0.02,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
    "transformers_version": "5.23.0",
}


def write_fla_checkpoint(path, state, config=FLA_CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))


def test_fla_layout_checkpoint_loads_strictly(tmp_path):
    state = fla_delta_net_state(torch.Generator().manual_seed(0))
    write_fla_checkpoint(tmp_path / "ckpt", state)
    model = load_model_dir(tmp_path / "ckpt", dtype="float32")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.to(torch.bfloat16).float()), key
    logits = model(torch.randint(0, VOCAB, (1, 16))).logits
    assert logits.shape == (1, 16, VOCAB) and torch.isfinite(logits).all()


def test_missing_or_extra_keys_are_refused_with_their_names(tmp_path):
    state = fla_delta_net_state(torch.Generator().manual_seed(0))
    del state["model.layers.1.attn.b_proj.weight"]
    state["model.layers.0.attn.g_proj.weight"] = torch.zeros(D, D)
    write_fla_checkpoint(tmp_path / "bad", state)
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.attn.b_proj.weight'\].*g_proj"):
        load_model_dir(tmp_path / "bad")


def test_unsupported_architecture_options_are_refused():
    with pytest.raises(NotImplementedError, match="hybrid softmax-attention"):
        config_from_dict({**FLA_CONFIG, "attn": {"layers": [1], "num_heads": 2}})
    with pytest.raises(ValueError, match="lact_swiglu"):
        config_from_dict({**FLA_CONFIG, "model_type": "mamba"})


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLA_CONFIG))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model_dir(tmp_path)


@pytest.mark.parametrize("arch", ["delta_net", "gated_deltanet"])
def test_save_then_load_round_trips_exactly(tmp_path, arch):
    model = tiny_model(arch, dtype=torch.float32)
    save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"][0].endswith("ForCausalLM")
    loaded = load_pretrained(str(tmp_path / "m"), cache_dir=tmp_path / "cache").eval()
    ids = torch.randint(0, VOCAB, (2, 19))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    if arch == "gated_deltanet":
        assert loaded.model.layers[0].attn.A_log._no_weight_decay


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model("delta_net", dtype=torch.float32, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embeddings.weight
    save_pretrained(model, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embeddings.weight


def test_real_1p3b_config_has_the_measured_parameter_count():
    # fla-hub/delta_net-1.3B-100B config.json (models-notes §1.3): 1,365,677,056 parameters under fla 0.6.0.
    cfg = DeltaNetConfig(
        hidden_size=2048, num_hidden_layers=24, num_heads=16, vocab_size=32000, hidden_ratio=4, norm_eps=1e-6
    )
    from refine_core.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_parameters() == 1_365_677_056
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (5632, 2048)


def test_gated_deltanet_fla_key_names():
    cfg = GatedDeltaNetConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=16, vocab_size=VOCAB)
    from refine_core.models import build_model

    keys = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    p = "model.layers.0.attn."
    # expand_v=2: value_dim = 2 heads * 32; A_log / dt_bias / a_proj / b_proj per value head (fla GatedDeltaNet).
    assert keys[p + "v_proj.weight"] == (64, 32)
    assert keys[p + "g_proj.weight"] == (64, 32)
    assert keys[p + "a_proj.weight"] == (2, 32) and keys[p + "b_proj.weight"] == (2, 32)
    assert keys[p + "A_log"] == (2,) and keys[p + "dt_bias"] == (2,)
    assert keys[p + "o_norm.weight"] == (32,)
    assert keys[p + "v_conv1d.weight"] == (64, 1, 4)
