"""``refine pipeline compile|run|submit``: reached from the ``refine`` command line, compile writes IR files, a
config holding a credential is refused, and submit drives kfp.Client (a recording fake here) through upload,
version, experiment, run and wait."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kfp
import pytest
import yaml

from pipelines import PIPELINES, cli
from refine_core import cli as refine_cli

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny-cpu.yaml")


def test_compile_through_the_refine_command(tmp_path: Path, capsys) -> None:
    assert refine_cli.main(["pipeline", "compile", "--output", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == sorted(f"refine-{n}.yaml" for n in PIPELINES)
    assert "wrote" in capsys.readouterr().out
    assert refine_cli.main(["pipeline", "compile", "--pipeline", "eval", "--output", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["refine-eval.yaml"]


def test_compile_with_more_gpus_builds_the_trainjob_variants(tmp_path: Path, capsys) -> None:
    assert refine_cli.main(["pipeline", "compile", "--nodes", "2", "--gpus-per-node", "8", "--output",
                            str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == ["refine-full-2x8gpu.yaml", "refine-midtrain-2x8gpu.yaml", "refine-pretrain-2x8gpu.yaml"]
    spec = next(yaml.safe_load_all((tmp_path / "refine-midtrain-2x8gpu.yaml").read_text()))
    assert "comp-launch-trainjob" in spec["components"]
    capsys.readouterr()
    assert refine_cli.main(["pipeline", "compile", "--pipeline", "eval", "--gpus-per-node", "4", "--output",
                            str(tmp_path / "eval")]) == 2
    assert "no data-parallel training stage" in capsys.readouterr().err
    assert refine_cli.main(["pipeline", "compile", "--nodes", "0", "--output", str(tmp_path / "zero")]) == 2


def test_refine_help_lists_the_pipeline_command(capsys) -> None:
    with pytest.raises(SystemExit):
        refine_cli.main(["--help"])
    assert "pipeline" in capsys.readouterr().out


@pytest.mark.parametrize("override", [
    "tracking.tags={aws_secret_access_key: AKIAXXXXXXXX}",
    "tracking.tracking_uri=https://alice:hunter22@mlflow.example.com",
])
def test_a_config_with_a_credential_is_refused(override: str, capsys) -> None:
    assert cli.main(["run", "--config", TINY, override]) == 2
    assert "Kubernetes Secrets" in capsys.readouterr().err


def test_bad_config_exits_2(capsys) -> None:
    assert cli.main(["run", "--config", TINY, "refine.stepz=3"]) == 2
    assert "refine.stepz" in capsys.readouterr().err


def test_local_config_makes_task_paths_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: paths resolve through the config file's location
    cfg, text = cli.pipeline_config(TINY, [], absolute_paths=True)
    for path in [*cfg.post.train_files, *cfg.eval.task_files]:
        assert Path(path).is_absolute() and Path(path).is_file()
    assert yaml.safe_load(text)["post"]["train_files"] == cfg.post.train_files
    remote, _ = cli.pipeline_config(TINY, [], absolute_paths=False)
    assert remote.post.train_files == ["configs/data/ruler_squadqa_tiny_1024_train.parquet"]


class FakeClient:
    """Records the kfp.Client calls `submit` makes; the pipeline exists after the first upload."""

    def __init__(self, state: str = "SUCCEEDED", **kwargs: Any) -> None:
        self.kwargs, self.state, self.calls, self.pipelines = kwargs, state, [], {}

    def get_pipeline_id(self, name: str) -> str | None:
        self.calls.append(("get_pipeline_id", name))
        return self.pipelines.get(name)

    def upload_pipeline(self, path: str, pipeline_name: str, description: str, namespace: str | None):
        assert Path(path).is_file()
        self.calls.append(("upload_pipeline", pipeline_name))
        self.pipelines[pipeline_name] = "pid-1"
        return SimpleNamespace(pipeline_id="pid-1")

    def upload_pipeline_version(self, path: str, pipeline_version_name: str, pipeline_id: str):
        assert yaml.safe_load_all(Path(path).read_text())
        self.package = Path(path).read_text()  # the compiled pipeline, as the cluster receives it
        self.calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id))
        return SimpleNamespace(pipeline_version_id=f"vid-{len(self.calls)}")

    def create_experiment(self, name: str, namespace: str | None = None):
        self.calls.append(("create_experiment", name))
        return SimpleNamespace(experiment_id="eid-1")

    def run_pipeline(self, experiment_id: str, job_name: str, params: dict, pipeline_id: str, version_id: str,
                     service_account: str | None = None):
        self.calls.append(("run_pipeline", experiment_id, job_name, pipeline_id, version_id))
        self.params = params
        self.service_account = service_account
        return SimpleNamespace(run_id="rid-1")

    def get_run(self, run_id: str):
        self.calls.append(("get_run", run_id))
        return SimpleNamespace(state=self.state)


@pytest.mark.parametrize(("state", "status"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_uploads_a_version_runs_it_and_waits(monkeypatch, capsys, state: str, status: int) -> None:
    clients: list[FakeClient] = []
    monkeypatch.setenv("KFP_TOKEN", "fake-token")

    def make_client(**kwargs: Any) -> FakeClient:
        clients.append(FakeClient(state, **kwargs))
        return clients[-1]

    monkeypatch.setattr(kfp, "Client", make_client)
    monkeypatch.setenv(cli.SERVICE_ACCOUNT_ENV, "refine-launcher")
    argv = ["submit", "--host", "http://kfp.example:8080", "--config", TINY, "--experiment", "nightly",
            "--version-name", "v-1", "--run-name", "r-1", "--param", "model_name=deltanet-x", "--wait",
            "refine.steps=3"]
    assert cli.main(argv) == status
    [client] = clients
    assert client.kwargs == {"host": "http://kfp.example:8080", "namespace": "kubeflow", "existing_token": "fake-token"}
    assert [c[0] for c in client.calls] == ["get_pipeline_id", "upload_pipeline", "upload_pipeline_version",
                                            "create_experiment", "run_pipeline", "get_run"]
    assert client.calls[2] == ("upload_pipeline_version", "v-1", "pid-1")
    assert client.calls[4] == ("run_pipeline", "eid-1", "r-1", "pid-1", "vid-3")
    assert set(client.params) == {"config_yaml", "model_name"} and client.params["model_name"] == "deltanet-x"
    assert yaml.safe_load(client.params["config_yaml"])["refine"]["steps"] == 3
    # a cluster resolves task files in the pod: they stay as written
    assert yaml.safe_load(client.params["config_yaml"])["post"]["train_files"][0].startswith("configs/")
    assert client.service_account == "refine-launcher"  # from $REFINE_KFP_SERVICE_ACCOUNT
    out = capsys.readouterr().out
    assert "http://kfp.example:8080/#/runs/details/rid-1" in out and f"finished: {state}" in out


def test_submit_reuses_an_existing_pipeline_without_waiting() -> None:
    client = FakeClient()
    client.pipelines["refine-eval"] = "pid-9"
    run_id, state = cli.submit("http://h", "eval", {"config_yaml": "{}", "model_uri": "s3://b/m"}, experiment="e",
                               run_name="r", version_name="v", client=client)
    assert (run_id, state) == ("rid-1", None)
    assert [c[0] for c in client.calls] == ["get_pipeline_id", "upload_pipeline_version", "create_experiment",
                                            "run_pipeline"]
    assert client.service_account is None  # none named: the cluster's default account


def test_submit_service_account_flag_then_environment_then_none(monkeypatch) -> None:
    """The TrainJob launcher needs a run that starts as refine-launcher (its Role may create TrainJobs)."""
    base = ["submit", "--host", "http://h", "--config", TINY]
    monkeypatch.delenv(cli.SERVICE_ACCOUNT_ENV, raising=False)
    assert cli.build_parser().parse_args(base).service_account is None
    assert cli.build_parser().parse_args([*base, "--service-account", "refine-launcher"]).service_account == (
        "refine-launcher")
    monkeypatch.setenv(cli.SERVICE_ACCOUNT_ENV, "")  # set but empty: still the cluster's default
    assert cli.build_parser().parse_args(base).service_account is None
    monkeypatch.setenv(cli.SERVICE_ACCOUNT_ENV, "from-env")
    assert cli.build_parser().parse_args(base).service_account == "from-env"
    assert cli.build_parser().parse_args([*base, "--service-account", "refine-launcher"]).service_account == (
        "refine-launcher")


def test_submit_dry_run_summarizes_the_compiled_pipeline_and_contacts_nothing(monkeypatch, capsys) -> None:
    import kfp

    monkeypatch.setattr(kfp, "Client", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no cluster contact")))
    assert cli.main(["submit", "--config", TINY, "--host", "http://unreachable.invalid", "--dry-run",
                     "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "nothing was submitted" in out and "1 node(s) x 4 GPU(s)" in out
    assert "prepare-data" in out and "ttt-evaluate" in out  # tasks inside the exit handler are listed too


def test_print_config_on_run_and_submit_prints_the_resolved_config(capsys) -> None:
    for command in (["run"], ["submit", "--host", "http://unreachable.invalid"]):
        assert cli.main([*command, "--config", TINY, "refine.steps=7", "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["refine"]["steps"] == 7 and printed["name"]


def launcher_tasks(package: str) -> list[dict[str, Any]]:
    """The constant parameters of every launch-trainjob task of a compiled pipeline."""
    spec = next(yaml.safe_load_all(package))
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return [{k: v["runtimeValue"]["constant"] for k, v in task["inputs"]["parameters"].items() if "runtimeValue" in v}
            for dag in dags for task in dag["tasks"].values()
            if task["componentRef"]["name"].startswith("comp-launch-trainjob")]


def test_submit_on_2x8_gpus_builds_the_trainjob_pipeline_from_the_config(monkeypatch, caplog) -> None:
    clients: list[FakeClient] = []
    monkeypatch.setattr(kfp, "Client", lambda **kw: clients.append(FakeClient(**kw)) or clients[-1])
    monkeypatch.delenv(cli.SERVICE_ACCOUNT_ENV, raising=False)
    base = ["submit", "--host", "http://h", "--config", TINY, "--pipeline", "midtrain", "--nodes", "2",
            "--gpus-per-node", "8", "trainjob.checkpoint_root=s3://refine/ckpt", "trainjob.node.memory=700Gi"]
    assert cli.main([*base, "--service-account", "refine-launcher"]) == 0
    launchers = launcher_tasks(clients[-1].package)
    assert len(launchers) == 2  # both arms
    for params in launchers:
        assert (params["num_nodes"], params["procs_per_node"], params["resume"]) == (2, 8, True)
        assert params["checkpoint_root"] == "s3://refine/ckpt"
        assert params["node_resources"]["limits"] == {"cpu": "96", "memory": "700Gi", "nvidia.com/gpu": "8"}
    assert clients[-1].service_account == "refine-launcher"
    assert "TrainJobs" not in caplog.text
    assert cli.main(base) == 0  # no account named: submitted, with a warning saying what is needed
    assert clients[-1].service_account is None and "--service-account refine-launcher" in caplog.text


def test_nodes_and_gpus_default_from_the_environment(monkeypatch, capsys) -> None:
    base = ["submit", "--host", "http://h", "--config", TINY]
    monkeypatch.setenv(cli.NODES_ENV, "2")
    monkeypatch.setenv(cli.GPUS_PER_NODE_ENV, "8")
    args = cli.build_parser().parse_args(base)
    assert (args.nodes, args.gpus_per_node) == (2, 8)
    assert cli.build_parser().parse_args([*base, "--nodes", "1"]).nodes == 1  # the flag wins
    monkeypatch.setenv(cli.NODES_ENV, "")
    assert cli.build_parser().parse_args(base).nodes == 1
    monkeypatch.setenv(cli.NODES_ENV, "two")
    with pytest.raises(SystemExit) as exc:
        cli.build_parser()
    assert exc.value.code == 2 and "$REFINE_TRAIN_NODES='two' must be a whole number >= 1" in capsys.readouterr().err


def test_compile_takes_the_trainjob_section_of_a_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("trainjob:\n  launcher: {cpu: '2', memory: 8Gi}\n  keep_staged: true\n")
    assert cli.main(["compile", "--pipeline", "pretrain", "--nodes", "2", "--gpus-per-node", "4", "--config",
                     str(config), "--output", str(tmp_path)]) == 0
    package = (tmp_path / "refine-pretrain-2x4gpu.yaml").read_text()
    [params] = launcher_tasks(package)
    assert params["keep_staged"] is True and params["node_resources"]["limits"]["nvidia.com/gpu"] == "4"
    executors = next(yaml.safe_load_all(package))["deploymentSpec"]["executors"]
    launcher = next(e for name, e in executors.items() if "launch-trainjob" in name)["container"]["resources"]
    assert (launcher["resourceCpuRequest"], launcher["resourceMemoryLimit"]) == ("2", "8Gi")
    config.write_text("trainjob:\n  node: {cpu: plenty}\n")
    assert cli.main(["compile", "--pipeline", "pretrain", "--gpus-per-node", "2", "--config", str(config),
                     "--output", str(tmp_path)]) == 2
