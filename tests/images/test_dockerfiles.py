"""Static checks of images/: both Dockerfiles parsed and linted, the lock files against pyproject.toml, the scripts.

The GPU image cannot be built on these machines (no registry for its CUDA base, no GPU), so this is where its
correctness is held: the base and every pin, the non-root user, the Triton cache, and that the locked
requirements still satisfy what pyproject.toml asks for. Needs no Docker engine.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
TORCH = "2.13.0"


@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    args: str
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        cmd, _, args = text.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        out.append(Instruction(cmd, " ".join(args.split()), stage))
    assert not pending, f"{path}: a continuation line runs off the end"
    return out


def _final(instrs: list[Instruction], cmd: str) -> list[Instruction]:
    last = max(i.stage for i in instrs)
    return [i for i in instrs if i.stage == last and i.cmd == cmd]


def _locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{name: (version, [sha256, ...])}`` of a ``name==version --hash=...`` requirements file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *opts = line.split()
        name, sep, version = spec.partition("==")
        assert sep, f"{path.name}: {spec!r} is not pinned with =="
        hashes = [o.removeprefix("--hash=sha256:") for o in opts if o.startswith("--hash=sha256:")]
        assert hashes and len(hashes) == len(opts), f"{path.name}: {spec} needs sha256 hashes and nothing else"
        pins[canonicalize_name(name)] = (version, hashes)
    return pins


def _project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "refine-core"]


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line, split at ``&&``, ``||``, ``;`` and ``|`` outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "(", ")"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


@pytest.fixture(params=["cpu", "gpu"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_base_image_is_a_pinned_build_arg(kind: str) -> None:
    instrs = parse_dockerfile(IMAGES / kind / "Dockerfile")
    first = instrs[0]
    assert first.cmd == "ARG" and first.args.startswith("BASE_IMAGE="), "the file must open with ARG BASE_IMAGE=..."
    base = first.args.removeprefix("BASE_IMAGE=")
    repo, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"base {base!r} is not pinned to a version"
    if kind == "cpu":
        assert repo == "python" and tag.startswith("3.11.") and "slim" in tag  # the torch wheel is cp311
    else:
        assert repo == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-(base|runtime)-ubuntu24\.04", tag)
    froms = [i for i in instrs if i.cmd == "FROM"]
    assert froms[0].args == "${BASE_IMAGE} AS base", "every stage starts from ${BASE_IMAGE}"
    assert froms[-1].args == "base AS runtime", "the shipped stage is built on the base stage alone"


def test_runs_as_non_root_with_python_and_no_entrypoint(kind: str) -> None:
    instrs = parse_dockerfile(IMAGES / kind / "Dockerfile")
    users = _final(instrs, "USER")
    assert users and users[-1].args == "1000:1000", "numeric non-root USER, so runAsNonRoot can check it"
    assert instrs[-1].cmd == "CMD" and json.loads(instrs[-1].args) == ["python"]
    # kfp.local.DockerRunner passes the component's command as CMD: an ENTRYPOINT would prefix it.
    assert not [i for i in instrs if i.cmd in ("ENTRYPOINT", "HEALTHCHECK", "ADD", "EXPOSE")]
    env = " ".join(i.args for i in _final(instrs, "ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env and "HOME=/home/refine" in env
    if kind == "gpu":
        assert re.search(r"TRITON_CACHE_DIR=/var/cache/refine/triton\b", env)
        # the cache folder is made writable for uid 1000 (and group 0) in the base stage
        assert any("install -d -o 1000 -g 0 -m 2775 /var/cache/refine" in i.args for i in instrs if i.stage == 0)


def test_no_secrets_and_only_locked_installs(kind: str) -> None:
    instrs = parse_dockerfile(IMAGES / kind / "Dockerfile")
    for i in instrs:
        if i.cmd in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", i.args) or [i.args.split()[0]]
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|API_KEY", name, re.I), name
        if i.cmd != "RUN":
            continue
        assert "curl " not in i.args and "wget " not in i.args, "no downloads outside pip's hash checks"
        for words in _commands(i.args):
            if "pip" not in words or "install" not in words:
                continue
            cmd = " ".join(words)
            if "-r" in words:
                assert {"--require-hashes", "--no-deps"} <= set(words), f"unchecked install: {cmd}"
            else:  # the project's own wheel, from the wheel stage only
                assert {"--no-index", "--no-deps"} <= set(words) and "/tmp/dist/*.whl" in words, cmd


def test_copy_sources_exist_and_layers_are_ordered(kind: str) -> None:
    instrs = parse_dockerfile(IMAGES / kind / "Dockerfile")
    copies = [i for i in instrs if i.cmd == "COPY" and not i.args.startswith("--from=")]
    for c in copies:
        for src in c.args.split()[:-1]:
            if src.rstrip("/") in ("components", "pipelines"):
                continue  # images/build.sh creates them in the context while they are empty
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    order = [c.args.split()[0] for c in copies]
    # the heavy, rarely changing installs come before the project's code (cache)
    assert order.index(f"images/{kind}/requirements-torch.txt") < order.index(f"images/{kind}/requirements.txt")
    assert order.index(f"images/{kind}/requirements.txt") < order.index("refine_core/")
    runtime = _final(instrs, "COPY")
    assert [c.args for c in runtime] == ["--from=deps /opt/venv /opt/venv", "--from=wheel /dist/ /tmp/dist/"], (
        "the shipped stage takes the venv and the project's wheel only (no build inputs, no CA bundle)"
    )


def _lock_extras(kind: str) -> tuple[str, ...]:
    """The project extras images/lock.py resolves for ``kind``."""
    import runpy

    return runpy.run_path(str(IMAGES / "lock.py"))["TARGETS"][kind].extras


def test_locks_satisfy_pyproject(kind: str) -> None:
    pins = _locked(IMAGES / kind / "requirements-torch.txt") | _locked(IMAGES / kind / "requirements.txt")
    extras = _lock_extras(kind)
    assert {"kfp", "datasets"} <= set(extras) and ("gpu" in extras) == (kind == "gpu")
    stale = []
    for req in _project_requirements(*extras):
        name = canonicalize_name(req.name)
        if name not in pins or not req.specifier.contains(Version(pins[name][0]), prereleases=True):
            stale.append(f"{req} (locked: {pins.get(name, ('nothing',))[0]})")
    assert not stale, f"images/{kind} locks are stale, run `python images/lock.py --target {kind}`: {stale}"


def test_images_carry_the_mlflow_client_only(kind: str) -> None:
    """Pods only talk to the MLflow server: mlflow-skinny, none of the server's stack; no Kubeflow SDK either."""
    pins = _locked(IMAGES / kind / "requirements-torch.txt") | _locked(IMAGES / kind / "requirements.txt")
    assert pins["mlflow-skinny"][0] == "3.17.2"
    server = {"mlflow", "sqlalchemy", "alembic", "flask", "gunicorn", "graphene", "huey", "scikit-learn", "kubeflow"}
    assert not server & pins.keys(), f"images/{kind} locks {sorted(server & pins.keys())}"
    assert "pandas" in pins and "kubeflow-trainer-api" in pins  # mlflow.pyfunc's pandas; the TrainJob models


