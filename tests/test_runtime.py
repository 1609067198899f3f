"""Runtime helpers: RNG snapshot round trip through a weights_only checkpoint, seeding, devices, autocast, logging."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from refine_core import runtime


def draws() -> tuple[list[float], list[float], list[float], float, float]:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        random.gauss(0.0, 1.0),  # exercises python's cached gauss_next
        float(np.random.randn()),  # and numpy's cached gaussian
    )


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    runtime.seed_everything(123)
    draws()  # move away from the seeded state, and leave cached gaussians behind
    random.gauss(0.0, 1.0)
    np.random.randn()
    state = runtime.capture_rng_state()
    expected = draws()

    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True, map_location="cpu")
    runtime.seed_everything(999)  # scramble everything
    draws()
    runtime.restore_rng_state(loaded)
    assert draws() == expected


def test_seed_everything_is_reproducible_and_checked() -> None:
    runtime.seed_everything(7)
    first = draws()
    runtime.seed_everything(7)
    assert draws() == first
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(-1)


def test_select_device() -> None:
    assert runtime.select_device("cpu") == torch.device("cpu")
    assert runtime.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        runtime.select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*device=cpu"):
            runtime.select_device("cuda")


def test_autocast_cpu() -> None:
    a = torch.randn(4, 4)
    for precision in ("auto", "fp32"):
        with runtime.autocast(torch.device("cpu"), precision):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ a).dtype == torch.float32
    with runtime.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"), runtime.autocast("cpu", "fp16"):
        pass


def test_git_commit_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_PACKAGE_PARENT", Path("/"))  # not a checkout
    monkeypatch.setenv("REFINE_GIT_COMMIT", "deadbeef")
    assert runtime.git_commit() == "deadbeef"
    monkeypatch.delenv("REFINE_GIT_COMMIT")
    assert runtime.git_commit() is None
    monkeypatch.setenv("PATH", "")  # no git binary at all
    assert runtime.git_commit() is None


def test_setup_logging_idempotent() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        runtime.setup_logging("INFO")
        runtime.setup_logging("debug")
        ours = [h for h in root.handlers if getattr(h, "_refine_handler", False)]
        assert len(ours) == 1 and root.level == logging.DEBUG
        with pytest.raises(ValueError, match="log level"):
            runtime.setup_logging("LOUD")
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)


def test_configure_triton_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.configure_triton_cache() == tmp_path / "mine"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    path = runtime.configure_triton_cache()
    assert path.name == ".triton_cache"
    assert path.parent == (runtime._repo_root() or Path.cwd())
    assert runtime.configure_triton_cache() == path
