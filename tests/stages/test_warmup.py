"""``refine warmup``: runs the config's NTP pass, REFINE step and generation once, reports the Triton cache, and
writes nothing else (no output directory, checkpoint, MLflow run or download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refine_core import cli, tracking
from refine_core.config import load_config
from refine_core.stages.warmup import count_cache_files, warmup

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "device=cpu",
    "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
    "refine.num_chunks=3",
    "data.min_tokens=256",
    "data.max_tokens=256",
    "refine.batch_size=2",
    "refine.mini_batch_size=2",
    "refine.micro_batch_size=1",
]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and home inside ``tmp_path``; trackers and hub downloads fail loudly."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)  # restored after the test; warmup sets it

    def no_tracker(*args: object, **kwargs: object) -> None:
        raise AssertionError("warmup must not open an MLflow run")

    monkeypatch.setattr(tracking, "make_tracker", no_tracker)
    return tmp_path


def test_warmup_on_tiny_refine_config(sandbox: Path) -> None:
    cache = sandbox / "ckpt" / "triton"
    (cache / "old-kernel").mkdir(parents=True)
    (cache / "old-kernel" / "k.json").write_text("{}")  # a cache left by an earlier job counts
    out = sandbox / "out"
    cfg = load_config(
        REPO / "configs" / "tiny-refine.yaml",
        [*TINY, f"output_dir={out}", f"triton_cache_dir={cache}", f"model.cache_dir={sandbox / 'hf'}"],
    )
    report = warmup(cfg)

    assert report["triton_cache_dir"] == str(cache) == os.environ["TRITON_CACHE_DIR"]
    # No Triton on CPU: the cache is only counted (on CUDA, cache_files_after grows by the compiled kernels).
    assert report["cache_files_before"] == report["cache_files_after"] == count_cache_files(cache) == 1
    assert report["device"] == "cpu" and report["doc_tokens"] == 256
    assert report["refine_optimizer_steps"] == 1  # one mini-batch of 2 documents: one AdamW step
    assert set(report["phases"]) == {"build", "ntp", "refine_step", "generate"}
    assert 0 < sum(report["phases"].values()) <= report["seconds"] < 60
    # Nothing but the cache: no output directory, checkpoints, MLflow store, download cache, or files in cwd/home.
    assert sorted(p.name for p in sandbox.iterdir()) == ["ckpt", "home", "work"]
    assert list((sandbox / "work").iterdir()) == [] and list((sandbox / "home").iterdir()) == []
    assert [p.relative_to(cache).as_posix() for p in cache.rglob("*")] == ["old-kernel", "old-kernel/k.json"]


def test_warmup_from_the_command_line(sandbox: Path) -> None:
    cache = sandbox / "triton"
    argv = ["warmup", "--config", str(REPO / "configs" / "tiny-refine.yaml"), *TINY, f"output_dir={sandbox / 'out'}",
            f"triton_cache_dir={cache}"]
    assert cli.main(argv) == 0
    assert os.environ["TRITON_CACHE_DIR"] == str(cache) and cache.is_dir()
    assert sorted(p.name for p in sandbox.iterdir()) == ["home", "triton", "work"]