def test_torch_pins() -> None:
    cpu = _locked(IMAGES / "cpu" / "requirements-torch.txt") | _locked(IMAGES / "cpu" / "requirements.txt")
    gpu = _locked(IMAGES / "gpu" / "requirements-torch.txt") | _locked(IMAGES / "gpu" / "requirements.txt")
    assert cpu["torch"][0] == f"{TORCH}+cpu" and len(cpu["torch"][1]) == 1
    assert not [n for n in cpu if n.startswith(("nvidia-", "triton", "cuda-"))], "a CUDA package in the CPU image"
    wheels = sorted(Path("/opt/wheels").glob(f"torch-{TORCH}+cpu-cp311-*.whl"))
    if wheels:  # the machines' local wheel is the file the CPU image pins
        import hashlib

        assert hashlib.sha256(wheels[-1].read_bytes()).hexdigest() == cpu["torch"][1][0]
    assert gpu["torch"][0] == TORCH
    assert gpu["triton"][0] == "3.7.1", "torch 2.13.0's CUDA wheel pins triton 3.7.1 (GatedDeltaNet backward)"
    assert gpu["flash-linear-attention"][0] == gpu["fla-core"][0] == "0.6.0"
    assert gpu["transformers"][0] == "5.23.0", "fla 0.6.0's generate breaks on 5.24 (the gpu extra's pin)"
    cuda_major = gpu["nvidia-cuda-runtime"][0].split(".")[0]
    base = parse_dockerfile(IMAGES / "gpu" / "Dockerfile")[0].args
    assert base.startswith(f"BASE_IMAGE=nvidia/cuda:{cuda_major}."), "the base's CUDA must match torch's wheels"
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={TORCH}" in makefile, "the images and `make setup` install the same torch"


def test_scripts_are_strict_bash() -> None:
    scripts = [IMAGES / "build.sh", IMAGES / "local-base.sh", ROOT / ".ci" / "docker-engine.sh"]
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text, script
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", *map(str, scripts)], check=True)


def test_build_script_default_tag_matches_components() -> None:
    """images/build.sh tags what components/_image.py names by default, and honours the same variables."""
    import runpy

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = runpy.run_path(str(ROOT / "components" / "_image.py"))
    for kind, env in [("cpu", {}), ("gpu", {}), ("cpu", {"REFINE_IMAGE_REGISTRY": "registry.example.com/ml/"}),
                      ("gpu", {"REFINE_IMAGE_TAG": "0.2.0"})]:
        out = subprocess.run(["bash", str(IMAGES / "build.sh"), kind, "--print-tag"], capture_output=True,
                             text=True, check=True, env={"PATH": "/usr/bin:/bin", **env})
        registry = env.get("REFINE_IMAGE_REGISTRY", image["DEFAULT_REGISTRY"]).rstrip("/")
        assert out.stdout.strip() == f"{registry}/refine-{kind}:{env.get('REFINE_IMAGE_TAG', version)}"


def test_engine_script_without_engine(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "REFINE_DOCKER_DIR": str(tmp_path / "engine")}
    script = str(ROOT / ".ci" / "docker-engine.sh")
    host = subprocess.run(["bash", script, "host"], capture_output=True, text=True, env=env, check=True)
    assert host.stdout.strip() == f"unix://{tmp_path}/engine/docker.sock"
    status = subprocess.run(["bash", script, "status"], capture_output=True, text=True, env=env)
    assert status.returncode == 1 and "not running" in status.stderr
    stop = subprocess.run(["bash", script, "stop"], capture_output=True, text=True, env=env)
    assert stop.returncode == 0 and "not running" in stop.stderr
    bad = subprocess.run(["bash", script, "restart"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "usage" in bad.stderr
