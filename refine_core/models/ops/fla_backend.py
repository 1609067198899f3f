"""The only module that touches fla (flash-linear-attention 0.6.0): lazy import, kernel wrappers, known-bug guards.

fla runs nothing on CPU (every op is a Triton kernel; models-notes §1.6), so ``refine_core`` owns PyTorch versions of
the ops and calls fla's kernels only on CUDA. Nothing here imports ``fla`` or ``triton`` at module import time;
:func:`fla_available` tries once, on first use, and answers False (without raising) on CPU-only installs.

State layout: we always ask fla for the key-first state ``[N, H, K, V]`` (``state_v_first=False``, the default of
all four delta-rule entry points), which is the layout of our own state, so nothing is transposed on the way in or
out. (fla's GatedDeltaNet *layer* asks for value-first, but that only concerns its own cache.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import warnings

import torch

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_warned_hopper_gated_backward = False
_disabled_depth = 0


@contextlib.contextmanager
def disabled():
    """Run the PyTorch ops even where fla could run (benchmarks and GPU cross-checks of the two paths)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def fla_enabled() -> bool:
    """fla is importable on a CUDA machine and not switched off by :func:`disabled`."""
    return _disabled_depth == 0 and fla_available()


@functools.cache
def fla_available() -> bool:
    """Whether fla's Triton kernels can run here: a CUDA device, and fla (with triton) importable.

    Never raises; the first failed import is logged at INFO and the answer is cached for the process.
    """
    if not torch.cuda.is_available():
        return False
    try:
        for module in ("fla.ops.delta_rule", "fla.ops.gated_delta_rule", "fla.modules.fused_cross_entropy"):
            importlib.import_module(module)
    except Exception as exc:  # fla or triton missing, or an install that breaks at import: all mean "no fla"
        logger.info("fla kernels unavailable (%s: %s); using the PyTorch ops", type(exc).__name__, exc)
        return False
    return True


def _version_tuple(version: str) -> tuple[int, int, int]:
    """``"3.6.0"``, ``"3.7.1+gitabc"`` or ``"3.4"`` -> ``(major, minor, patch)``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot parse the version string {version!r}")
    major, minor, patch = match.groups(default="0")
    return int(major), int(minor), int(patch)


def hopper_gated_backward_broken(capability: tuple[int, int], triton_version: str) -> bool:
    """Whether fla 0.6.0 refuses the gated delta rule's chunk backward on this GPU and Triton.

    fla raises ``RuntimeError`` in ``chunk_bwd_dqkwg`` (``fla/ops/common/chunk_o.py``) on Hopper GPUs with
    ``3.4.0 <= triton < 3.7.1``, which miscompile that kernel (fla issue #640, models-notes §1.8); Triton 3.7.1, the
    version torch 2.13's CUDA wheel pins, fixes it.

    Args:
        capability: CUDA compute capability ``(major, minor)``; Hopper is ``(9, x)``.
        triton_version: ``triton.__version__``.
    """
    return capability[0] == 9 and (3, 4, 0) <= _version_tuple(triton_version) < (3, 7, 1)


def _warn_hopper_gated_backward_once(triton_version: str) -> None:
    global _warned_hopper_gated_backward
    if _warned_hopper_gated_backward:
        return
    _warned_hopper_gated_backward = True
    warnings.warn(
        f"fla 0.6.0 refuses the gated delta-rule chunk backward on Hopper GPUs with triton {triton_version} "
        "(3.4.0 <= triton < 3.7.1 miscompiles it, fla issue #640); gated delta-rule calls that need gradients "
        "use the PyTorch chunked path instead (fp32, slower). Install triton>=3.7.1 (torch 2.13's CUDA wheel) to "
        "restore the fla kernel.",
        RuntimeWarning,
        stacklevel=4,
    )


def use_fla_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gated: bool, recurrent: bool, needs_grad: bool
) -> bool:
    """Whether :func:`refine_core.models.ops.delta_rule` should run fla's kernel for this call.

    Yes when q/k/v are bf16/fp16 on CUDA and fla imports, except for two gated cases that fla cannot do:
    ``fused_recurrent_gated_delta_rule`` has no backward, and the gated chunk backward is refused on Hopper with
    an old Triton (:func:`hopper_gated_backward_broken`; warns once). fp32 stays on the PyTorch path because
    fla's chunk kernels assert ``dtype != float32``.
    """
    if not (q.is_cuda and q.dtype in _HALF_DTYPES and k.dtype == v.dtype == q.dtype and fla_enabled()):
        return False
    if gated and needs_grad:
        if recurrent:
            return False
        triton_version = importlib.import_module("triton").__version__
        if hopper_gated_backward_broken(torch.cuda.get_device_capability(q.device), triton_version):
            _warn_hopper_gated_backward_once(triton_version)
            return False
    return True


def fla_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    recurrent: bool,
    chunk_size: int,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_device: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run fla's (gated) delta-rule kernel; arguments as :func:`refine_core.models.ops.delta_rule`.

    ``recurrent`` picks ``fused_recurrent_*`` over ``chunk_*``. ``beta`` is post-sigmoid and ``g`` the log decay
    (fla's ``use_beta_sigmoid_in_kernel`` / ``use_gate_in_kernel`` stay off). They reach the kernels as fla's own
    layers pass them: ``beta`` in q's dtype, ``g`` in float32. ``chunk_size`` must be 16, 32 or 64 (fla raises
    otherwise).

    ``cu_seqlens`` (int64 ``[N + 1]`` on the CPU, with ``B = 1``) packs N sequences into one row (fla's varlen
    mode); the initial and final states are then ``[N, H, K, V]``. fla gets it on the device and, for the chunked
    kernels, the CPU copy too, so that building its chunk index does not wait for the GPU. ``cu_seqlens_device`` is
    that device copy when the caller has one (copied once for all layers); otherwise it is made here, which waits
    for the GPU's queue.

    Returns:
        ``(o, final_state)``: ``[B, T, H, V]`` in q's dtype, and ``[B, H, K, V]`` float32 or ``None``.
    """
    common = {
        "scale": scale,
        "initial_state": initial_state,
        "output_final_state": output_final_state,
        "use_qk_l2norm_in_kernel": use_qk_l2norm,
    }
    if cu_seqlens is not None:
        on_device = cu_seqlens_device if cu_seqlens_device is not None else cu_seqlens.to(q.device, torch.long)
        common["cu_seqlens"] = on_device
        if not recurrent:
            common["cu_seqlens_cpu"] = cu_seqlens.cpu().long()
    beta = beta.to(q.dtype)
    if g is None:
        delta_rule_ops = importlib.import_module("fla.ops.delta_rule")
        if recurrent:
            return delta_rule_ops.fused_recurrent_delta_rule(q=q, k=k, v=v, beta=beta, **common)
        return delta_rule_ops.chunk_delta_rule(q=q, k=k, v=v, beta=beta, chunk_size=chunk_size, **common)
    gated_ops = importlib.import_module("fla.ops.gated_delta_rule")
    g = g.float()
    if recurrent:
        return gated_ops.fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **common)
    return gated_ops.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, chunk_size=chunk_size, **common)


