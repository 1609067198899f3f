"""Building blocks shared by the fast-weight models, with fla's parameter names and shapes.

Each module owns its parameters and calls a function from :mod:`refine_core.models.ops` for the math, so the
same weights run on the CPU (PyTorch) and on CUDA (fla's kernels where they apply).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from refine_core.models.ops import gated_rms_norm, rms_norm, short_conv, swiglu


class RMSNorm(nn.Module):
    """fla ``RMSNorm`` (weight only, no bias); statistics in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """fla ``FusedRMSNormGated``: ``rms_norm(x) * weight * act(gate)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str = "swish") -> None:
        super().__init__()
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation)


class ShortConvolution(nn.Conv1d):
    """fla ``ShortConvolution``: depthwise causal convolution (weight ``[D, 1, W]``) with a decoding cache."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1, bias=bias)
        self.activation = activation

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, cache: torch.Tensor | None = None, output_final_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return short_conv(
            x, self.weight, self.bias, activation=self.activation, cache=cache, output_final_state=output_final_state
        )


class GatedMLP(nn.Module):
    """fla ``GatedMLP`` with SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
