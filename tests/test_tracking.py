"""Tracking: the MLflow backend against an embedded sqlite store in a temporary directory, and the null tracker.

MLflow's import and the store's schema creation take a couple of seconds, so one store is shared by the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from refine_core.config import RunConfig, load_config
from refine_core.redaction import REDACTED, is_secret_key, redact
from refine_core.tracking import CONFIG_ARTIFACT, NullTracker, Tracker, check_store_support, make_tracker

mlflow = pytest.importorskip("mlflow")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_PARENT_RUN_ID", "RANK")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh working directory holding the embedded store; MLflow env vars cleared."""
    workdir = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        for name in MLFLOW_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(workdir)
        yield workdir


@pytest.fixture(scope="module")
def client(store: Path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")


def cfg_for(name: str, *overrides: str) -> RunConfig:
    return load_config(None, [f"name={name}", "tracking.experiment=tests", *overrides])


def test_run_params_metrics_artifacts_tags(store: Path, client, tmp_path: Path) -> None:
    long_value = "x" * 7000  # over MLflow's per-value limit
    cfg = cfg_for("basic", "model.source=s3://bucket/model", f"tracking.tags={{team: lm, note: {long_value}}}")
    params = {f"p{i:03d}": i for i in range(150)}  # over MLflow's 100-per-batch limit
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "b.txt").write_text("world")

    with make_tracker(cfg, "train-ntp", {"refine.data_fingerprint": "abc123"}) as tracker:
        assert isinstance(tracker, Tracker) and not tracker.offline  # the server answered: no journal
        tracker.log_config(cfg)
        tracker.log_config(cfg)  # idempotent
        tracker.log_params(params)
        for step in range(3):
            tracker.log_metrics({"ntp/loss": 3.0 - step, "eval/ruler/niah": 0.1 * step}, step=step)
        tracker.log_artifact(tmp_path / "a.txt")
        tracker.log_artifacts(tmp_path / "dir", artifact_path="ckpt")
        tracker.set_tags({"extra": 1})
        run_id = tracker.run_id

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "basic-train-ntp"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    tags = run.data.tags
    assert tags["refine.stage"] == "train-ntp" and tags["refine.run_name"] == "basic"
    assert tags["refine.data_fingerprint"] == "abc123" and tags["team"] == "lm" and tags["extra"] == "1"
    assert not any(key.startswith("refine.env") for key in tags)

    p = run.data.params
    assert p["ntp.lr"] == "1e-06" and p["model.source"] == "s3://bucket/model" and p["ntp.betas"] == "[0.9, 0.999]"
    assert p["model.tokenizer"] == "byte" and p["data.max_tokens"] == "16384"  # "token" words are not secrets
    assert len(p["tracking.tags.note"]) <= 6000 and "truncated" in p["tracking.tags.note"]
    assert all(p[k] == str(v) for k, v in params.items())

    history = client.get_metric_history(run_id, "ntp/loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert "eval/ruler/niah" in run.data.metrics

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {CONFIG_ARTIFACT, "a.txt", "ckpt"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "ckpt/sub")] == ["ckpt/sub/b.txt"]
    # The embedded store keeps artifacts next to the database.
    assert run.info.artifact_uri.startswith((store / "mlruns" / "artifacts" / "tests").resolve().as_uri())
    config_text = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path))).read_text()
    assert load_config(Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path)))) == cfg
    assert "name: basic" in config_text


def test_secrets_are_redacted(client) -> None:
    cfg = cfg_for("secret", "tracking.tags={hf_token: hf_abc, AWS_SECRET_ACCESS_KEY: s3cr3t, apiToken: t0k}")
    with make_tracker(cfg, "s", {"db_password": "pw", "url": "https://user:pw@host/x"}) as tracker:
        tracker.log_config(cfg)
        tracker.log_params({"Credentials": "c", "access_key": "k", "tokenizer": "byte"})
        tracker.set_tags({"my_secret": "x"})
        run_id = tracker.run_id
    run = client.get_run(run_id)
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    for leaked in ("hf_abc", "s3cr3t", "t0k", ":pw@"):
        assert leaked not in logged, leaked
    assert "pw" not in run.data.tags.values()
    assert run.data.params["tracking.tags.hf_token"] == REDACTED
    assert run.data.params["Credentials"] == REDACTED and run.data.params["tokenizer"] == "byte"
    assert run.data.tags["db_password"] == REDACTED and run.data.tags["my_secret"] == REDACTED
    assert run.data.tags["url"] == f"https://{REDACTED}@host/x"
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
    assert "hf_abc" not in text and "s3cr3t" not in text


def test_secret_key_rules() -> None:
    for key in ("password", "DB_PASSWORD", "hf_token", "token", "apiToken", "aws_access_key_id", "secretKey",
                "credentials_file", "tracking.tags.github-token"):
        assert is_secret_key(key), key
    for key in ("model.tokenizer", "data.max_tokens", "ntp.lr", "tokens_seen", "access"):
        assert not is_secret_key(key), key
    nested = {"a": {"token": 1}, "l": [{"password": "p"}]}
    assert redact(nested) == {"a": {"token": REDACTED}, "l": [{"password": REDACTED}]}


