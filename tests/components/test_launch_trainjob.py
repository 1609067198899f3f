"""The ``launch-trainjob`` component end to end: it stages the data, creates the TrainJob through a kubeconfig, the
loopback fake API runs it under real ``torchrun`` (2 emulated nodes, gloo on CPU), and the component returns the
model that the trainers' rank 0 exported, with the stage's MLflow run holding what rank 0 logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp import dsl

from components.launch_trainjob import launch_trainjob
from components.prepare_data import prepare_data
from components.start_run import start_run
from refine_core.config import parse_overrides
from refine_core.distributed import handover
from tests.components.conftest import StubArtifact, stub, tiny_config_yaml
from tests.distributed.fake_k8s import ExecutingKubernetes, write_kubeconfig

KFP_RUN = "kfp-run-launch"
CONFIG = tiny_config_yaml()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> StubArtifact:
    out = {name: stub(tmp_path_factory.mktemp("data"), name) for name in ("dataset", "metrics", "report")}
    prepare_data.python_func(config_yaml=CONFIG, **out)
    return out["dataset"]


def test_without_a_staging_location_nothing_is_launched(tmp_path: Path, data, monkeypatch) -> None:
    monkeypatch.delenv(handover.STAGING_ENV, raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    with pytest.raises(ValueError, match="REFINE_STAGING_URI"):
        launch_trainjob.python_func(
            stage="train-refine", config_yaml=CONFIG, data=data, task_config=dsl.TaskConfig(),
            **{name: stub(tmp_path, name) for name in ("model", "metrics", "report")},
        )


@pytest.mark.slow
def test_the_launcher_runs_the_stage_as_a_trainjob_and_returns_its_model(
    tmp_path: Path, data, tracking_uri: str, mlflow_client, monkeypatch, capsys
) -> None:
    parent = start_run.python_func(config_yaml=CONFIG, pipeline_name="refine-test", kfp_run_id=KFP_RUN)
    out = {name: stub(tmp_path / "out", name) for name in ("model", "metrics", "report")}
    staging = tmp_path / "staging"  # a volume the launcher and every trainer pod mount at the same path
    with ExecutingKubernetes(tmp_path / "pods", extra_env={"OMP_NUM_THREADS": "1"}, shared=[tmp_path]) as fake:
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake)))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        launch_trainjob.python_func(
            stage="train-refine", config_yaml=CONFIG, data=data, task_config=dsl.TaskConfig(), baseline=False,
            num_nodes=2, procs_per_node=1, staging_uri=str(staging), parent_run_id=parent, kfp_run_id=KFP_RUN,
            kfp_task="mid-train-refine", namespace="refine", poll_s=0.2, timeout_s=300, **out,
        )
    logs = capsys.readouterr().out

    # The TrainJob: 2 nodes x 1 process, the config text in its env, overrides pointing at the staged data and the
    # export location, and the stage run to continue.
    [created] = fake.created
    name = created["metadata"]["name"]
    trainer = created["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1) and fake.runs[name].exit_codes == [0, 0]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert yaml.safe_load(env["REFINE_CONFIG_YAML"]) == yaml.safe_load(CONFIG)
    prefix = staging / KFP_RUN / "mid-train-refine"
    overrides = dict(parse_overrides(trainer["args"][4:]))
    assert overrides == {"refine.nsp_update": True, "data.prepared_dir": str(prefix / "data"),
                         "export_uri": str(prefix / "result"), "output_dir": handover.POD_OUTPUT_DIR}
    assert (prefix / "data" / "manifest.json").is_file() and (prefix / "result" / "result.json").is_file()
    assert f"[{name}-node-0-0-abcde]" in logs and "joined process group: rank 0/2" in logs  # streamed here

    # The outputs: rank 0's exported model, the summary numbers, the report.
    model, metrics = out["model"], out["metrics"]
    assert (Path(model.path) / "model.safetensors").is_file() and (Path(model.path) / "config.json").is_file()
    assert model.metadata["trainjob"] == name and model.metadata["world_size"] == 2
    assert model.metadata["arm"] == "refine" and model.metadata["steps"] == 2
    assert model.metadata["data_fingerprint"] == data.metadata["data_fingerprint"]
    assert metrics.metadata["train/steps"] == 2.0
    assert Path(out["report"].path).read_text().startswith("# train-refine")

    # One MLflow stage run under the parent: opened by the launcher, continued by rank 0 in the trainer pod.
    run = mlflow_client.get_run(model.metadata["mlflow_run_id"])
    assert env["MLFLOW_RUN_ID"] == run.info.run_id
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["kfp.task"] == "mid-train-refine"
    assert run.data.tags["refine.world_size"] == "2" and run.info.status == "FINISHED"
    rewards = mlflow_client.get_metric_history(run.info.run_id, "refine/reward_mean")
    assert [m.step for m in rewards] == [1, 2]  # logged per step by the trainer's rank 0
    assert run.data.metrics["train/steps"] == 2
    model_files = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "model/artifacts/model")}
    assert "model/artifacts/model/model.safetensors" in model_files  # inside the logged MLflow Model
