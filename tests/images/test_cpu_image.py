"""Build images/cpu for real and run the project's prepare-data component in it with kfp.local.DockerRunner.

Needs a Docker engine (``.ci/run`` starts one with ``.ci/docker-engine.sh``; elsewhere the test skips and says
why). No registry is reachable here, so the base is a local stand-in for ``python:3.11-slim-bookworm`` made by
``images/local-base.sh`` (debootstrap, cached by tag); set ``REFINE_TEST_BASE_IMAGE`` to build on another base
that the engine already has. The build reads PyPI (``--network host``) and takes torch from the machine's CPU
wheel; the component's container has no network at all.

Measured on 2 cores: the base image 112 s (once per engine), the first build 213 s, a rebuild after a code change
5-6 s, the component run 2-4 s; the module 5.6 min from an empty engine, 16 s with its cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_DIR = Path(os.environ.get("REFINE_DOCKER_DIR", "/tmp/refine-docker"))
LOCAL_BASE = "refine-local/debian-python:3.11-bookworm-1"
UID = 1000  # the image's user (images/cpu/Dockerfile)

pytestmark = pytest.mark.slow

CONFIG_YAML = """\
name: image-test
seed: 0
model:
  arch: delta_net
  tokenizer: byte
data:
  sources:
    - path: synthetic
      synthetic_docs: 24
      synthetic_words: 120
  min_tokens: 200
  max_tokens: 512
  eval_docs: 4
  shard_docs: 8
tracking:
  backend: none
"""


def _docker_env() -> tuple[dict[str, str] | None, str]:
    """The environment that reaches a Docker engine, or None and why not."""
    if shutil.which("docker") is None:
        return None, "no docker client on PATH"
    env = dict(os.environ)
    if "DOCKER_HOST" not in env:
        env_file = ENGINE_DIR / "docker.env"  # written by .ci/docker-engine.sh start
        if env_file.is_file():
            key, _, value = env_file.read_text().strip().partition("=")
            if key == "DOCKER_HOST" and value:
                env["DOCKER_HOST"] = value
    where = env.get("DOCKER_HOST", "the default socket")
    try:
        out = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=env, capture_output=True,
                             text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None, f"the Docker engine at {where} did not answer within 20 s"
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no answer"])[-1]
        return None, f"no Docker engine answers at {where} ({reason}); start one with .ci/docker-engine.sh start"
    return env, out.stdout.strip()


def _run(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; fail with the log's tail. Returns the wall time in seconds."""
    start = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode} after {elapsed:.0f} s:\n{tail}")
    return elapsed


def _ca_bundle() -> str | None:
    """The host's CA bundle, for pip inside the build (it may sit behind a TLS-intercepting proxy)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def docker_env() -> dict[str, str]:
    pytest.importorskip("docker", reason="the docker Python package (kfp.local.DockerRunner) is not installed")
    env, detail = _docker_env()
    if env is None:
        pytest.skip(detail)
    return env


@pytest.fixture(scope="module")
def cpu_image(docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build images/cpu under the tag the prepare-data component names; returns that tag."""
    from components.prepare_data import prepare_data

    logs = tmp_path_factory.mktemp("image-logs")
    base = os.environ.get("REFINE_TEST_BASE_IMAGE")
    if not base:
        base = LOCAL_BASE
        have = subprocess.run(["docker", "image", "inspect", base], env=docker_env, capture_output=True)
        if have.returncode != 0:
            if os.geteuid() != 0 or shutil.which("debootstrap") is None:
                pytest.skip(f"no base image {base}, and making it needs root and debootstrap (apt-get install "
                            "debootstrap), or set REFINE_TEST_BASE_IMAGE to a python:3.11 Debian image")
            took = _run(["bash", "images/local-base.sh", base], docker_env, 900, logs / "base.log")
            print(f"local base image {base}: {took:.0f} s")
    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl"))
    tag = prepare_data.component_spec.implementation.container.image
    cmd = ["bash", "images/build.sh", "cpu", "--tag", tag, "--base", base]
    if wheels:
        cmd += ["--torch-wheel", str(wheels[-1])]
    if ca := _ca_bundle():
        cmd += ["--ca-bundle", ca]
    took = _run([*cmd, "--", "--network", "host"], docker_env, 1500, logs / "build.log")
    print(f"images/cpu build: {took:.0f} s")
    return tag


def _inspect(image: str, env: dict[str, str]) -> dict:
    out = subprocess.run(["docker", "image", "inspect", image], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def test_image_config_and_contents(cpu_image: str, docker_env: dict[str, str]) -> None:
    config = _inspect(cpu_image, docker_env)["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Cmd"] == ["python"] and not config["Entrypoint"]
    assert not config.get("Healthcheck")
    probe = (
        "import os, torch, kfp, mlflow, boto3, refine_core, components.prepare_data;"
        "from importlib import metadata as m;"
        "print(os.getuid(), torch.__version__, torch.cuda.is_available(), kfp.__version__, m.version('refine-core'),"
        " os.path.exists('/tmp/local'), refine_core.__file__)"
    )
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", cpu_image, "python", "-c", probe],
                         env=docker_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    uid, torch_version, cuda, kfp_version, version, build_inputs, where = out.stdout.split()
    assert uid == str(UID) and torch_version == "2.13.0+cpu" and cuda == "False" and kfp_version == "2.17.3"
    assert build_inputs == "False", "the torch wheel / CA bundle must not reach the final image"
    assert where.startswith("/opt/venv/lib/python3.11/site-packages/refine_core/"), "installed as a package"
    assert version == _pyproject_version()


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_prepare_data_component_in_docker_runner(cpu_image: str, docker_env: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import local
    from kfp.local import config as local_config

    from components.prepare_data import prepare_data
    from refine_core.data.shards import load_manifest
    from refine_core.kfp_support import prepared_data_fingerprint

    for key in ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
        if key in docker_env:
            monkeypatch.setenv(key, docker_env[key])
    root = tmp_path / "pipeline_root"
    workspace = tmp_path / "workspace"
    for d in (root, workspace):
        d.mkdir()
        os.chmod(d, 0o777)  # the container writes as uid 1000
    previous = local_config.LocalExecutionConfig.instance
    start = time.monotonic()
    try:
        local.init(runner=local.DockerRunner(network_mode="none"), pipeline_root=str(root),
                   workspace_root=str(workspace))
        task = prepare_data(config_yaml=CONFIG_YAML)
    finally:
        local_config.LocalExecutionConfig.instance = previous
    print(f"prepare-data in {cpu_image}: {time.monotonic() - start:.1f} s")

    dataset = task.outputs["dataset"]
    prepared = Path(dataset.path)
    manifest = load_manifest(prepared)
    assert manifest["counts"]["docs_read"] == manifest["counts"]["docs_kept"] == 24
    assert manifest["splits"]["train"]["num_docs"] == 20 and manifest["splits"]["eval"]["num_docs"] == 4
    assert manifest["tokenizer"]["name"] == "byte"
    assert dataset.metadata["data_fingerprint"] == prepared_data_fingerprint(prepared)
    assert (prepared / "tokenizer").is_dir()
    assert prepared.stat().st_uid == UID, "the component ran as the image's non-root user"
    assert Path(task.outputs["report"].path).read_text().strip()
    assert task.outputs["metrics"].metadata
