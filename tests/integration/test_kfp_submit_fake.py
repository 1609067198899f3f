"""``refine pipeline submit`` end to end against a loopback fake of the KFP v2beta1 REST API (:mod:`fake_kfp`):
the real command in a subprocess, the real ``kfp.Client`` and its generated REST client, real HTTP.

It must upload the compiled pipeline (first use) and a new version, find or create the experiment, create a run of
that version with the config as a parameter, wait while the run goes RUNNING -> SUCCEEDED (or FAILED) and report
the state in its output and exit status. Credentials in its environment must not reach the API: the bearer token
travels only in the Authorization header, and no other secret appears in any request line, header or body.

Marked ``slow``: kfp.Client polls a run every 5 s, so each test takes about 10 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import refine_command
from tests.integration.fake_kfp import FakeKfp
from tests.integration.servers import client_env, run_bounded

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu.yaml"
PIPELINE = "refine-full"
EXPERIMENT = "nightly-integration"
SUBMIT_TIMEOUT_S = 90
SERVICE_ACCOUNT_ENV = "REFINE_KFP_SERVICE_ACCOUNT"  # the default of --service-account
KFP_TOKEN = "fake-kfp-bearer-token-0c1d2e"
# Fake secrets in the submitting process's environment; none may reach the API.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKESUBMITKEY123",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-7d41a9",
    "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user-5b2e",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-88c3",
    "MLFLOW_TRACKING_URI": "http://alice:fake-uri-password-19f0@mlflow.invalid",
    "HF_TOKEN": "hf_fakehubtoken4e5f",
}


def submit(fake: FakeKfp, tmp_path: Path, *args: str, wait: bool = True, env_extra: dict[str, str] | None = None):
    home = tmp_path / "home"  # no ~/.config/kfp/context.json of this machine
    home.mkdir(exist_ok=True)
    env = client_env({**SECRETS, "KFP_TOKEN": KFP_TOKEN}, home=home)
    env.pop(SERVICE_ACCOUNT_ENV, None)  # this machine's default account must not leak into the runs
    env.update(env_extra or {})
    cmd = [*refine_command(), "pipeline", "submit", "--host", fake.host, "--config", str(TINY),
           "--experiment", EXPERIMENT, *(["--wait", "--timeout", "60"] if wait else []), *args]
    done = run_bounded(cmd, env, tmp_path, SUBMIT_TIMEOUT_S)
    assert not done.timed_out, done.stderr[-3000:]
    return done


def assert_no_credentials_reached_the_api(fake: FakeKfp) -> None:
    assert fake.requests
    for request in fake.requests:
        auth = request.headers.get("authorization", "")
        assert auth == f"Bearer {KFP_TOKEN}", (request.path, auth)
        seen = b"\n".join([request.path.encode(), request.body,
                           *(f"{k}: {v}".encode() for k, v in request.headers.items() if k != "authorization")])
        for secret in [*SECRETS.values(), "fake-uri-password-19f0", KFP_TOKEN]:
            assert secret.encode() not in seen, (secret, request.method, request.path)


def test_submit_uploads_a_version_starts_a_run_and_waits_for_success(tmp_path: Path) -> None:
    with FakeKfp(run_states=["RUNNING", "SUCCEEDED"]) as fake:
        done = submit(fake, tmp_path, "--run-name", "integration-run", "--version-name", "v-integration-1",
                      "--param", "model_name=refine-submitted", "--nodes", "2", "--gpus-per-node", "8",
                      "--service-account", "refine-launcher", "refine.steps=3")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert not fake.unexpected, fake.unexpected
        [run_id] = fake.runs
        assert fake.calls() == [
            "GET healthz", "GET pipelines", "POST pipelines/upload", "POST pipelines/upload_version",
            "GET experiments", "POST experiments", "POST runs", f"GET runs/{run_id}", f"GET runs/{run_id}",
        ]
        # the compiled IR was uploaded, as the pipeline and as the named version
        [pipeline, version] = fake.uploads
        assert (pipeline.name, version.name) == (PIPELINE, "v-integration-1")
        assert version.pipeline_id == pipeline.pipeline_id == fake.pipelines[PIPELINE]
        spec = next(yaml.safe_load_all(version.package))
        assert spec["pipelineInfo"]["name"] == PIPELINE and "config_yaml" in spec["root"]["inputDefinitions"][
            "parameters"]
        # --nodes 2 --gpus-per-node 8: both mid-training arms are TrainJob launchers, no train-refine task is left
        components = set(spec["components"])
        assert {"comp-launch-trainjob", "comp-launch-trainjob-2"} <= components
        assert not any(c.startswith("comp-train-refine") for c in components)
        # the run: in the named experiment, of that version, with the config and the extra parameter
        body = fake.runs[run_id].body
        [experiment] = fake.experiments.values()
        assert experiment["display_name"] == EXPERIMENT and body["experiment_id"] == experiment["experiment_id"]
        assert body["display_name"] == "integration-run"
        # --service-account: the account whose Role may create TrainJobs, in the run body as kfp.Client sends it
        assert body["service_account"] == "refine-launcher"
        assert fake.runs[run_id].service_account == "refine-launcher"
        assert body["pipeline_version_reference"] == {"pipeline_id": pipeline.pipeline_id,
                                                      "pipeline_version_id": version.version_id}
        params = body["runtime_config"]["parameters"]
        assert set(params) == {"config_yaml", "model_name"} and params["model_name"] == "refine-submitted"
        config = yaml.safe_load(params["config_yaml"])
        assert config["refine"]["steps"] == 3 and config["name"] == "tiny-cpu"
        assert config["post"]["train_files"] == ["configs/data/ruler_squadqa_tiny_1024_train.parquet"]  # as written
        assert_no_credentials_reached_the_api(fake)
    out = done.stdout
    assert f"submitted run {run_id} of {PIPELINE} version 'v-integration-1' in experiment '{EXPERIMENT}'" in out
    assert f"{fake.host}/#/runs/details/{run_id}" in out
    assert f"run {run_id} finished: SUCCEEDED" in out


def test_a_failed_run_is_reported_with_a_nonzero_exit(tmp_path: Path) -> None:
    """The pipeline and the experiment exist already: submit reuses both and only adds a version."""
    with FakeKfp(run_states=["RUNNING", "FAILED"]) as fake:
        pipeline_id = fake.add_pipeline(PIPELINE)
        experiment_id = fake.add_experiment(EXPERIMENT)
        done = submit(fake, tmp_path, "--version-name", "v-integration-2")
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
        assert not fake.unexpected, fake.unexpected
        [run_id] = fake.runs
        assert fake.calls() == [
            "GET healthz", "GET pipelines", "POST pipelines/upload_version", "GET experiments", "POST runs",
            f"GET runs/{run_id}", f"GET runs/{run_id}",
        ]
        [version] = fake.uploads
        assert (version.pipeline_id, version.name) == (pipeline_id, "v-integration-2")
        assert fake.runs[run_id].body["experiment_id"] == experiment_id and len(fake.experiments) == 1
        assert fake.runs[run_id].body["display_name"].startswith("tiny-cpu-")  # the default run name
        # neither --service-account nor $REFINE_KFP_SERVICE_ACCOUNT: none sent, the cluster's default account
        assert "service_account" not in fake.runs[run_id].body and fake.runs[run_id].service_account is None
        assert_no_credentials_reached_the_api(fake)
    assert f"run {run_id} finished: FAILED" in done.stdout


def test_the_service_account_defaults_to_the_environment(tmp_path: Path) -> None:
    """Without --service-account, $REFINE_KFP_SERVICE_ACCOUNT names the run's account."""
    with FakeKfp() as fake:
        done = submit(fake, tmp_path, "--version-name", "v-integration-env", wait=False,
                      env_extra={SERVICE_ACCOUNT_ENV: "refine-launcher"})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert not fake.unexpected, fake.unexpected
        [run] = fake.runs.values()
        assert run.service_account == "refine-launcher" and run.body["service_account"] == "refine-launcher"
        assert fake.calls()[-1] == "POST runs"  # no --wait: no polling
        assert_no_credentials_reached_the_api(fake)
    assert f"submitted run {run.run_id}" in done.stdout


# kfp 2.17.3's Client.wait_for_run_completion does not treat CANCELED as final (kubeflow/pipelines#14473);
# `refine pipeline submit --wait` polls get_run itself and stops on any final state.
def test_a_canceled_run_is_reported_promptly(tmp_path: Path) -> None:
    with FakeKfp(run_states=["RUNNING", "CANCELED"]) as fake:
        # --timeout 6: the second poll (5 s later) sees CANCELED, well before the timeout.
        done = submit(fake, tmp_path, "--version-name", "v-integration-3", "--timeout", "6")
        assert not fake.unexpected, fake.unexpected
    assert done.returncode == 1
    assert "finished: CANCELED" in done.stdout, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
