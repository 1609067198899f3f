"""Real servers on loopback for the integration tests: moto's S3 server and an MLflow tracking server (sqlite
backend, artifacts proxied to that S3), each a subprocess on 127.0.0.1 with an ephemeral port.

Only the servers' environment holds S3 credentials (fake ones, :data:`SERVER_AWS_SECRET`); clients talk to MLflow
over HTTP and its ``mlflow-artifacts:`` proxy, so they need none (mlops-notes §5.3). :func:`client_env` builds such
an environment for a client subprocess.

Every server is started in its own session (process group) and stopped by its PID at teardown, also when the test
fails: SIGTERM, a bounded wait, then SIGKILL of the group it leads (``mlflow server`` runs uvicorn as a child).
Start-up waits are bounded and fail with the tail of the server's log.

This package's ``conftest.py`` wraps :func:`start_moto` and :func:`start_mlflow` in package-scoped fixtures; the
helpers need no pytest.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
BUCKET = "refine-mlflow"
ARTIFACTS_PREFIX = "mlartifacts"
REGION = "us-east-1"
# Fake credentials, given to the servers only. Distinctive, so a test can grep for them in what clients sent or wrote.
SERVER_AWS_KEY_ID = "AKIAINTEGRATIONSERVER"
SERVER_AWS_SECRET = "integration-server-secret-3f9b2c"
# moto enforces S3's 5 MiB minimum for every part but the last; lowered so that a test can send a ~200 kB model in
# several parts (real S3 keeps 5 MiB, and so does MLflow's default chunk size of 10 MiB).
MOTO_MIN_PART_BYTES = 65_536
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
# Environment variables a client must not inherit: credentials, endpoints and MLflow run state of the outer shell.
_CLIENT_ENV_DROP = re.compile(r"^(AWS_|MLFLOW_|BOTO_|KFP_|KF_PIPELINES_)")


def venv_bin(name: str) -> str:
    """A console script next to this interpreter (``.venv/bin/mlflow``), else the bare name for ``$PATH``."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _no_proxy(env: dict[str, str]) -> dict[str, str]:
    """Keep loopback traffic off any HTTP proxy the CI box may define."""
    env["NO_PROXY"] = env["no_proxy"] = f"{LOOPBACK},localhost"
    return env


def client_env(extra: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """The environment of a client subprocess: this one without AWS, boto, MLflow or KFP settings, with no
    credentials file or instance metadata to fall back on, plus ``extra``.

    Args:
        extra: variables to set (e.g. ``MLFLOW_TRACKING_URI``).
        home: ``$HOME`` for the client (a temp dir: no ``~/.aws``, ``~/.config/kfp`` of the machine).
    """
    env = {k: v for k, v in os.environ.items() if not _CLIENT_ENV_DROP.match(k)}
    missing = str((home or Path("/nonexistent")) / "no-aws-config")
    env.update({"AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing,
                "AWS_EC2_METADATA_DISABLED": "true"})
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra or {})
    return _no_proxy(env)


def _server_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _CLIENT_ENV_DROP.match(k)}
    env.update({"AWS_ACCESS_KEY_ID": SERVER_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SERVER_AWS_SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return _no_proxy(env)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies, so that a killed pytest (CI
    timeout, SIGKILL) does not leave servers behind. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def stop_process(proc: subprocess.Popen[Any], grace_s: float = STOP_GRACE_S) -> None:
    """Stop a server started by :func:`start_server` by its PID: SIGTERM, wait ``grace_s``, SIGKILL; then SIGKILL
    whatever is left of the process group it leads (children such as uvicorn workers). Never raises."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace_s)
    finally:
        # The group is ours: start_new_session made the server its leader (pgid == pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Completed:
    """A finished client subprocess (see :func:`run_bounded`)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool


def run_bounded(cmd: list[str], env: Mapping[str, str], cwd: Path, timeout_s: float) -> Completed:
    """Run a client command in its own session with a time limit. On timeout, and in any case once it has ended,
    whatever is left of its process group (e.g. kfp.local task subprocesses) is killed by the group's id."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_die_with_parent)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=STOP_GRACE_S)
    finally:
        stop_process(proc, grace_s=STOP_GRACE_S)
    return Completed(proc.returncode, out or "", err or "", time.monotonic() - start, timed_out)


def start_server(cmd: list[str], env: Mapping[str, str], log_path: Path, ready: re.Pattern[str],
                 timeout_s: float = START_TIMEOUT_S, cwd: Path | None = None) -> tuple[subprocess.Popen[Any], int]:
    """Start ``cmd`` in a new session with its output in ``log_path``; wait until the log matches ``ready``, whose
    first group is the port the server bound (we pass port 0, so it is ephemeral and race-free).

    Returns:
        The process and its port. On exit, a missing ready line or the timeout, the process is stopped and
        ``RuntimeError`` carries the log's tail.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env),
                                cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            match = ready.search(log_tail(log_path, 1_000_000))
            if match:
                return proc, int(match.group(1))
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready:\n"
                                   f"{log_tail(log_path)}")
            time.sleep(0.1)
        raise RuntimeError(f"{cmd[0]} not ready after {timeout_s:.0f} s:\n{log_tail(log_path)}")
    except BaseException:
        stop_process(proc)
        raise


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """``GET url`` (loopback only); returns (status, body), HTTP errors included."""
    assert url.startswith(f"http://{LOOPBACK}:"), url
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_ok(url: str, proc: subprocess.Popen[Any], log_path: Path, timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll ``url`` until it answers 200 (bounded); returns the seconds waited."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while waiting for {url}:\n{log_tail(log_path)}")
        try:
            status, body = http_get(url, timeout_s=2.0)
            if status == 200:
                return time.monotonic() - start
            last = (status, body[:200])
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} not OK after {timeout_s:.0f} s (last: {last!r}):\n{log_tail(log_path)}")


