"""The ``launch-trainjob`` component end to end: it stages the data, creates the TrainJob through a kubeconfig, the
loopback fake API runs it under real ``torchrun`` (2 emulated nodes, gloo on CPU), and the component returns the
model that the trainers' rank 0 exported, with the stage's MLflow run holding what rank 0 logged.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from components.launch_trainjob import launch_trainjob
from components.prepare_data import prepare_data
from components.start_run import start_run
from refine_core.config import parse_overrides
from refine_core.distributed import handover
from refine_core.distributed.trainjob import TrainJobFailed
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
                         "export_uri": str(prefix / "result"), "output_dir": handover.POD_OUTPUT_DIR,
                         "checkpoint_uri": str(prefix / "checkpoints"), "refine.resume": True}
    assert not prefix.exists() or not any(prefix.iterdir())  # the job succeeded: everything staged was deleted
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


def staged(prefix: Path) -> set[str]:
    """What is left under a task's staging prefix (``data``, ``result``, ``checkpoints``, ...)."""
    return {p.name for p in prefix.iterdir()} if prefix.is_dir() else set()


@pytest.mark.slow
def test_a_preempted_trainjob_resumes_in_the_retry_and_the_staged_data_is_deleted(
    tmp_path: Path, data, tracking_uri: str, monkeypatch, capsys
) -> None:
    """The first attempt loses a node right after its step-2 checkpoint; KFP's retry of the task (the same run and
    task, so the same checkpoint location) resumes there. Staged inputs go when either attempt ends, the
    checkpoints only after the success. (That a resumed job ends with an uninterrupted job's weights is shown for
    FSDP with S3 checkpoints in tests/distributed/test_trainjob.py.)"""
    config = tiny_config_yaml("ntp.steps=6", "ntp.save_every=2", "ntp.eval_every=0", "ntp.batch_size=4",
                              "ntp.micro_batch_size=2", "tracking.backend=none")
    staging = tmp_path / "staging"
    prefix = staging / KFP_RUN / "pretrain-ntp"

    def attempt(fake: ExecutingKubernetes, task: str, out: Path) -> StubArtifact:
        outputs = {name: stub(out, name) for name in ("model", "metrics", "report")}
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake)))
        launch_trainjob.python_func(
            stage="train-ntp", config_yaml=config, data=data, task_config=dsl.TaskConfig(), num_nodes=2,
            procs_per_node=1, staging_uri=str(staging), kfp_run_id=KFP_RUN, kfp_task=task, namespace="refine",
            poll_s=0.2, timeout_s=300, **outputs,
        )
        return outputs["model"]

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    preempt = re.compile(r"saved checkpoint .*step_00000002")
    with ExecutingKubernetes(tmp_path / "pods", extra_env={"OMP_NUM_THREADS": "1"}, shared=[tmp_path],
                             preempt_on=preempt) as fake:
        with pytest.raises(TrainJobFailed, match=r"exited with code -9"):
            attempt(fake, "pretrain-ntp", tmp_path / "attempt-1")
        first = capsys.readouterr().out
        # The failed attempt's inputs are gone; its checkpoints stay for the retry.
        assert staged(prefix) == {"checkpoints"}
        saved = [int(m) for m in re.findall(r"saved checkpoint \S*step_(\d{8})", first)]
        assert saved and saved[-1] >= 2 and not re.search(r"step 6/6", first)  # killed mid-run
        model = attempt(fake, "pretrain-ntp", tmp_path / "attempt-2")  # KFP's retry: same run, same task
        second = capsys.readouterr().out
    [preempted] = fake.preempted
    assert preempted.endswith("-node-0-0-abcde")  # rank 0's node, right after it committed step 2
    assert re.search(rf"resumed train-ntp from \S+/step_{saved[-1]:08d} at step {saved[-1]}\b", second), second
    assert "resume is set but there is no complete checkpoint" not in second
    assert re.search(r"step 6/6", second) and "step 2/6" not in second  # steps 3 to 6 only
    assert staged(prefix) == set()  # data, result and, after the success, the checkpoints: all deleted
    assert (Path(model.path) / "model.safetensors").is_file() and model.metadata["steps"] == 6
    trainer_args = [job["spec"]["trainer"]["args"] for job in fake.created]
    overrides = [dict(parse_overrides([a for a in args if "=" in a])) for args in trainer_args]
    assert [o["ntp.resume"] for o in overrides] == [True, True]
    assert overrides[0]["checkpoint_uri"] == overrides[1]["checkpoint_uri"] == str(prefix / "checkpoints")
