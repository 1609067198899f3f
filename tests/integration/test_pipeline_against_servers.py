"""The tiny full pipeline (``refine pipeline run``) against a real MLflow tracking server whose artifacts are proxied
to a real S3-compatible server (moto), all on loopback; then everything is read back: the parent run, one nested
run per stage with its metrics, the reports and the NIAH heatmap through the MLflow API, and the same objects
straight from the S3 bucket with boto3. The pipeline's process had no S3 endpoint and no credentials; the model
weights went up through MLflow's multipart proxy (presigned part URLs), as the production ConfigMap sets it.

Marked ``slow``: the pipeline run is about a minute on 2 cores (shared with ``test_mlflow_ui_browser.py``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.components.test_local_pipeline import STAGE_RUNS
from tests.integration.conftest import (
    EXPERIMENT,
    MODEL_NAME,
    MULTIPART_CHUNK_BYTES,
    MULTIPART_MIN_BYTES,
    RUN_NAME,
    PipelineRun,
)
from tests.integration.servers import SERVER_AWS_KEY_ID, SERVER_AWS_SECRET, S3Server

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINING_STAGES = ("train-refine", "train-refine-baseline", "post-train-refine", "post-train-ntp-baseline")
EVAL_STAGES = ("ttt-refine", "ttt-ntp-baseline")


def walk_artifacts(client, run_id: str, path: str | None = None, limit: int = 500) -> list[str]:
    """Every artifact file of a run (breadth-first, at most ``limit`` entries listed)."""
    files, todo, seen = [], [path], 0
    while todo and seen < limit:
        for info in client.list_artifacts(run_id, todo.pop(0)):
            seen += 1
            (todo if info.is_dir else files).append(info.path)
    return sorted(files)


@pytest.fixture(scope="module")
def tracked(pipeline_run: PipelineRun, tracking_client):
    """The parent run and the stage runs by stage name (``integ-train-refine`` -> ``train-refine``)."""
    assert pipeline_run.returncode == 0, pipeline_run.output()
    experiment = tracking_client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, pipeline_run.output()
    [parent] = tracking_client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`refine.role` = 'pipeline' and tags.`refine.run_name` = '{RUN_NAME}'",
    )
    children = tracking_client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return experiment, parent, {run.info.run_name.removeprefix(f"{RUN_NAME}-"): run for run in children}


def test_pipeline_succeeds_and_says_where_to_browse(pipeline_run: PipelineRun, tracked) -> None:
    _, parent, _ = tracked
    out = pipeline_run.stdout
    assert f"MLflow parent run {parent.info.run_id} (FINISHED)" in out, pipeline_run.output()
    assert f"browse: {pipeline_run.server.url}" in out
    assert "comparison report:" in out


def test_parent_and_nested_stage_runs_with_metrics(pipeline_run: PipelineRun, tracked, tracking_client) -> None:
    experiment, parent, by_stage = tracked
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kfp.pipeline"] == "refine-full" and parent.data.tags["kfp.final_state"] == "SUCCEEDED"
    assert parent.data.params["refine.steps"] == "2"  # the resolved config, as params
    assert set(by_stage) == set(STAGE_RUNS), sorted(by_stage)
    for stage, metric in STAGE_RUNS.items():
        run = by_stage[stage]
        assert run.info.status == "FINISHED", stage
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), (stage, run.info.artifact_uri)
        assert run.data.tags["kfp.run_id"] == parent.data.tags["kfp.run_id"], stage
        assert run.data.tags["kfp.task"], stage
        if metric is not None:
            assert metric in run.data.metrics, (stage, sorted(run.data.metrics))
    # a per-step history, not only the last value: refine.steps=2 REFINE steps
    history = tracking_client.get_metric_history(by_stage["train-refine"].info.run_id, "refine/reward_mean")
    assert [m.step for m in history] == [1, 2], history
    assert "refine/reward_mean" not in by_stage["train-refine-baseline"].data.metrics  # the NTP-only arm
    for stage in EVAL_STAGES:
        metrics = by_stage[stage].data.metrics
        assert "eval/niah_single_1" in metrics and 0.0 <= metrics["eval/niah_single_1"] <= 100.0, (stage, metrics)
    [version] = tracking_client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.run_id == by_stage["post-train-refine"].info.run_id
    assert version.tags["kfp.run_id"] == parent.data.tags["kfp.run_id"]


def test_reports_heatmap_and_models_through_the_proxy(pipeline_run: PipelineRun, tracked, tracking_client,
                                                      tmp_path: Path) -> None:
    _, parent, by_stage = tracked
    assert walk_artifacts(tracking_client, parent.info.run_id, "reports") == ["reports/compare.html",
                                                                              "reports/compare.md"]
    report = Path(tracking_client.download_artifacts(parent.info.run_id, "reports/compare.md", str(tmp_path)))
    [local_report] = pipeline_run.pipeline_root.glob("refine-full-*/compare-report/report")
    assert report.read_text() == local_report.read_text()
    assert report.read_text().startswith("# REFINE vs the NTP baseline")
    for stage in EVAL_STAGES:
        files = walk_artifacts(tracking_client, by_stage[stage].info.run_id)
        [heatmap] = [f for f in files if f.endswith("/niah_heatmap.png")]
        assert any(f.endswith("summary.json") for f in files) and any("predictions/" in f for f in files), files
        png = Path(tracking_client.download_artifacts(by_stage[stage].info.run_id, heatmap, str(tmp_path / stage)))
        assert png.read_bytes().startswith(PNG_MAGIC)
    for stage in TRAINING_STAGES:
        files = walk_artifacts(tracking_client, by_stage[stage].info.run_id, "model")
        # an MLflow pyfunc Model with the HF-layout files inside (refine_core.serving)
        assert {"model/MLmodel", "model/artifacts/model/config.json", "model/artifacts/model/model.safetensors"} <= set(
            files
        ), (stage, files)


def test_the_registered_model_loads_with_pyfunc_and_generates_text(pipeline_run: PipelineRun, tracking_client
                                                                    ) -> None:
    """``mlflow.pyfunc.load_model("models:/<name>/<version>").predict(["prompt"])`` returns text, in a client
    process that reaches the artifacts only through the tracking server's proxy."""
    versions = tracking_client.search_model_versions(f"name='{MODEL_NAME}'")
    assert versions, f"no version of {MODEL_NAME} was registered"
    latest = max(versions, key=lambda v: int(v.version))
    code = ("import mlflow, sys; model = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(repr(model.predict(['The lamp is on the'], params={'max_new_tokens': 4})))")
    done = subprocess.run([sys.executable, "-c", code, f"models:/{MODEL_NAME}/{latest.version}"],
                          env=pipeline_run.env, cwd=pipeline_run.cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert isinstance(text, list) and len(text) == 1 and isinstance(text[0], str)


def kfp_output_artifacts(pipeline_root: Path, task_glob: str, output: str) -> list[dict]:
    """The ``output`` artifacts (uri, metadata) of the kfp.local tasks matching ``task_glob``."""
    found = []
    for path in pipeline_root.glob(f"refine-full-*/{task_glob}/executor_output.json"):
        found += json.loads(path.read_text())["artifacts"].get(output, {}).get("artifacts", [])
    return found


def _key(server_prefix: str, run, artifact: str) -> str:
    # mlflow-artifacts:/<experiment id>/<run id>/artifacts -> <prefix>/<experiment id>/<run id>/artifacts/<artifact>
    return f"{server_prefix}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/{artifact}"


def test_artifacts_are_objects_in_the_s3_bucket(pipeline_run: PipelineRun, tracked, tracking_client,
                                                s3_server: S3Server) -> None:
    experiment, parent, by_stage = tracked
    prefix = pipeline_run.server.artifacts_prefix
    keys = set(s3_server.object_keys(f"{prefix}/{experiment.experiment_id}/"))
    assert keys, "nothing under the proxied prefix"
    s3 = s3_server.client()

    report_key = _key(prefix, parent, "reports/compare.md")
    assert report_key in keys, sorted(keys)[:20]
    [local_report] = pipeline_run.pipeline_root.glob("refine-full-*/compare-report/report")
    body = s3.get_object(Bucket=s3_server.bucket, Key=report_key)["Body"].read()
    assert body == local_report.read_bytes()

    # The REFINE arm's mid-trained weights: the S3 object is byte for byte the model KFP passed downstream, found
    # through the MLflow run id that the KFP artifact carries in its metadata.
    refine_run = by_stage["train-refine"].info.run_id
    model_key = _key(prefix, by_stage["train-refine"], "model/artifacts/model/model.safetensors")  # in the MLflow Model
    assert model_key in keys
    [local_model] = [Path(a["uri"]) / "model.safetensors"
                     for a in kfp_output_artifacts(pipeline_run.pipeline_root, "train-refine*", "model")
                     if a["metadata"].get("mlflow_run_id") == refine_run]
    obj = s3.get_object(Bucket=s3_server.bucket, Key=model_key)
    assert hashlib.sha256(obj["Body"].read()).digest() == hashlib.sha256(local_model.read_bytes()).digest()
    # It went up through MLflow's multipart proxy in parts (a multipart ETag ends in -<parts>); a small file did not.
    parts = math.ceil(local_model.stat().st_size / MULTIPART_CHUNK_BYTES)
    assert local_model.stat().st_size >= MULTIPART_MIN_BYTES and parts >= 2
    assert obj["ETag"].strip('"').endswith(f"-{parts}"), obj["ETag"]
    config_etag = s3.head_object(Bucket=s3_server.bucket, Key=_key(prefix, by_stage["train-refine"],
                                                                   "model/artifacts/model/config.json"))["ETag"]
    assert "-" not in config_etag, config_etag

    heatmaps = [k for k in keys if k.endswith("/niah_heatmap.png")]
    assert {k.split("/")[2] for k in heatmaps} == {by_stage[s].info.run_id for s in EVAL_STAGES}, heatmaps
    head = s3.get_object(Bucket=s3_server.bucket, Key=heatmaps[0], Range="bytes=0-7")["Body"].read()
    assert head == PNG_MAGIC
    # Every artifact file MLflow lists for the pipeline's runs is an object under the proxied prefix.
    listed = {_key(prefix, run, f) for run in [parent, *by_stage.values()]
              for f in walk_artifacts(tracking_client, run.info.run_id)}
    assert len(listed) > 20 and listed <= keys, sorted(listed - keys)[:10]
    assert all(k.startswith(f"{prefix}/") for k in s3_server.object_keys())


def test_the_client_side_never_had_s3_credentials(pipeline_run: PipelineRun, tracked, tracking_client) -> None:
    """Artifacts were proxied: the pipeline's processes had no S3 endpoint and no keys, yet the objects exist
    (previous test), and the servers' credentials show up nowhere the client wrote or logged. (The presigned part
    URLs of multipart uploads carry the access key id and a signature, never the secret.)"""
    env = pipeline_run.env
    assert not {k for k in env if k.startswith("AWS_") and k not in (
        "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")}, sorted(env)
    assert "MLFLOW_S3_ENDPOINT_URL" not in env and not Path(env["AWS_SHARED_CREDENTIALS_FILE"]).exists()
    assert SERVER_AWS_SECRET not in env.values() and SERVER_AWS_KEY_ID not in env.values()
    for text in (pipeline_run.stdout, pipeline_run.stderr):
        assert SERVER_AWS_SECRET not in text and SERVER_AWS_KEY_ID not in text
    secret = SERVER_AWS_SECRET.encode()
    scanned = 0
    for path in pipeline_run.cwd.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            scanned += 1
            assert secret not in path.read_bytes(), path
    assert scanned > 10
    _, parent, by_stage = tracked
    for run in [parent, *by_stage.values()]:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(SERVER_AWS_SECRET in v or SERVER_AWS_KEY_ID in v for v in values), run.info.run_name
