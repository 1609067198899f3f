"""The full pipeline through kfp.local (``refine pipeline run``): every task is a subprocess running the real
component on a tiny config, and MLflow ends up with one parent run and a nested run per stage with its metrics.

Marked ``slow`` (about a minute on 2 cores, most of it interpreter start-up per task); CI runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp.local import config as local_config

from pipelines import cli
from tests.components.conftest import SMALLER, TINY_CONFIG

STAGE_RUNS = {  # run name suffix -> a metric the stage must have logged
    "train-refine": "refine/reward_mean",
    "train-refine-baseline": "eval/loss",
    "post-train-refine": "post/sft_loss",
    "post-train-ntp-baseline": "post/sft_loss",
    "ttt-refine": "eval/ruler_squadqa",
    "ttt-ntp-baseline": "eval/ruler_squadqa",
    "compare": "compare/refine_minus_ntp-baseline/eval/ruler_squadqa",
    "register": None,
}


@pytest.fixture
def local_session():
    """kfp.local.init is process-global: leave no session behind for other tests."""
    yield
    local_config.LocalExecutionConfig.instance = None


@pytest.mark.slow
def test_full_pipeline_runs_locally_and_tracks_every_stage(
    tmp_path: Path, tracking_uri: str, mlflow_client, local_session, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative task files resolve through the config's location, not the cwd
    root = tmp_path / "kfp"
    status = cli.main(["run", "--config", str(TINY_CONFIG), "--pipeline-root", str(root),
                       "--param", "model_name=refine-local-test", *SMALLER, "name=local-e2e"])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]

    [run_dir] = root.glob("refine-full-*")
    assert (run_dir / "compare-report" / "report").read_text().startswith("# REFINE vs the NTP baseline")
    assert (run_dir / "prepare-data" / "dataset" / "manifest.json").is_file()
    assert "browse: mlflow ui --backend-store-uri" in out and "comparison report:" in out

    [parent] = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="tags.`refine.role` = 'pipeline' and tags.`refine.run_name` = 'local-e2e'",
    )
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp.pipeline"] == "refine-full"
    assert {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "reports")} == {
        "reports/compare.md", "reports/compare.html"}
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {run.info.run_name.removeprefix("local-e2e-"): run for run in children}
    assert set(by_stage) == set(STAGE_RUNS)
    for stage, metric in STAGE_RUNS.items():
        run = by_stage[stage]
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["kfp.run_id"] == parent.data.tags["kfp.run_id"], stage
        assert run.data.tags["kfp.task"], stage
        if metric is not None:
            assert metric in run.data.metrics, (stage, sorted(run.data.metrics))
    [version] = mlflow_client.search_model_versions("name = 'refine-local-test'")
    assert version.tags["kfp.run_id"] == parent.data.tags["kfp.run_id"]
    assert version.run_id == by_stage["post-train-refine"].info.run_id
