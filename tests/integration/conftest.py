"""Fixtures of the integration tests: the real servers (:mod:`tests.integration.servers`) and one run of the tiny
full pipeline against them, package-scoped so that every test here shares them (the browser test reuses the run)
and they are stopped as soon as the package's last test is done."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.components.conftest import SMALLER, TINY_CONFIG
from tests.integration.servers import (
    MOTO_MIN_PART_BYTES,
    MlflowServer,
    S3Server,
    client_env,
    run_bounded,
    start_mlflow,
    start_moto,
    venv_bin,
)

EXPERIMENT = "refine-integration"
RUN_NAME = "integ"  # cfg.name: the parent run is "integ-pipeline", stage runs "integ-<stage>"
MODEL_NAME = "refine-integration-model"
PIPELINE_TIMEOUT_S = 420
# configs/tiny-cpu.yaml made smaller (as in tests/components), plus a generated NIAH task so that the evaluation
# draws its depth x length heatmap (a PNG a person looks at in the MLflow UI).
OVERRIDES = [
    *SMALLER,
    "eval.niah_tasks=[niah_single_1]",
    "eval.niah_lengths=[512, 640]",
    "eval.niah_depths=[0.0, 1.0]",
    "eval.max_seq_tokens=768",
    f"tracking.experiment={EXPERIMENT}",
    f"name={RUN_NAME}",
]


# As in production (manifests/base/config/refine-configmap.yaml): large artifacts go through MLflow's multipart
# proxy, the client PUTting parts to S3 with presigned URLs. Scaled down so that the tiny model's weights (~185 kB)
# take that path in several parts; smaller files go through the plain proxy.
MULTIPART_MIN_BYTES = 100_000
MULTIPART_CHUNK_BYTES = MOTO_MIN_PART_BYTES
MULTIPART_ENV = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
    "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(MULTIPART_MIN_BYTES),
    "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(MULTIPART_CHUNK_BYTES),
}


@dataclass(frozen=True)
class PipelineRun:
    """What one ``refine pipeline run`` subprocess against the servers left behind."""

    server: MlflowServer
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    pipeline_root: Path
    env: dict[str, str]
    wall_s: float

    def output(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-6000:]}"


def refine_command() -> list[str]:
    """The ``refine`` console script of this interpreter's environment (or the same entry through ``-c``)."""
    script = venv_bin("refine")
    if Path(script).is_file():
        return [script]
    return [sys.executable, "-c", "import sys; from refine_core.cli import main; sys.exit(main())"]


@pytest.fixture(scope="package")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for this package's tests (stopped after the last one)."""
    with start_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[MlflowServer]:
    """An MLflow tracking server with artifacts proxied to ``s3_server`` (stopped after the last test)."""
    with start_mlflow(tmp_path_factory.mktemp("mlflow-server"), s3_server) as server:
        yield server


@pytest.fixture(scope="package")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> PipelineRun:
    """``refine pipeline run --config configs/tiny-cpu.yaml`` (smaller, see :data:`OVERRIDES`) in a subprocess whose
    environment points MLflow at the server, enables proxied multipart uploads and holds no S3 endpoint or
    credentials; run once for the package."""
    cwd = tmp_path_factory.mktemp("pipeline")
    home = cwd / "home"
    home.mkdir()
    root = cwd / "kfp"
    env = client_env({"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", **MULTIPART_ENV}, home=home)
    cmd = [*refine_command(), "pipeline", "run", "--config", str(TINY_CONFIG), "--pipeline-root", str(root),
           "--param", f"model_name={MODEL_NAME}", *OVERRIDES]
    done = run_bounded(cmd, env, cwd, PIPELINE_TIMEOUT_S)
    (cwd / "pipeline.stdout").write_text(done.stdout)  # kept in pytest's basetemp for a look after a failure
    (cwd / "pipeline.stderr").write_text(done.stderr)
    if done.timed_out:
        pytest.fail(f"refine pipeline run did not finish in {PIPELINE_TIMEOUT_S} s; it was killed. stdout tail:\n"
                    f"{done.stdout[-3000:]}\nstderr tail:\n{done.stderr[-3000:]}")
    return PipelineRun(server=mlflow_server, returncode=done.returncode, stdout=done.stdout, stderr=done.stderr,
                       cwd=cwd, pipeline_root=root, env=env, wall_s=done.wall_s)


@pytest.fixture(scope="package")
def tracking_client(mlflow_server: MlflowServer):
    """An ``MlflowClient`` of the server, for reading back."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url)
