"""The REFINE mid-training stage end to end: CLI run, metrics in MLflow, bitwise resume, the NTP baseline arm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refine_core.config import load_config
from refine_core.stages.prepare_data import prepare_data
from refine_core.stages.train_refine import train_refine

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "device=cpu",
    "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 24, synthetic_words: 40}]",
    "data.min_tokens=120",
    "data.max_tokens=160",
    "data.eval_docs=2",
    "refine.steps=4",
    "refine.batch_size=4",
    "refine.mini_batch_size=2",
    "refine.micro_batch_size=1",
    "refine.num_chunks=3",
    "refine.lr=1e-3",
    "refine.eval_every=2",
    "refine.eval_max_docs=2",
    "refine.save_every=1",
    "tracking.backend=none",
]


def cfg_for(out: Path, prepared: Path, *extra: str):
    return load_config(None, [f"output_dir={out}", f"data.prepared_dir={prepared}", *TINY, *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    prepare_data(cfg_for(root, root / "data"))
    return root / "data"


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_interrupted_then_resumed_refine_run_is_bitwise_identical(tmp_path, prepared):
    straight = train_refine(cfg_for(tmp_path / "a", prepared))
    first = train_refine(cfg_for(tmp_path / "b", prepared, "refine.stop_after=2"))
    assert first.steps == 2
    resumed = train_refine(cfg_for(tmp_path / "b", prepared, "refine.resume=true"))
    assert resumed.steps == 4
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert all(torch.equal(a[key], b[key]) for key in a)
    tail = [h["refine/reward_mean"] for h in straight.history if h["step"] > 2]
    assert tail == [h["refine/reward_mean"] for h in resumed.history if "refine/reward_mean" in h]


def test_ntp_only_baseline_arm_writes_its_own_stage(tmp_path, prepared):
    result = train_refine(cfg_for(tmp_path, prepared, "refine.nsp_update=false", "refine.steps=2"))
    assert result.model_dir == tmp_path / "train-refine-baseline" / "model"
    assert all("refine/reward_mean" not in h for h in result.history)
    assert [h["refine/optimizer_steps"] for h in result.history if "refine/optimizer_steps" in h] == [2.0, 2.0]


def test_two_step_run_from_the_command_line_logs_to_mlflow(tmp_path, prepared):
    overrides = [o for o in TINY if not o.startswith("tracking.")] + [
        f"output_dir={tmp_path}",
        f"data.prepared_dir={prepared}",
        "refine.steps=2",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=cli-refine",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_core",
            "train-refine",
            "--config",
            str(REPO / "configs/tiny-refine.yaml"),
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cli-refine").experiment_id])
    assert run.info.status == "FINISHED"
    logged = set(run.data.metrics)
    for name in (
        "refine/ntp_loss",
        "refine/nsp_loss",
        "refine/reward_mean",
        "refine/reward_cosine_mean",
        "refine/reward_em_mean",
        "refine/frac_zero_std_groups",
        "refine/clip_frac",
        "refine/ratio_mean",
        "refine/ratio_max",
        "refine/grad_norm",
        "refine/entropy_chosen",
        "refine/entropy_document",
        "refine/tokens_per_s",
        "time/entropy_s",
        "time/rollout_s",
        "time/update_s",
        "eval/loss",
    ):
        assert name in logged, name
    assert run.data.params["refine.engine"] == "branch"
