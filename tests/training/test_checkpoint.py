"""Atomic checkpoints: save / latest / prune, crashes mid-save, markers, weights_only trainer state."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from refine_core import runtime
from refine_core.training.checkpoint import (
    MARKER,
    TRAINER_STATE,
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
)


def write_model(payload: str = "weights") -> Callable[[Path], None]:
    def write(path: Path) -> None:
        (path / "config.json").write_text(json.dumps({"model_type": "delta_net"}))
        (path / "model.safetensors").write_text(payload)
        (path / "tokenizer").mkdir()
        (path / "tokenizer" / "vocab.txt").write_text("a b c")

    return write


def test_save_latest_prune(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    assert manager.latest() is None and manager.list_complete() == []
    for step in (10, 20, 30):
        path = manager.save(step, write_model(f"w{step}"), {"data_position": step * 8})
        assert path == tmp_path / "ckpt" / f"step_{step:08d}"
        assert manager.latest() == path
    assert [p.name for p in manager.list_complete()] == ["step_00000020", "step_00000030"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000020", "step_00000030"]
    latest = manager.latest()
    assert (latest / "model.safetensors").read_text() == "w30"
    assert (latest / "tokenizer" / "vocab.txt").is_file()
    marker = json.loads((latest / MARKER).read_text())
    assert marker["step"] == 30 and "time" in marker
    state = manager.load_trainer_state(latest)
    assert state == {"data_position": 240, "step": 30}


def test_failing_write_keeps_previous_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    good = manager.save(5, write_model(), {"x": 1})

    def crash(path: Path) -> None:
        (path / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(CheckpointWriteError, match=r"step 6 .* failed \(disk full\); the previous checkpoint"):
        manager.save(6, crash, {"x": 2})
    assert manager.latest() == good
    assert manager.list_complete() == [good]
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # the temporary directory was removed


def test_dirs_without_marker_and_tmp_dirs_are_ignored_then_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    good = manager.save(1, write_model(), {})
    crashed = tmp_path / "step_00000002"  # renamed into place, then the process died before the marker
    crashed.mkdir()
    (crashed / TRAINER_STATE).write_bytes(b"")
    stale = tmp_path / ".tmp-step_00000003-0123abcd"
    stale.mkdir()
    assert manager.latest() == good
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        manager.load_trainer_state(crashed)
    manager.save(4, write_model(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000004"]


def test_resave_same_step_replaces_and_survives_interrupted_replacement(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(7, write_model("old"), {"v": 1})
    path = manager.save(7, write_model("new"), {"v": 2})
    assert (path / "model.safetensors").read_text() == "new"
    assert manager.load_trainer_state(path)["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]

    # Simulate a crash after the old copy was parked and the new one renamed in, but before its marker.
    parked = tmp_path / ".replaced-step_00000007-0123abcd"
    os.replace(path, parked)
    path.mkdir()
    assert manager.latest() == parked  # the parked copy still counts
    assert manager.load_trainer_state(manager.latest())["v"] == 2
    manager.save(8, write_model(), {"v": 3})  # the next save recovers the parked copy, then prunes it
    assert [p.name for p in manager.list_complete()] == ["step_00000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008"]


def test_optimizer_scheduler_rng_state_load_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()

    manager = CheckpointManager(tmp_path, keep=2)
    path = manager.save(
        1,
        lambda d: torch.save(model.state_dict(), d / "model.pt"),
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": runtime.capture_rng_state(),
            "data": {"epoch": 0, "position": 24, "order": torch.randperm(5)},
        },
    )
    state = manager.load_trainer_state(path)
    assert state["step"] == 1
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (8, 4)
    assert state["optimizer"]["state"][0]["step"].item() == 1

    fresh = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    fresh.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(state["optimizer"])
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    runtime.restore_rng_state(state["rng"])


def test_rejects_state_that_weights_only_cannot_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    with pytest.raises(CheckpointError, match=r"trainer_state\['pos'\] is a numpy.int64"):
        manager.save(1, write_model(), {"pos": np.int64(3)})
    with pytest.raises(CheckpointError, match="disagrees"):
        manager.save(1, write_model(), {"step": 2})
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
    assert manager.latest() is None and list(tmp_path.iterdir()) == []