def use_fla_fused(x: torch.Tensor) -> bool:
    """Whether the fused norm, SwiGLU and short-convolution kernels of fla should run for input ``x``.

    Yes on CUDA for every dtype but float64 (fla's kernels compute in float32 and store in the input's dtype, as
    our PyTorch ops do) when fla imports and is not :func:`disabled`. One kernel replaces the 5-8 elementwise
    launches and full-size float32 copies of the PyTorch op, forward and backward: on the GPU those were the top
    consumers of both the NTP and the REFINE step (BENCHMARKS.md, issue 10's profile).
    """
    return x.is_cuda and x.dtype != torch.float64 and fla_enabled()


def fla_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fla's RMSNorm kernel (``fla.modules.norm.layernorm.rms_norm``); ``[..., D]`` in ``x.dtype``."""
    layernorm = importlib.import_module("fla.modules.norm.layernorm")
    return layernorm.rms_norm(x, weight, None, eps=eps)


def fla_gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str
) -> torch.Tensor:
    """fla's fused gated RMSNorm (``FusedRMSNormGated``'s function); ``[..., D]`` in ``x.dtype``."""
    fused = importlib.import_module("fla.modules.norm.fused_norm_gate")
    return fused.rms_norm_gated(x, gate, weight, None, activation=activation, eps=eps)


def fla_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fla's fused ``silu(gate) * up`` (forward and backward one kernel each)."""
    activations = importlib.import_module("fla.modules.activations")
    return activations.swiglu(gate, up)


def fla_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    cache: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's Triton causal depthwise convolution (``fla.modules.causal_conv1d.causal_conv1d``, ``backend='triton'``).

    ``weight`` is ``[D, 1, W]`` as :func:`refine_core.models.ops.short_conv` takes it; ``cache`` ``[B, D, W]`` is the
    same layout as fla's ``initial_state``, and the returned cache too.

    The returned cache is built here, not by fla: fla 0.6.0's backward passes the cache's gradient on to the last
    ``W - 1`` inputs only (``causal_conv1d_bwd_kernel``: ``start_tok = T - (W - 1)``), dropping slot 0's, which the
    PyTorch path keeps (the device's ``test_short_conv_fla_path_matches_torch[100-*]`` found dx off by 87%). The next
    step never reads slot 0, but both paths must be the same function; the cache is ``W`` columns, a negligible copy.
    """
    conv = importlib.import_module("fla.modules.causal_conv1d")
    y, _ = conv.causal_conv1d(
        x, weight.squeeze(1), bias, initial_state=cache, output_final_state=False, activation=activation,
        backend="triton",
    )
    if not output_final_state:
        return y, None
    batch, _, dim = x.shape
    width = weight.shape[-1]
    past = cache.to(x.dtype) if cache is not None else x.new_zeros(batch, dim, width)
    tail = x[:, -width:].transpose(1, 2)  # [B, D, min(T, W)], oldest first
    return y, torch.cat([past, tail], dim=-1)[..., -width:].contiguous()


def fla_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """fla's fused cross-entropy kernel: per-token losses, 0 where ``labels == ignore_index``.

    Args:
        logits: ``[N, V]`` on CUDA, any float dtype (the kernel computes in float32 without an fp32 copy).
        labels: ``[N]`` int64.

    Returns:
        ``[N]`` float32.
    """
    ce = importlib.import_module("fla.modules.fused_cross_entropy")
    loss, _z_loss = ce.cross_entropy_loss(logits, labels, ignore_index=ignore_index)
    return loss
