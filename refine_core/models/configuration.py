"""Model configurations with exactly fla's field names, so that ``config.json`` files round-trip both ways.

A config read from an fla checkpoint (``fla-hub/delta_net-1.3B-100B``) keeps every field we understand, ignores
fields that only choose fla kernels (``fuse_*``, ``attn_mode``, ...) and refuses fields that would change the
architecture in ways this package does not implement (hybrid softmax-attention layers, attention residuals),
with an error that says so. A config we write is readable by fla's own ``DeltaNetConfig`` /
``GatedDeltaNetConfig``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

# Fields fla writes that select kernels or HF plumbing and do not change the weights or the math we run.
_IGNORED_FIELDS = {
    "attn_mode",
    "fuse_norm",
    "fuse_swiglu",
    "fuse_cross_entropy",
    "fuse_linear_cross_entropy",
    "use_l2warp",
    "use_cache",
    "norm_first",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "model_type",
    "auto_map",
    "_name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "keys_to_ignore_at_inference",
}


def _intermediate_size(hidden_size: int, hidden_ratio: int | None, intermediate_size: int | None) -> int:
    # fla.modules.GatedMLP: a multiple of 256 close to 2/3 * hidden_size * hidden_ratio.
    if intermediate_size is not None:
        return intermediate_size
    ratio = 4 if hidden_ratio is None else hidden_ratio
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 256 - 1) // 256)


@dataclass
class FastWeightConfig:
    """Fields shared by every fla fast-weight LM (block, MLP, embeddings)."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""

    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 16
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = 4
    allow_neg_eigval: bool = False
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    vocab_size: int = 32000
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Unsupported fla features: kept so that a config naming them is refused, not silently dropped.
    attn: dict[str, Any] | None = None
    attnres_block_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.attn is not None:
            raise NotImplementedError(
                f"{self.model_type}: hybrid softmax-attention layers (config field 'attn') are not implemented in "
                "refine_core; use a pure fast-weight checkpoint."
            )
        if self.attnres_block_size is not None:
            raise NotImplementedError(
                f"{self.model_type}: 'attnres_block_size' (attention residuals) is not supported."
            )
        if self.hidden_act != "swish":
            raise NotImplementedError(f"{self.model_type}: hidden_act={self.hidden_act!r}; only 'swish' is supported.")

    @property
    def pad_id(self) -> int | None:
        """The id used to pad batches: ``pad_token_id``, else EOS (spec §1: pad = eos when there is none)."""
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_id

    @property
    def mlp_intermediate_size(self) -> int:
        return _intermediate_size(self.hidden_size, self.hidden_ratio, self.intermediate_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FastWeightConfig:
        """Build from a ``config.json`` mapping; unknown fields are kept in ``extra`` and logged once."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names and k not in _IGNORED_FIELDS}
        if unknown:
            logger.info("%s config: keeping unused fields %s", cls.model_type, sorted(unknown))
        return cls(**kwargs, extra=unknown)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` mapping, readable by fla's config classes."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        out["model_type"] = self.model_type
        out["architectures"] = [self.architecture]
        # Our checkpoints use the plain (non-fused) formulation; fla reads these to pick kernels.
        out.update(fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True, attn_mode="chunk")
        return out


@dataclass
class DeltaNetConfig(FastWeightConfig):
    """fla ``DeltaNetConfig`` (``model_type='delta_net'``)."""

    model_type: ClassVar[str] = "delta_net"
    architecture: ClassVar[str] = "DeltaNetForCausalLM"

    expand_k: float = 1.0
    expand_v: float = 1.0
    use_beta: bool = True
    use_output_norm: bool = True
    qk_norm: str = "l2"
    qk_activation: str = "silu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qk_norm not in ("l2", "sum"):
            raise ValueError(f"delta_net: qk_norm={self.qk_norm!r}; fla supports 'l2' and 'sum'.")
        if self.qk_activation not in ("silu", "relu", "elu", "identity"):
            raise ValueError(f"delta_net: qk_activation={self.qk_activation!r}; use silu, relu, elu or identity.")
        for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % self.num_heads:
                raise ValueError(f"delta_net: {name} dim {dim} is not divisible by num_heads={self.num_heads}.")

    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)


@dataclass
class GatedDeltaNetConfig(FastWeightConfig):
    """fla ``GatedDeltaNetConfig`` (``model_type='gated_deltanet'``)."""

    model_type: ClassVar[str] = "gated_deltanet"
    architecture: ClassVar[str] = "GatedDeltaNetForCausalLM"

    num_hidden_layers: int = 21
    num_heads: int = 6
    use_gate: bool = True
    head_dim: int = 256
    expand_v: float = 2.0
    num_v_heads: int | None = None
    output_gate_activation: str = "swish"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(
                f"gated_deltanet: output_gate_activation={self.output_gate_activation!r}; use swish, silu or sigmoid."
            )
        if self.value_heads % self.num_heads:
            raise ValueError(
                f"gated_deltanet: num_v_heads={self.value_heads} must be a multiple of num_heads={self.num_heads}."
            )
        if abs(self.head_dim * self.expand_v - self.head_v_dim) > 1e-6:
            raise ValueError(
                f"gated_deltanet: head_dim * expand_v = {self.head_dim * self.expand_v} is not an integer."
            )

    @property
    def value_heads(self) -> int:
        return self.num_v_heads if self.num_v_heads is not None else self.num_heads

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.head_v_dim


CONFIG_CLASSES: dict[str, type[FastWeightConfig]] = {
    DeltaNetConfig.model_type: DeltaNetConfig,
    GatedDeltaNetConfig.model_type: GatedDeltaNetConfig,
}


def config_from_dict(data: dict[str, Any]) -> FastWeightConfig:
    """Dispatch a ``config.json`` mapping on its ``model_type``."""
    model_type = data.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; refine_core implements {sorted(CONFIG_CLASSES)} "
            "(LaCT's 'lact_swiglu' arrives in a later release)."
        )
    return CONFIG_CLASSES[model_type].from_dict(data)