@dataclass(frozen=True)
class S3Server:
    """moto's S3 on loopback, with one bucket."""

    url: str
    bucket: str
    pid: int
    log: Path

    def client(self) -> Any:
        """A boto3 S3 client for the test itself (explicit fake credentials: nothing read from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=SERVER_AWS_KEY_ID,
                            aws_secret_access_key=SERVER_AWS_SECRET)

    def object_keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (paginated, bounded to 100 pages)."""
        s3, keys, token = self.client(), [], None
        for _ in range(100):
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kwargs)
            keys += [obj["Key"] for obj in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                break
        return keys


@dataclass(frozen=True)
class MlflowServer:
    """An MLflow tracking server on loopback: sqlite backend, artifacts proxied to ``s3://bucket/prefix``."""

    url: str
    s3: S3Server
    artifacts_prefix: str
    pid: int
    log: Path
    seconds_to_healthy: float


@contextmanager
def start_moto(workdir: Path, bucket: str = BUCKET) -> Iterator[S3Server]:
    """``moto_server`` on 127.0.0.1:<ephemeral> with ``bucket`` created (parts of multipart uploads may be as small
    as :data:`MOTO_MIN_PART_BYTES`); stopped on exit."""
    log = workdir / "moto.log"
    env = _server_env({"S3_UPLOAD_PART_MIN_SIZE": str(MOTO_MIN_PART_BYTES)})
    proc, port = start_server([venv_bin("moto_server"), "-H", LOOPBACK, "-p", "0"], env, log,
                              re.compile(rf"Running on http://{re.escape(LOOPBACK)}:(\d+)"), cwd=workdir)
    try:
        server = S3Server(url=f"http://{LOOPBACK}:{port}", bucket=bucket, pid=proc.pid, log=log)
        wait_http_ok(f"{server.url}/moto-api/", proc, log)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        stop_process(proc)


@contextmanager
def start_mlflow(workdir: Path, s3: S3Server, prefix: str = ARTIFACTS_PREFIX) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1:<ephemeral>: sqlite backend in ``workdir``, ``--artifacts-destination
    s3://<bucket>/<prefix>`` served through the proxy, job execution off (2 processes instead of 10); the S3
    endpoint and credentials are in its environment only. Waits for ``/health``; stopped on exit."""
    log = workdir / "mlflow-server.log"
    cmd = [venv_bin("mlflow"), "server", "--host", LOOPBACK, "--port", "0", "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3.bucket}/{prefix}", "--serve-artifacts"]
    env = _server_env({"MLFLOW_S3_ENDPOINT_URL": s3.url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    start = time.monotonic()
    proc, port = start_server(cmd, env, log, re.compile(rf"Uvicorn running on http://{re.escape(LOOPBACK)}:(\d+)"),
                              cwd=workdir)
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_http_ok(f"{url}/health", proc, log)
        yield MlflowServer(url=url, s3=s3, artifacts_prefix=prefix, pid=proc.pid, log=log,
                           seconds_to_healthy=time.monotonic() - start)
    finally:
        stop_process(proc)
