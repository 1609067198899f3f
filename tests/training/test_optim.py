"""AdamW parameter groups and the learning-rate schedule (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from refine_core.config import NTPConfig
from refine_core.training.optim import build_optimizer, build_scheduler, lr_multiplier


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)  # weight decays, bias doesn't
        self.norm = nn.LayerNorm(4)
        self.A_log = nn.Parameter(torch.zeros(2, 2))  # 2-D but flagged, like GatedDeltaNet's
        self.A_log._no_weight_decay = True
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once


def test_param_groups() -> None:
    model = Tiny()
    cfg = NTPConfig(lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9))
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["decay"] == {id(model.embed.weight), id(model.proj.weight)}
    assert ids["no_decay"] == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.A_log)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)


def test_no_trainable_params() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, NTPConfig())


def test_constant_with_warmup() -> None:
    cfg = NTPConfig(steps=10, warmup_steps=4, lr_schedule="constant")
    assert [lr_multiplier(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(100, cfg) == 1.0
    assert lr_multiplier(0, NTPConfig(steps=10)) == 1.0  # the paper's setting: constant, no warm-up


def test_linear_decay() -> None:
    cfg = NTPConfig(steps=12, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.2)
    # after warm-up: p = (s - 2) / 10, m = 0.2 -> 0.2 + 0.8 * (1 - p)
    assert lr_multiplier(0, cfg) == pytest.approx(0.5)
    assert lr_multiplier(1, cfg) == pytest.approx(1.0)
    assert lr_multiplier(2, cfg) == pytest.approx(1.0)
    assert lr_multiplier(7, cfg) == pytest.approx(0.6)
    assert lr_multiplier(12, cfg) == pytest.approx(0.2)
    assert lr_multiplier(50, cfg) == pytest.approx(0.2)


def test_cosine_decay() -> None:
    cfg = NTPConfig(steps=10, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(1.0)
    assert lr_multiplier(5, cfg) == pytest.approx(0.55)  # cos(pi/2) = 0 -> 0.1 + 0.9 * 0.5
    assert lr_multiplier(10, cfg) == pytest.approx(0.1)
    assert lr_multiplier(2, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_scheduler_follows_multiplier_and_state_is_plain() -> None:
    cfg = NTPConfig(steps=6, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.0, lr=0.1)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_multiplier(s, cfg) for s in range(6)])
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])
    assert set(sched.state_dict()["lr_lambdas"]) == {None}  # nothing that weights_only loading would refuse


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="warmup_steps=20 must be in"):
        lr_multiplier(0, NTPConfig(steps=10, warmup_steps=20))
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_multiplier(0, NTPConfig(min_lr_ratio=1.5))
