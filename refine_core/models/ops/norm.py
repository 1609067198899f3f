"""Normalisations and the SwiGLU activation used by DeltaNet / GatedDeltaNet: PyTorch on every device, fla's fused
kernels on CUDA (:func:`refine_core.models.ops.fla_backend.use_fla_fused`).

The PyTorch versions reproduce fla 0.6.0's Triton kernels: the statistics and the products are taken in float32
(float64 stays float64), and the result is cast back to the input's dtype, as fla does before storing.

- :func:`rms_norm`: fla ``RMSNorm`` (``fla/modules/norm/layernorm.py``, ``layer_norm_fwd_kernel`` with ``IS_RMS_NORM``).
- :func:`gated_rms_norm`: fla ``FusedRMSNormGated`` (``fla/modules/norm/fused_norm_gate.py``).
- :func:`l2_normalize`: fla ``l2norm`` (``fla/modules/norm/l2norm.py``), which ``use_qk_l2norm_in_kernel`` applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refine_core.models.ops import fla_backend

_GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 inputs (tests), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` in the compute dtype (not cast back)."""
    cd = compute_dtype(x.dtype)
    xf = x.to(cd)
    rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return xf * rstd * weight.to(cd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, as fla's ``RMSNorm``.

    Args:
        x: ``[..., D]`` input.
        weight: ``[D]`` scale.
        eps: added to the mean square before the reciprocal square root.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    if fla_backend.use_fla_fused(x):
        return fla_backend.fla_rms_norm(x, weight, eps)
    return _rms_normalize(x, weight, eps).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "swish"
) -> torch.Tensor:
    """Gated RMSNorm, as fla's ``FusedRMSNormGated``: ``rms_norm(x) * weight * act(gate)``.

    Args:
        x: ``[..., D]`` input.
        gate: ``[..., D]`` gate, same shape as ``x``.
        weight: ``[D]`` scale.
        eps: added to the mean square before the reciprocal square root.
        activation: ``"swish"`` / ``"silu"`` (``gate * sigmoid(gate)``) or ``"sigmoid"``.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    if activation not in _GATE_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {_GATE_ACTIVATIONS}")
    if fla_backend.use_fla_fused(x) and gate.dtype == x.dtype:
        return fla_backend.fla_gated_rms_norm(x, gate, weight, eps, activation)
    y = _rms_normalize(x, weight, eps)
    gf = gate.to(y.dtype)
    y = y * (torch.sigmoid(gf) if activation == "sigmoid" else F.silu(gf))
    return y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` (fla ``GatedMLP`` with ``hidden_act="swish"``), in the inputs' dtype."""
    if fla_backend.use_fla_fused(gate) and gate.dtype == up.dtype and gate.shape == up.shape:
        return fla_backend.fla_swiglu(gate, up)
    return F.silu(gate) * up


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension as fla's ``l2norm``: ``x / sqrt(sum(x^2) + eps)``.

    Note the eps sits inside the square root (unlike ``F.normalize``, which clamps the norm).

    Args:
        x: ``[..., D]`` input.
        eps: fla's default 1e-6 is what ``use_qk_l2norm_in_kernel`` uses.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.square().sum(dim=-1, keepdim=True) + eps)).to(x.dtype)
