"""Fast-weight language models (DeltaNet, GatedDeltaNet) with fla-compatible weights and our own generation."""

from refine_core.models.cache import FastWeightCache, LayerState
from refine_core.models.causal_lm import FastWeightForCausalLM, LMOutput, build_model
from refine_core.models.configuration import (
    DeltaNetConfig,
    FastWeightConfig,
    GatedDeltaNetConfig,
    config_from_dict,
)
from refine_core.models.generation import GenerationOutput, SamplingConfig, generate
from refine_core.models.hub import load_model_dir, load_pretrained, save_pretrained

__all__ = [
    "DeltaNetConfig",
    "FastWeightCache",
    "FastWeightConfig",
    "FastWeightForCausalLM",
    "GatedDeltaNetConfig",
    "GenerationOutput",
    "LMOutput",
    "LayerState",
    "SamplingConfig",
    "build_model",
    "config_from_dict",
    "generate",
    "load_model_dir",
    "load_pretrained",
    "save_pretrained",
]
