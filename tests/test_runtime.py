"""Runtime helpers: RNG snapshot round trip through a weights_only checkpoint, seeding, devices, autocast, logging,
the Triton cache location."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from refine_core import runtime
from refine_core.config import load_config
from refine_core.tokenizer import ByteTokenizer
from refine_core.training.setup import build_or_load_model


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


def test_configure_triton_cache_with_a_configured_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A configured directory wins over the environment, is made absolute (torchrun workers with another working
    # directory must agree), created, and exported for Triton.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "from-env"))
    monkeypatch.chdir(tmp_path)
    path = runtime.configure_triton_cache("volume/triton")
    assert path == tmp_path / "volume" / "triton" and path.is_absolute() and path.is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(path)
    assert runtime.configure_triton_cache(path) == path  # idempotent
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.configure_triton_cache("~/triton") == tmp_path / "home" / "triton"
    # None keeps the old behaviour: whatever the environment says now.
    assert runtime.configure_triton_cache(None) == tmp_path / "home" / "triton"


def test_build_or_load_model_puts_the_configured_triton_cache_in_effect(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # KFP components call the stages without the CLI: building the model is the last moment before fla compiles.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "from-env"))
    tiny = "model.config={hidden_size: 16, num_hidden_layers: 1, num_heads: 2}"
    build_or_load_model(load_config(None, [tiny]), ByteTokenizer(), torch.device("cpu"))
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "from-env")  # not configured: left alone
    cfg = load_config(None, [tiny, f"triton_cache_dir={tmp_path / 'ckpt' / 'triton'}"])
    build_or_load_model(cfg, ByteTokenizer(), torch.device("cpu"))
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "ckpt" / "triton")
    assert (tmp_path / "ckpt" / "triton").is_dir()
