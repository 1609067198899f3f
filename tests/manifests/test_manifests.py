"""Offline checks of ``manifests/`` and ``.github/workflows/retrain.yml`` (mlops-notes §3.3).

Each kustomization (base and every overlay) is rendered with ``kubectl kustomize``, which needs no cluster. Core
objects are validated with kubernetes-validate (strict, Kubernetes 1.33); the Trainer v2 objects (the
ClusterTrainingRuntime and the example TrainJob) with the ``kubeflow-trainer-api`` pydantic models, which drop
unknown fields silently, so every such object must also survive ``from_dict(obj).to_dict() == obj``. On top of
schema validity: nothing runs as root, no Secret with a real value is applied, images are pinned, credentials
reach pods only through ``secretKeyRef``, the launcher's RBAC is exactly what it needs, and the names the pieces
use to find each other agree.

    .venv/bin/python -m pytest tests/manifests -q
"""

from __future__ import annotations

import base64
import copy
import functools
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api import models as trainer_models
from pydantic import ValidationError as PydanticValidationError

from refine_core.config import load_config, to_dict
from refine_core.tracking import redact

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
WORKFLOW = REPO / ".github" / "workflows" / "retrain.yml"
TARGETS = ["base", "overlays/dev", "overlays/prod"]
K8S_VERSION = "1.33.0"
PLACEHOLDER = "REPLACE_ME"
TRAINER_GROUP = "trainer.kubeflow.org"
# Kinds kustomize (or the API server) treats as cluster-scoped in these trees.
CLUSTER_SCOPED = {"ClusterTrainingRuntime", "ClusterRole", "ClusterRoleBinding", "Namespace"}
# Environment variables that carry credentials must come from a Secret, never from a literal or a ConfigMap.
CREDENTIAL_ENV = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not on PATH; it renders the kustomizations (`kubectl kustomize` is offline)"
)


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize manifests/<target>`` as a tuple of objects (cached: each tree renders once)."""
    assert KUBECTL is not None
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize manifests/{target} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def objects(target: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in render(target) if obj["kind"] == kind]


def one(target: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects(target, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"manifests/{target}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(obj: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec inside an object, whatever the kind (a dict that has ``containers``), with its path."""
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            yield where, obj
        for key, value in obj.items():
            yield from pod_specs(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from pod_specs(value, f"{where}[{i}]")


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def all_containers(target: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(``Kind/name.path``, pod spec, container) for every container in the rendered tree."""
    for obj in render(target):
        for path, pod in pod_specs(obj):
            for container in containers(pod):
                yield f"{obj['kind']}/{obj['metadata']['name']}{path}:{container['name']}", pod, container


def lost_keys(before: Any, after: Any, path: str = "") -> list[str]:
    """Paths present in ``before`` but missing or changed in ``after``."""
    if isinstance(before, dict):
        if not isinstance(after, dict):
            return [path or "/"]
        out = []
        for key, value in before.items():
            if key not in after:
                out.append(f"{path}/{key}")
            else:
                out.extend(lost_keys(value, after[key], f"{path}/{key}"))
        return out
    if isinstance(before, list):
        if not isinstance(after, list) or len(after) != len(before):
            return [path]
        return [p for i, (b, a) in enumerate(zip(before, after, strict=True)) for p in lost_keys(b, a, f"{path}/{i}")]
    return [] if before == after else [path]


def assert_trainer_model_round_trips(model: type, obj: dict[str, Any]) -> None:
    """Validate with the kubeflow-trainer-api model and require that no field was silently dropped."""
    parsed = model.from_dict(copy.deepcopy(obj))
    dumped = parsed.to_dict()
    lost = lost_keys(obj, dumped)
    assert not lost, f"{obj['kind']} {obj['metadata']['name']}: fields unknown to {model.__name__}: {lost}"
    assert dumped == obj


def load_yaml_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def secret_templates() -> dict[str, dict[str, Any]]:
    return {p.name: load_yaml_file(p) for p in sorted((MANIFESTS / "secret-templates").glob("*.yaml"))}


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_validate_strictly_against_kubernetes_1_33(target: str) -> None:
    errors = []
    for obj in render(target):
        if obj["apiVersion"].startswith(f"{TRAINER_GROUP}/"):
            continue  # no schema in kubernetes-validate; checked with the trainer models below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert not errors, "\n".join(errors)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_renders_every_piece(target: str) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render(target)}
    expected = {
        ("ConfigMap", "refine-config"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "mlflow-postgres"),
        ("Service", "mlflow-postgres"),
        ("PersistentVolumeClaim", "mlflow-postgres"),
        ("NetworkPolicy", "mlflow-postgres"),
        ("ServiceAccount", "refine-launcher"),
        ("Role", "refine-launcher"),
        ("RoleBinding", "refine-launcher"),
        ("ClusterTrainingRuntime", "refine-torch"),
        ("CronJob", "refine-retrain"),
    }
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    generated = [name for kind, name in kinds if kind == "ConfigMap" and name.startswith("refine-retrain-config-")]
    assert len(generated) == 1, "the retrain config ConfigMap (with its content hash suffix) is missing"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_namespaces(target: str) -> None:
    namespace = one(target, "Service", "mlflow")["metadata"]["namespace"]
    for obj in render(target):
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            assert ns is None, f"cluster-scoped {obj['kind']}/{obj['metadata']['name']} got namespace {ns!r}"
        else:
            assert ns == namespace, f"{obj['kind']}/{obj['metadata']['name']} is in {ns!r}, not {namespace!r}"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_cluster_training_runtime_validates_and_round_trips(target: str) -> None:
    runtime = one(target, "ClusterTrainingRuntime", "refine-torch")
    assert runtime["apiVersion"] == f"{TRAINER_GROUP}/v1alpha1"
    assert_trainer_model_round_trips(trainer_models.TrainerV1alpha1ClusterTrainingRuntime, runtime)

    spec = runtime["spec"]
    assert spec["mlPolicy"]["numNodes"] == 1 and "torch" in spec["mlPolicy"]
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    (node,) = spec["template"]["spec"]["replicatedJobs"]
    # The Trainer applies TrainJob.spec.trainer to the replicated job labelled as the trainer step, and injects
    # the PET_* variables into the container named `node`.
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = node["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert container["command"][:1] == ["torchrun"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
    assert shm["emptyDir"]["medium"] == "Memory"
    if target == "overlays/prod":
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_example_trainjob_validates_round_trips_and_names_the_runtime(target: str) -> None:
    trainjob = load_yaml_file(MANIFESTS / "examples" / "refine-trainjob.yaml")
    assert_trainer_model_round_trips(trainer_models.TrainerV1alpha1TrainJob, trainjob)
    runtime = one(target, "ClusterTrainingRuntime")
    ref = trainjob["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("ClusterTrainingRuntime", runtime["metadata"]["name"])
    assert one(target, "ConfigMap", "refine-config")["data"]["REFINE_TRAINING_RUNTIME"] == ref["name"]
    runtime_image = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert trainjob["spec"]["trainer"]["image"] == runtime_image
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] >= 1 and trainer["numProcPerNode"] >= 1


def test_trainer_models_and_round_trip_catch_mistakes() -> None:
    """Negative controls: the checks above would fail on a bad value, a missing field or a stale field."""
    trainjob = load_yaml_file(MANIFESTS / "examples" / "refine-trainjob.yaml")
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(PydanticValidationError):
        trainer_models.TrainerV1alpha1TrainJob.from_dict(bad)
    bad = copy.deepcopy(trainjob)
    del bad["spec"]["runtimeRef"]
    with pytest.raises(PydanticValidationError):
        trainer_models.TrainerV1alpha1TrainJob.from_dict(bad)
    # Removed fields are dropped without an error: podSpecOverrides (now runtimePatches) and the torch policy's
    # numProcPerNode (moved to TrainJob.spec.trainer in Trainer v2.2).
    bad = copy.deepcopy(trainjob)
    bad["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": "node"}]}]
    with pytest.raises(AssertionError, match="podSpecOverrides"):
        assert_trainer_model_round_trips(trainer_models.TrainerV1alpha1TrainJob, bad)
    runtime = load_yaml_file(MANIFESTS / "base" / "trainer" / "refine-torch-clustertrainingruntime.yaml")
    runtime["spec"]["mlPolicy"]["torch"] = {"numProcPerNode": "auto"}
    with pytest.raises(AssertionError, match="numProcPerNode"):
        assert_trainer_model_round_trips(trainer_models.TrainerV1alpha1ClusterTrainingRuntime, runtime)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_no_container_runs_as_root(target: str) -> None:
    seen = 0
    for where, pod, container in all_containers(target):
        seen += 1
        pod_ctx = pod.get("securityContext", {})
        ctx = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot is not true"
        user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        # runAsNonRoot alone fails at start-up for images whose USER is a name; a numeric uid makes it checkable.
        assert isinstance(user, int) and user > 0, f"{where}: runAsUser {user!r} must be a non-zero uid"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: must drop all capabilities"
        assert not ctx.get("privileged", False), f"{where}: privileged"
        assert pod.get("automountServiceAccountToken") is False, f"{where}: mounts an API token it does not need"
    assert seen >= 4


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_apply_trees_hold_no_secrets_and_no_literal_credentials(target: str) -> None:
    # Secrets are created by hand (secret-templates/); an apply of the tree must never overwrite them.
    assert not objects(target, "Secret"), "Secrets belong in manifests/secret-templates/, not the applied tree"
    for where, _, container in all_containers(target):
        for env in container.get("env", []):
            if CREDENTIAL_ENV.search(env["name"]):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} must use secretKeyRef"
        for arg in [*container.get("command", []), *container.get("args", [])]:
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", arg), f"{where}: credentials in a URI: {arg}"
    for cm in objects(target, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not CREDENTIAL_ENV.search(key), f"ConfigMap {cm['metadata']['name']} holds {key}"


def test_secret_templates_hold_only_placeholders() -> None:
    templates = secret_templates()
    assert {t["metadata"]["name"] for t in templates.values()} >= {
        "mlflow-s3-credentials",
        "mlflow-postgres-credentials",
        "refine-kfp-token",
    }
    for filename, secret in templates.items():
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert secret["kind"] == "Secret"
        assert "TEMPLATE" in (MANIFESTS / "secret-templates" / filename).read_text().splitlines()[0]
        values = dict(secret.get("stringData", {}))
        values |= {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        assert values, f"{filename}: no keys"
        for key, value in values.items():
            assert value == PLACEHOLDER, f"{filename}: {key} holds {value!r}, not the placeholder {PLACEHOLDER}"
        # No namespace: the operator creates it in the namespace of the overlay it deploys.
        assert "namespace" not in secret["metadata"]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_secret_reference_has_a_template(target: str) -> None:
    keys = {
        (t["metadata"]["name"], key) for t in secret_templates().values() for key in t.get("stringData", t.get("data"))
    }
    for where, _, container in all_containers(target):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert (ref["name"], ref["key"]) in keys, f"{where}: no template for Secret {ref['name']}/{ref['key']}"
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, f"{where}: envFrom secretRef hides which keys a pod reads"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(target: str) -> None:
    for where, _, container in all_containers(target):
        image = container["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        # Resources name images by short names that base/kustomization.yaml maps to a registry and a tag.
        assert "/" in name, f"{where}: {image!r} was not mapped by an `images:` entry"
        assert tag and tag != "latest" and "/" not in tag, f"{where}: {image!r} is not pinned"
    assert "3.17.2" in one(target, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_refine_images_match_what_the_components_compile_to(target: str) -> None:
    image = pytest.importorskip("components._image", reason="components/_image.py is not importable")
    version = metadata.version("refine-core")
    images = {c["image"] for _, _, c in all_containers(target)}
    assert f"{image.DEFAULT_REGISTRY}/refine-cpu:{version}" in images
    assert f"{image.DEFAULT_REGISTRY}/refine-gpu:{version}" in images


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_server_takes_credentials_only_from_secrets(target: str) -> None:
    pod = one(target, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["mlflow", "server"]
    args = container["args"]

    def arg(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert arg("--backend-store-uri").startswith("postgresql://")
    assert "@" not in arg("--backend-store-uri"), "the backend URI must not carry a user or password"
    assert arg("--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in args and arg("--host") == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGUSER", "PGPASSWORD"):
        assert set(env[name]) == {"name", "valueFrom"} and set(env[name]["valueFrom"]) == {"secretKeyRef"}, name
        assert env[name]["valueFrom"]["secretKeyRef"].get("optional") is not True, f"{name} must not be optional"
    assert "envFrom" not in container
    assert {p["containerPort"] for p in container["ports"]} == {5000}
    assert {"startupProbe", "readinessProbe", "livenessProbe", "resources"} <= set(container)
    assert "limits" in container["resources"] and "requests" in container["resources"]
    # Only the server reads the artifact-store credentials: no other workload in the tree references them.
    for where, _, other in all_containers(target):
        if other is container:
            continue
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in other.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert "mlflow-s3-credentials" not in refs, f"{where} reads the MLflow server's S3 credentials"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_env_references_are_defined(target: str) -> None:
    """``$(VAR)`` that Kubernetes cannot resolve is left in the string verbatim, so check each one."""
    for where, _, container in all_containers(target):
        defined: list[str] = []
        for env in container.get("env", []):
            for ref in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                assert ref in defined, f"{where}: {env['name']} uses $({ref}) before it is defined"
            defined.append(env["name"])
        for item in [*container.get("command", []), *container.get("args", [])]:
            for ref in re.findall(r"\$\((\w+)\)", item):
                assert ref in defined, f"{where}: $({ref}) in command/args is not an env var of the container"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_configmap_points_at_the_rendered_services(target: str) -> None:
    data = one(target, "ConfigMap", "refine-config")["data"]
    svc = one(target, "Service", "mlflow")
    port = svc["spec"]["ports"][0]["port"]
    assert data["MLFLOW_TRACKING_URI"] == f"http://mlflow.{svc['metadata']['namespace']}.svc:{port}"
    assert data["KFP_HOST"].startswith(("http://", "https://"))
    assert data["AWS_ENDPOINT_URL_S3"].startswith(("http://", "https://"))
    assert data["REFINE_S3_BUCKET"] and "/" not in data["REFINE_S3_BUCKET"]
    assert data["REFINE_LAUNCHER_SERVICE_ACCOUNT"] == one(target, "ServiceAccount")["metadata"]["name"]
    assert data["REFINE_TRAINING_RUNTIME"] == one(target, "ClusterTrainingRuntime")["metadata"]["name"]
    # Every configMapKeyRef names a key that exists.
    maps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in objects(target, "ConfigMap")}
    for where, _, container in all_containers(target):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in maps[ref["name"]], f"{where}: ConfigMap {ref['name']} has no key {ref['key']}"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_launcher_rbac_is_least_privilege(target: str) -> None:
    role = one(target, "Role", "refine-launcher")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("trainer.kubeflow.org",), ("trainjobs",)): sorted(["create", "get", "list", "watch", "delete"]),
        (("",), ("pods",)): sorted(["get", "list", "watch"]),
        (("",), ("pods/log",)): ["get"],
    }
    binding = one(target, "RoleBinding", "refine-launcher")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "refine-launcher"}
    sa = one(target, "ServiceAccount", "refine-launcher")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "refine-launcher", "namespace": sa["metadata"]["namespace"]}
    ]
    assert not objects(target, "ClusterRole") and not objects(target, "ClusterRoleBinding")


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_postgres_backend_is_private_and_persistent(target: str) -> None:
    sts = one(target, "StatefulSet", "mlflow-postgres")
    pod = sts["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [one(target, "PersistentVolumeClaim")["metadata"]["name"]]
    assert sts["spec"]["replicas"] == 1
    assert one(target, "Service", "mlflow-postgres")["spec"]["clusterIP"] == "None"
    policy = one(target, "NetworkPolicy", "mlflow-postgres")
    assert policy["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    mlflow_labels = one(target, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    (allowed,) = policy["spec"]["ingress"][0]["from"]
    assert allowed["podSelector"]["matchLabels"].items() <= mlflow_labels.items()


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_cronjob_submits_the_pipeline(target: str) -> None:
    cron = one(target, "CronJob", "refine-retrain")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = [*container["command"], *container["args"]]
    assert argv[:3] == ["refine", "pipeline", "submit"]
    assert argv[argv.index("--host") + 1] == "$(KFP_HOST)"
    assert argv[argv.index("--experiment") + 1] == "retrain"
    assert argv[argv.index("--pipeline") + 1] == "midtrain"
    assert "refine-cpu" in container["image"]
    env = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    assert env["KFP_HOST"]["configMapKeyRef"] == {"name": "refine-config", "key": "KFP_HOST"}
    assert "secretKeyRef" in env["KFP_TOKEN"]
    # --config is a file of the mounted, generated ConfigMap, and that file is a valid refine config.
    config_path = Path(argv[argv.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    generated = one(target, "ConfigMap", volume["configMap"]["name"])
    assert config_path.name in generated["data"]
    assert generated["data"][config_path.name] == (MANIFESTS / "base" / "retrain" / config_path.name).read_text()
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"].get("suspend", False) is (target == "overlays/dev")


def test_retrain_config_is_a_valid_refine_config() -> None:
    cfg = load_config(MANIFESTS / "base" / "retrain" / "retrain.yaml")
    assert cfg.tracking.experiment == "retrain"
    # No URI in the file: pods take MLFLOW_TRACKING_URI from refine-config.
    assert cfg.tracking.tracking_uri is None
    # `refine pipeline submit` refuses a config holding anything that looks like a credential.
    tree = to_dict(cfg)
    assert redact(tree) == tree


def cronjob_process(target: str, config_data: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The CronJob container's argv and environment as the kubelet makes them: env from the rendered refine-config
    (``config_data`` replacing its data), ``$(VAR)`` in args expanded (an unset one stays verbatim, as in Kubernetes);
    secret references left out."""
    container = one(target, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    data = config_data if config_data is not None else one(target, "ConfigMap", "refine-config")["data"]
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("configMapKeyRef")
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif ref is not None and ref["name"] == "refine-config":
            if ref["key"] in data:
                env[entry["name"]] = data[ref["key"]]
            else:
                assert ref.get("optional"), f"{entry['name']}: refine-config has no key {ref['key']}"
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in [*container["command"], *container["args"]]]
    return argv, env


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_cronjob_argv_parses_with_the_submit_command(target: str, monkeypatch) -> None:
    cli = pytest.importorskip("pipelines.cli", reason="pipelines.cli (refine pipeline) is not importable")
    argv, env = cronjob_process(target)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = cli.build_parser().parse_args(argv[2:])
    assert (args.command, args.pipeline, args.experiment, args.wait) == ("submit", "midtrain", "retrain", False)
    assert args.pipeline in cli.PIPELINES
    # Where mid-training runs comes from refine-config: one GPU in the base, and no service account named then.
    assert (args.nodes, args.gpus_per_node) == (1, 1) and args.service_account is None


@needs_kubectl
def test_the_cronjob_submits_a_2x8_gpu_trainjob_build_when_refine_config_says_so(monkeypatch) -> None:
    """End to end from the manifest: refine-config set to 2 nodes x 8 GPUs and the refine-launcher account; the
    CronJob's command line, run through the refine CLI against a recording kfp.Client, uploads the TrainJob build
    and starts the run as refine-launcher."""
    kfp = pytest.importorskip("kfp")
    from refine_core import cli as refine_cli
    from tests.pipelines.test_cli import FakeClient, launcher_tasks

    data = {**one("base", "ConfigMap", "refine-config")["data"], "REFINE_TRAIN_NODES": "2",
            "REFINE_TRAIN_GPUS_PER_NODE": "8", "REFINE_RETRAIN_SERVICE_ACCOUNT": "refine-launcher"}
    argv, env = cronjob_process("base", data)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = argv[argv.index("--config") + 1]
    argv[argv.index("--config") + 1] = str(MANIFESTS / "base" / "retrain" / Path(config).name)  # the mounted file
    clients: list[Any] = []
    monkeypatch.setattr(kfp, "Client", lambda **kw: clients.append(FakeClient(**kw)) or clients[-1])
    assert argv[0] == "refine" and refine_cli.main(argv[1:]) == 0
    [client] = clients
    assert client.kwargs["host"] == data["KFP_HOST"] and client.service_account == "refine-launcher"
    launchers = launcher_tasks(client.package)
    assert len(launchers) == 2  # the REFINE and NTP-baseline arms of the midtrain pipeline
    assert all((p["num_nodes"], p["procs_per_node"], p["resume"]) == (2, 8, True) for p in launchers)
    assert all(p["node_resources"]["limits"]["nvidia.com/gpu"] == "8" for p in launchers)


@needs_kubectl
def test_names_the_pipelines_use_exist() -> None:
    """pipelines/_k8s.py names the ConfigMap, its keys and the Secrets that pipeline pods read."""
    k8s = pytest.importorskip("pipelines._k8s", reason="pipelines._k8s is not importable")
    templates = {t["metadata"]["name"]: t["stringData"] for t in secret_templates().values()}
    assert set(k8s.S3_SECRET_ENV) <= set(templates[k8s.S3_SECRET])
    assert set(k8s.MLFLOW_AUTH_ENV) <= set(templates[k8s.MLFLOW_AUTH_SECRET])
    for target in TARGETS:
        data = one(target, "ConfigMap", k8s.CONFIG_MAP)["data"]
        assert set(k8s.CONFIG_ENV) <= set(data), f"manifests/{target}: {k8s.CONFIG_MAP} lacks a required key"


@needs_kubectl
def test_overlays_differ_where_they_should() -> None:
    def pvc_size(target: str) -> str:
        return one(target, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"]

    assert one("overlays/dev", "Service", "mlflow")["metadata"]["namespace"] == "refine-dev"
    assert pvc_size("overlays/dev") == "1Gi"
    assert "storageClassName" not in one("overlays/dev", "PersistentVolumeClaim")["spec"]
    assert one("overlays/prod", "PersistentVolumeClaim")["spec"]["storageClassName"]
    assert pvc_size("overlays/prod") == "50Gi"
    assert one("overlays/prod", "Deployment", "mlflow")["spec"]["replicas"] == 2
    assert one("overlays/dev", "Deployment", "mlflow")["spec"]["replicas"] == 1
    for target in TARGETS:
        assert one(target, "ConfigMap", "refine-config")["data"]["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"


def workflow() -> dict[Any, Any]:
    return load_yaml_file(WORKFLOW)


def test_workflow_triggers() -> None:
    wf = workflow()
    # YAML 1.1 reads the bare key `on` as the boolean True.
    triggers = wf.get("on", wf.get(True))
    assert set(triggers) == {"push", "workflow_dispatch"}
    assert triggers["push"]["branches"] == ["main"]
    paths = triggers["push"]["paths"]
    assert {"refine_core/**", "components/**", "pipelines/**", "data/manifest*.json"} <= set(paths)
    # The data manifest: the config both retraining triggers submit.
    assert "manifests/base/retrain/retrain.yaml" in paths
    for path in paths:
        if not any(c in path for c in "*?["):
            assert (REPO / path).exists(), f"trigger path {path} does not exist"
    inputs = triggers["workflow_dispatch"]["inputs"]
    assert (REPO / inputs["config"]["default"]).is_file()
    assert inputs["experiment"]["default"] == "retrain"
    assert wf["permissions"] == {"contents": "read"}


def test_workflow_installs_compiles_and_submits_with_ci_secrets() -> None:
    (job,) = workflow()["jobs"].values()
    steps = job["steps"]
    for step in steps:
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), f"unpinned action {step['uses']}"
    runs = [(step.get("run", ""), step.get("env", {})) for step in steps]
    script = "\n".join(run for run, _ in runs)
    assert script.index("torch==2.13.0") < script.index('install -q -e ".[dev]"'), "torch must be installed first"
    assert script.index("refine pipeline compile") < script.index("refine pipeline submit")
    submit = next(line for line in script.splitlines() if "refine pipeline submit" in line)
    for flag in ("--host", "--pipeline", "--config", "--experiment", "--wait"):
        assert flag in submit
    assert job["timeout-minutes"] <= 360
    timeout = int(re.search(r"--timeout (\d+)", submit).group(1))
    assert timeout < job["timeout-minutes"] * 60, "the wait must end before the runner kills the job"
    submit_env = next(env for run, env in runs if "refine pipeline submit" in run)
    assert submit_env["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    # Secrets reach the step through env only: `${{ }}` inside `run:` would be pasted into the script.
    assert "${{" not in script
    text = WORKFLOW.read_text()
    assert set(re.findall(r"secrets\.(\w+)", text)) <= {"KFP_HOST", "KFP_TOKEN"}
    assert not re.search(r"(AKIA[0-9A-Z]{16}|eyJ[\w-]{10,}\.)", text), "a credential-looking literal"
    assert job["env"]["EXPERIMENT"].endswith("|| 'retrain' }}")
    assert (REPO / re.search(r"\|\| '([^']+)'", job["env"]["CONFIG"]).group(1)).is_file()


def test_workflow_commands_parse_with_the_refine_pipeline_cli(monkeypatch) -> None:
    cli = pytest.importorskip("pipelines.cli", reason="pipelines.cli (refine pipeline) is not importable")
    (job,) = workflow()["jobs"].values()
    env = {name: re.search(r"\|\| '([^']*)'", value).group(1) for name, value in job["env"].items()}
    env["KFP_HOST"] = "https://kfp.example.com"
    # Nodes, GPUs per node and the run's account reach `refine pipeline submit` through its environment defaults.
    assert {cli.NODES_ENV, cli.GPUS_PER_NODE_ENV, cli.SERVICE_ACCOUNT_ENV} <= set(job["env"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = cli.build_parser()
    parsed = []
    for step in job["steps"]:
        for line in step.get("run", "").splitlines():
            argv = shlex.split(line)
            if argv[:1] != [".venv/bin/refine"]:
                continue
            assert argv[1] == "pipeline"
            args = parser.parse_args([re.sub(r"\$(\w+)", lambda m: env[m.group(1)], a) for a in argv[2:]])
            parsed.append(args.command)
            if args.command == "submit":
                assert (args.pipeline, args.experiment, args.wait) == ("midtrain", "retrain", True)
                assert (REPO / args.config).is_file()
                assert (args.nodes, args.gpus_per_node, args.service_account) == (1, 1, None)  # a push: one GPU
    assert parsed == ["compile", "submit"]
    inputs = workflow().get("on", workflow().get(True))["workflow_dispatch"]["inputs"]
    assert (inputs["nodes"]["default"], inputs["gpus_per_node"]["default"]) == ("1", "1")
