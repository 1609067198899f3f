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


@dataclass
class LaCTConfig(FastWeightConfig):
    """Upstream LaCT's ``LaCTSWIGLUConfig`` (``model_type='lact_swiglu'``, ``a1600012888/LaCT``, ``lact_llm/``).

    Field names and defaults are upstream's, so its ``config.json`` files load here and ours load there. The
    DeltaNet-family fields of the base class (``num_heads``, ``use_short_conv``, ...) mean nothing to LaCT and are
    not written. One field is ours: ``pad_into_fast_weights`` reproduces the official REFINE code, whose LaCT
    writes left-pad tokens into the fast weights and counts them in the chunk boundaries and positions (spec §10.3);
    by default pads are absent, as they are for DeltaNet.
    """

    model_type: ClassVar[str] = "lact_swiglu"
    architecture: ClassVar[str] = "LaCTForCausalLM"
    _NOT_LACT: ClassVar[frozenset[str]] = frozenset(
        {"num_heads", "use_gate", "use_short_conv", "conv_size", "allow_neg_eigval", "attn", "attnres_block_size"}
    )

    num_attn_heads: int = 32
    num_lact_heads: int = 4
    inter_multi: float = 1
    qkv_bias: bool = False
    attn_qk_norm: bool = False
    lact_chunk_size: int = 2048
    use_muon: bool = False
    lr_dim: int = 1
    qkv_silu: bool = True
    no_v_silu: bool = False
    lr_parameterization: str = "mamba"
    learnable_ttt_scale: bool = True
    use_momentum: bool = True
    ttt_loss_type: str = "dot_product"
    ttt_prenorm: bool = False
    ttt_nope: bool = False
    w0_w2_low_rank: int = -1
    window_size: int = 2048
    rope_theta: float = 10000.0
    initializer_range: float = 0.006
    fw_init_gain: float = 0.5
    elementwise_affine: bool = True
    use_fused_kernel: bool = False  # upstream's optional Triton path: the same math, so ignored here
    fp32_states: bool = False
    pad_into_fast_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.hidden_size % self.num_attn_heads == 0, f"hidden_size {self.hidden_size} is not divisible by "
             f"num_attn_heads={self.num_attn_heads}"),
            (self.hidden_size % self.num_lact_heads == 0, f"hidden_size {self.hidden_size} is not divisible by "
             f"num_lact_heads={self.num_lact_heads}"),
            (self.lr_dim == 1, f"lr_dim={self.lr_dim}; only 1 (one learning rate per token and fast weight) is "
             "supported, as in every published LaCT config"),
            (self.lr_parameterization == "mamba", f"lr_parameterization={self.lr_parameterization!r}; upstream "
             "implements only 'mamba'"),
            (self.ttt_loss_type == "dot_product", f"ttt_loss_type={self.ttt_loss_type!r}; upstream implements only "
             "'dot_product'"),
            (self.lact_chunk_size > 0 and self.window_size > 0, "lact_chunk_size and window_size must be positive"),
            (self.elementwise_affine, "elementwise_affine=False is not supported"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"lact_swiglu: {message}.")
        if (self.hidden_size // self.num_attn_heads) % 2:
            raise ValueError("lact_swiglu: the attention head dim must be even (RoPE rotates halves).")

    @property
    def head_dim(self) -> int:
        """Dimension of one sliding-window attention head."""
        return self.hidden_size // self.num_attn_heads

    @property
    def fw_head_dim(self) -> int:
        """Input/output dimension of one fast-weight (TTT) head."""
        return self.hidden_size // self.num_lact_heads

    @property
    def fw_hidden_dim(self) -> int:
        """Hidden dimension of the fast-weight SwiGLU MLP of one head."""
        return int(self.fw_head_dim * self.inter_multi)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in super().to_dict().items() if k not in self._NOT_LACT}
        out.pop("attn_mode", None)  # a DeltaNet kernel choice
        return out


CONFIG_CLASSES: dict[str, type[FastWeightConfig]] = {
    DeltaNetConfig.model_type: DeltaNetConfig,
    GatedDeltaNetConfig.model_type: GatedDeltaNetConfig,
    LaCTConfig.model_type: LaCTConfig,
}


def config_from_dict(data: dict[str, Any]) -> FastWeightConfig:
    """Dispatch a ``config.json`` mapping on its ``model_type``."""
    model_type = data.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; refine_core implements {sorted(CONFIG_CLASSES)}."
        )
    return CONFIG_CLASSES[model_type].from_dict(data)
