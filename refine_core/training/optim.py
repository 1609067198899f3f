"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

The schedule is a pure function of the step, :func:`lr_multiplier`, wrapped in a ``LambdaLR``::

    optimizer = build_optimizer(model, cfg.ntp)
    scheduler = build_scheduler(optimizer, cfg.ntp)
    for step in range(cfg.ntp.steps):
        ...; optimizer.step(); scheduler.step()

``step`` counts optimizer updates already taken, as ``LambdaLR`` does: update ``s`` (0-based) uses
``lr * lr_multiplier(s)``.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)


class OptimSettings(Protocol):
    """The optimiser fields shared by the ``ntp`` and ``refine`` config sections."""

    steps: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    lr_schedule: str
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float


def _wants_decay(param: nn.Parameter) -> bool:
    """Matrices decay; 1-D params (norms, biases) and params flagged ``_no_weight_decay`` (A_log, dt_bias) don't."""
    return param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)


def build_optimizer(model: nn.Module, cfg: OptimSettings) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, in two groups.

    Args:
        model: the model; frozen parameters (``requires_grad=False``) are left out, tied ones appear once.
        cfg: ``ntp`` section: ``lr``, ``betas``, ``weight_decay``.

    Returns:
        AdamW whose groups are named ``decay`` (weight decay ``cfg.weight_decay``) and ``no_decay`` (0.0); an empty
        group is omitted.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # deduplicates tied weights
        if param.requires_grad:
            (decay if _wants_decay(param) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters; unfreeze some before training.")
    groups = [
        {"params": params, "weight_decay": wd, "name": name}
        for name, params, wd in (("decay", decay, cfg.weight_decay), ("no_decay", no_decay, 0.0))
        if params
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _check_schedule(cfg: OptimSettings) -> None:
    if cfg.warmup_steps < 0:
        raise ValueError(f"ntp.warmup_steps={cfg.warmup_steps} must be >= 0.")
    if cfg.warmup_steps > cfg.steps:
        raise ValueError(f"ntp.warmup_steps={cfg.warmup_steps} exceeds ntp.steps={cfg.steps}; shorten the warm-up.")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"ntp.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1].")


def lr_multiplier(step: int, cfg: OptimSettings) -> float:
    """Factor on ``cfg.lr`` for the update after ``step`` completed updates.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first update is not wasted at lr 0).
    Then, with ``p = (step - warmup_steps) / (steps - warmup_steps)`` clamped to ``[0, 1]`` and ``m = min_lr_ratio``:
    ``constant``: 1; ``linear``: ``m + (1 - m) (1 - p)``; ``cosine``: ``m + (1 - m) (1 + cos(pi p)) / 2``. The decay
    reaches ``m`` at ``step == steps`` and stays there if training runs longer.

    Args:
        step: completed optimizer updates (>= 0).
        cfg: ``ntp`` section: ``steps``, ``warmup_steps``, ``lr_schedule``, ``min_lr_ratio``.
    """
    _check_schedule(cfg)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
    if cfg.lr_schedule == "linear":
        shape = 1.0 - progress
    elif cfg.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"ntp.lr_schedule={cfg.lr_schedule!r}; use 'constant', 'cosine' or 'linear'.")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSettings) -> LambdaLR:
    """``LambdaLR`` applying :func:`lr_multiplier`; its ``state_dict`` is weights_only-loadable.

    Args:
        optimizer: from :func:`build_optimizer`.
        cfg: ``ntp`` section.
    """
    _check_schedule(cfg)

    # A plain function (not a partial or callable object): LambdaLR.state_dict stores None for it instead of the
    # object's __dict__, which would drag the config dataclass into the checkpoint.
    def schedule(step: int) -> float:
        return lr_multiplier(step, cfg)

    return LambdaLR(optimizer, lr_lambda=schedule)


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> tuple[float, bool]:
    """Clip the gradient norm, then step unless it is not finite (that step is skipped: spec §2 step 6.4).

    Returns the pre-clip gradient norm and whether the optimizer stepped. Gradients are cleared either way.
    """
    # clip_grad_norm_ spelled out (it is get_total_norm + clip_grads_with_norm_), so that an FSDP run's norm, a
    # DTensor summed from every rank's shard, becomes one replicated value before it scales the gradients.
    params = list(model.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total)
    grad_norm = float(total)
    took = math.isfinite(grad_norm)
    if took:
        optimizer.step()
    else:
        logger.warning("gradient norm is %s: skipping this optimizer step", grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, took