def test_exception_marks_run_failed(client) -> None:
    with pytest.raises(RuntimeError, match="boom"), make_tracker(cfg_for("fail"), "train-ntp") as tracker:
        run_id = tracker.run_id
        raise RuntimeError("boom")
    assert client.get_run(run_id).info.status == "FAILED"


def test_nested_run_under_parent(client) -> None:
    cfg = cfg_for("pipe")
    with make_tracker(cfg, "pipeline") as parent:
        with make_tracker(cfg, "train-ntp", parent_run_id=parent.run_id) as child:
            child.log_metrics({"ntp/loss": 1.0}, step=0)
        os.environ["MLFLOW_PARENT_RUN_ID"] = parent.run_id  # how KFP components receive it
        try:
            with make_tracker(cfg, "evaluate") as child_env:
                pass
        finally:
            del os.environ["MLFLOW_PARENT_RUN_ID"]
    for run_id in (child.run_id, child_env.run_id):
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.info.status == "FINISHED"
    children = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert {r.info.run_id for r in children} == {child.run_id, child_env.run_id}


def test_continue_existing_run(client) -> None:
    cfg = cfg_for("resume")
    with make_tracker(cfg, "train-ntp") as first:
        first.log_config(cfg)
        first.log_metrics({"ntp/loss": 2.0}, step=0)
    changed = cfg_for("resume", "ntp.resume=true")
    with make_tracker(changed, "train-ntp", run_id=first.run_id) as second:
        second.log_config(changed)  # a changed param is kept as it was instead of failing the stage
        second.log_metrics({"ntp/loss": 1.0}, step=1)
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["ntp.resume"] == "False"
    assert [m.step for m in client.get_metric_history(first.run_id, "ntp/loss")] == [0, 1]


def test_null_tracker_and_backend_none() -> None:
    tracker = make_tracker(cfg_for("disabled", "tracking.backend=none"), "train-ntp")
    assert isinstance(tracker, NullTracker) and isinstance(tracker, Tracker)
    with tracker as t:
        t.log_config(RunConfig())
        t.log_params({"a": 1})
        t.log_metrics({"ntp/loss": 1.0}, step=0)
        t.log_artifact("missing.txt")
        t.log_artifacts("missing_dir")
        t.set_tags({"a": "b"})
        assert t.run_id is None
    with pytest.raises(ValueError), NullTracker():
        raise ValueError("propagates")


def test_non_zero_rank_gets_null_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert isinstance(make_tracker(cfg_for("rank1"), "train-ntp"), NullTracker)


def test_experiments_open_in_the_model_training_view(client) -> None:
    """MLflow 3's UI opens an experiment by its ``mlflow.experimentKind`` tag: ours are tagged for model training when
    created, and an existing untagged one (an older run of this code, or made by hand) is tagged on first use."""
    from refine_core.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

    with make_tracker(load_config(None, ["name=kind", "tracking.experiment=fresh-kind"]), "train-ntp"):
        pass
    assert client.get_experiment_by_name("fresh-kind").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    client.create_experiment("untagged-kind")
    with make_tracker(load_config(None, ["name=kind", "tracking.experiment=untagged-kind"]), "train-ntp"):
        pass
    assert client.get_experiment_by_name("untagged-kind").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_system_metrics_monitor_runs_for_the_life_of_the_run(client, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tracking.system_metrics``: MLflow's monitor starts on the stage run and stops (last sample logged) before
    the run ends. MLflow's monitor needs psutil, which the dev environment lacks, so a stand-in records the calls."""
    import importlib.util
    import sys

    events: list[tuple] = []

    class Monitor:
        def __init__(self, run_id, sampling_interval, tracking_uri, node_id):
            events.append(("new", run_id, sampling_interval, node_id))

        def start(self):
            events.append(("start",))

        def finish(self):
            events.append(("finish", client.get_run(run_id).info.status))  # the run is still open

    stand_in = type(sys)("mlflow.system_metrics.system_metrics_monitor")
    stand_in.SystemMetricsMonitor = Monitor
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", stand_in)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "psutil" else find_spec(name, *a))
    monkeypatch.setenv("NODE_RANK", "1")
    with make_tracker(cfg_for("sysm", "tracking.system_metrics=true", "tracking.system_metrics_interval_s=2"),
                      "train-ntp") as tracker:
        run_id = tracker.run_id
    assert events == [("new", run_id, 2.0, "node1"), ("start",), ("finish", "RUNNING")]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_system_metrics_without_psutil_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psutil" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"psutil.*refine-core\[system-metrics\]"):
        make_tracker(cfg_for("sysm", "tracking.system_metrics=true"), "train-ntp")
    with pytest.raises(ValueError, match="system_metrics_interval_s"):
        cfg_for("sysm", "tracking.system_metrics_interval_s=0")


def test_database_store_without_full_mlflow_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow-skinny (the images) opens no sqlite/PostgreSQL store: say so before MLflow fails obscurely."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    for uri in ("sqlite:////tmp/x/mlflow.db", "postgresql+psycopg://db:5432/mlflow"):
        with pytest.raises(ImportError, match=r"sqlalchemy not installed.*refine-core\[mlflow\]"):
            check_store_support(uri)
    for uri in ("http://mlflow:5000", "https://mlflow.example.com", "databricks"):
        assert check_store_support(uri) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    with pytest.raises(ImportError, match="full MLflow"):
        make_tracker(cfg_for("skinny"), "stage")
