"""Numeric kernels of the fast-weight models: PyTorch on every device, fla's Triton kernels on CUDA where they apply.

Only :mod:`refine_core.models.ops.fla_backend` touches fla, and only lazily, so this package imports without fla or
triton installed. :mod:`refine_core.models.ops.naive` holds the slow reference versions used by the tests.
"""

from refine_core.models.ops.conv import short_conv
from refine_core.models.ops.cross_entropy import cross_entropy, token_entropy
from refine_core.models.ops.cut_states import delta_rule_with_cuts
from refine_core.models.ops.delta_rule import chunk_delta_rule_torch, delta_rule, recurrent_delta_rule_torch
from refine_core.models.ops.fla_backend import fla_available
from refine_core.models.ops.norm import gated_rms_norm, l2_normalize, rms_norm, swiglu

__all__ = [
    "chunk_delta_rule_torch",
    "cross_entropy",
    "delta_rule",
    "delta_rule_with_cuts",
    "fla_available",
    "gated_rms_norm",
    "l2_normalize",
    "recurrent_delta_rule_torch",
    "rms_norm",
    "short_conv",
    "swiglu",
    "token_entropy",
]
