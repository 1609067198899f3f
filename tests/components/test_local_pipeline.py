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


@pytest.mark.slow
def test_multi_gpu_midtraining_runs_as_trainjobs_from_the_local_pipeline(
    tmp_path: Path, tracking_uri: str, mlflow_client, local_session, capsys, monkeypatch
) -> None:
    """``refine pipeline run --pipeline midtrain --nodes 2``: each arm's task is the TrainJob launcher, which the
    loopback Kubernetes fake runs under real torchrun on two emulated nodes; the models come back as artifacts."""
    from tests.distributed.fake_k8s import ExecutingKubernetes, write_kubeconfig

    monkeypatch.chdir(tmp_path)
    root, staging = tmp_path / "kfp", tmp_path / "staging"
    with ExecutingKubernetes(tmp_path / "pods", extra_env={"OMP_NUM_THREADS": "1"}, shared=[tmp_path]) as fake:
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake)))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("REFINE_STAGING_URI", str(staging))  # what the refine-config ConfigMap sets in a cluster
        status = cli.main(["run", "--config", str(TINY_CONFIG), "--pipeline", "midtrain", "--pipeline-root",
                           str(root), "--nodes", "2", "--gpus-per-node", "1", *SMALLER, "name=local-trainjobs"])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]

    assert len(fake.created) == 2 and all(run.exit_codes == [0, 0] for run in fake.runs.values())
    arms = {dict(a.split("=", 1) for a in job["spec"]["trainer"]["args"][4:])["refine.nsp_update"]
            for job in fake.created}
    assert arms == {"true", "false"}  # the REFINE arm and the NTP-only baseline arm
    [run_dir] = root.glob("refine-midtrain-*")
    models = sorted(run_dir.glob("launch-trainjob*/model/model.safetensors"))
    assert len(models) == 2
    [parent] = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="tags.`refine.role` = 'pipeline' and tags.`refine.run_name` = 'local-trainjobs'",
    )
    assert parent.info.status == "FINISHED"
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {run.info.run_name.removeprefix("local-trainjobs-"): run for run in children}
    assert set(by_stage) == {"train-refine", "train-refine-baseline"}
    assert all(run.data.tags["refine.world_size"] == "2" for run in children)
    assert "refine/reward_mean" in by_stage["train-refine"].data.metrics  # logged by rank 0 of the TrainJob
    assert "eval/loss" in by_stage["train-refine-baseline"].data.metrics
