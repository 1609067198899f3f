"""Run a training stage on several GPUs or nodes as a Kubeflow Trainer v2 ``TrainJob`` and wait for it.

The ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) references a ClusterTrainingRuntime of the torch family (the
``refine-torch`` runtime in ``manifests/``, or the Trainer's ``torch-distributed``) and sets its trainer container:
our image and ``torchrun -m refine_core <stage> --config <yaml> [key=value ...]``. The runtime sets the ``PET_*``
variables (nodes, processes per node, node rank, master address and port) that torchrun reads, so the command
names no topology. The config is either a path the pods can read (a shared volume) or the YAML text itself, which
travels in the ``REFINE_CONFIG_YAML`` variable and is written to ``/tmp`` before ``exec torchrun``. What the
launching KFP task was given (mlops-notes §2.3, ``task_config_passthroughs``) is copied into the job:

* resources → ``spec.trainer.resourcesPerNode`` (GPU count → ``numProcPerNode``, one process per GPU);
* env → ``spec.trainer.env`` (``valueFrom`` secret references stay references);
* tolerations, node selector, affinity, volumes → a ``runtimePatches`` entry on the ``node`` replicated job's pod
  template, volume mounts → its ``node`` container. ``refine-torch`` already mounts a memory-backed ``/dev/shm``
  and an emptyDir on ``/tmp``: the task's own scratch volumes at those paths stay with the launcher pod
  (``runtime_mounts``), since a second mount at one path makes the pod invalid. With another runtime set
  ``shm_size`` to add a ``/dev/shm``.

:func:`launch_trainjob` validates the object with the ``kubeflow-trainer-api`` models (and that ``to_dict``
round-trips, since the models silently drop unknown fields), creates it with ``CustomObjectsApi``, polls its
conditions while following the logs of its trainer pods, and deletes it when it fails, times out or the wait is
interrupted. The launcher needs RBAC on ``trainjobs`` (create/get/delete) and get/list on ``pods`` and
``pods/log`` (``manifests/``). Only ``kubernetes`` and ``kubeflow-trainer-api`` are used here, never kfp.

Example::

    spec = TrainJobSpec(stage="train-refine", image=REFINE_GPU_IMAGE, config="/workspace/run.yaml", num_nodes=2,
                        resources={"limits": {"nvidia.com/gpu": "8"}}, namespace="kubeflow-user")
    status = launch_trainjob(spec, kubernetes.client.ApiClient(), timeout_s=86400, poll_s=15, log_sink=print)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from refine_core.distributed.pod_resources import check_resources, gpus_per_node, quantity_text

logger = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
# The replicated job and the trainer container of the torch runtimes are both called "node".
NODE = "node"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
# Who owns our runtimePatches entry (a TrainJob may carry patches of several managers, e.g. Kueue's).
PATCH_MANAGER = "refine.launcher"
DEFAULT_RUNTIME = "refine-torch"
# With config_yaml, the trainer writes the YAML here (refine-torch mounts an emptyDir on /tmp) before torchrun.
CONFIG_ENV = "REFINE_CONFIG_YAML"
CONFIG_IN_POD = "/tmp/refine-config.yaml"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# Paths that the refine-torch runtime's trainer container mounts itself (manifests/base/trainer).
REFINE_TORCH_MOUNTS = ("/dev/shm", "/tmp")

COMPLETE, FAILED, RUNNING, CREATED = "Complete", "Failed", "Running", "Created"
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 40  # JobSet derives Job and pod names (and a headless Service) from it; keep room for suffixes


class TrainJobError(RuntimeError):
    """The TrainJob could not be created or watched (API error, vanished while waiting)."""


class TrainJobFailed(TrainJobError):
    """The TrainJob reported ``Failed``; it has been deleted. ``status`` holds the reason and message."""

    def __init__(self, message: str, status: TrainJobStatus) -> None:
        super().__init__(message)
        self.status = status


class TrainJobTimeout(TimeoutError):
    """The TrainJob did not complete within the timeout; it has been deleted."""

    def __init__(self, message: str, status: TrainJobStatus) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TrainJobSpec:
    """What to run and where; the Kubernetes fields are plain dicts in the API's JSON form (as KFP passes them).

    Attributes:
        stage: a ``refine`` subcommand that supports data-parallel runs (``train-ntp``, ``train-refine``).
        image: the training image (``components._image.REFINE_GPU_IMAGE``).
        config: path of the run's YAML inside the trainer pods (e.g. on the shared volume); or
        config_yaml: the YAML text itself (what the other components take); exactly one of the two.
        overrides: dotted ``key=value`` overrides appended to the command line.
        namespace: where the TrainJob goes (the launcher's own namespace, see :func:`current_namespace`).
        name: the TrainJob name; default ``refine-<stage>-<8 hex>``.
        num_nodes: pods (nodes) of the job.
        procs_per_node: torchrun processes per node; default: the GPUs per node, else 1.
        runtime: the ClusterTrainingRuntime (or namespaced TrainingRuntime) to reference.
        runtime_kind: ``ClusterTrainingRuntime`` or ``TrainingRuntime``.
        resources: ``ResourceRequirements`` per node (``{"limits": {...}, "requests": {...}}``).
        env: container ``EnvVar`` list.
        tolerations, node_selector, affinity, volumes, volume_mounts: pod placement and storage of each node.
        shm_size: ``sizeLimit`` of the memory-backed ``/dev/shm`` added when no volume is mounted there; ``None``
            adds none.
        active_deadline_s: ``spec.activeDeadlineSeconds`` (the Trainer fails the job after it).
        labels: extra labels of the TrainJob.
        runtime_mounts: mount paths the runtime's container already has; volume mounts there (and volumes used only
            by them) are not copied. ``None``: :data:`REFINE_TORCH_MOUNTS` for ``refine-torch``, else none.
    """

    stage: str
    image: str
    config: str | None = None
    config_yaml: str | None = None
    overrides: list[str] = field(default_factory=list)
    namespace: str = "default"
    name: str | None = None
    num_nodes: int = 1
    procs_per_node: int | None = None
    runtime: str = DEFAULT_RUNTIME
    runtime_kind: str = "ClusterTrainingRuntime"
    resources: dict[str, Any] | None = None
    env: list[dict[str, Any]] = field(default_factory=list)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    shm_size: str | None = None
    active_deadline_s: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    runtime_mounts: tuple[str, ...] | None = None

    def with_env(self, values: Mapping[str, str]) -> TrainJobSpec:
        """A copy whose container env also holds ``values`` (plain values; an entry of the same name is replaced)."""
        out = copy.deepcopy(self)
        out.env = [e for e in out.env if e.get("name") not in values]
        out.env += [{"name": name, "value": str(value)} for name, value in values.items()]
        return out

    def with_task_config(self, task_config: Any, *, resources: bool = True) -> TrainJobSpec:
        """A copy with the fields of a KFP ``dsl.TaskConfig`` (or anything with its attributes) filled in.

        Fields that are ``None`` — all of them in a local ``kfp.local`` run (mlops-notes §2.6 item 6), or those
        not declared as passthroughs — leave this spec's values alone. ``resources=False`` ignores the task's
        resources: they are the launcher pod's own (KFP wants a RESOURCES passthrough on any task whose component
        declares passthroughs and sets resources), and the nodes' come from elsewhere.
        """
        out = copy.deepcopy(self)
        if task_config is None:
            return out
        for attr, target in (
            ("resources", "resources"),
            ("env", "env"),
            ("tolerations", "tolerations"),
            ("node_selector", "node_selector"),
            ("affinity", "affinity"),
            ("volumes", "volumes"),
            ("volume_mounts", "volume_mounts"),
        ):
            value = getattr(task_config, attr, None)
            if value is not None and (resources or attr != "resources"):
                setattr(out, target, _json_ints(value))
        return out


@dataclass
class TrainJobStatus:
    """Where a TrainJob got to.

    Attributes:
        name, namespace: the TrainJob.
        phase: ``Created``, ``Running``, ``Complete`` or ``Failed`` (as the kubeflow SDK names them).
        reason, message: of the ``Complete``/``Failed`` condition, when there is one.
        phases_seen: every distinct phase observed, in order.
        pods: the trainer pods whose logs were followed.
        elapsed_s: seconds from creation to the end of the wait.
        deleted: whether the launcher deleted the TrainJob.
    """

    name: str
    namespace: str
    phase: str = CREATED
    reason: str | None = None
    message: str | None = None
    phases_seen: list[str] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    deleted: bool = False


def _json_ints(value: Any) -> Any:
    """A deep copy with integral floats turned into ints.

    KFP hands the TaskConfig over as a protobuf ``Struct``, whose numbers are all floats (``tolerationSeconds:
    300.0``, ``defaultMode: 420.0``); the API and its models want integers there.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _json_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ints(item) for item in value]
    return copy.deepcopy(value)


def default_name(stage: str) -> str:
    """``refine-<stage>-<8 hex>``: unique, DNS-1035, short enough for JobSet's derived names."""
    return f"refine-{re.sub(r'[^a-z0-9-]+', '-', stage.lower()).strip('-')}-{uuid.uuid4().hex[:8]}"[:_MAX_NAME]


def trainer_command(spec: TrainJobSpec) -> tuple[list[str], list[str]]:
    """``(command, args)`` of the trainer container: ``torchrun -m refine_core <stage> --config <yaml> ...``.

    With ``config_yaml`` a POSIX shell first writes ``$REFINE_CONFIG_YAML`` to :data:`CONFIG_IN_POD`, then runs
    the same torchrun command with ``exec`` (so that torchrun receives the pod's signals).
    """
    if (spec.config is None) == (spec.config_yaml is None):
        raise ValueError("TrainJobSpec needs exactly one of config (a path in the pods) and config_yaml (the text).")
    if spec.config is not None:
        return ["torchrun"], ["-m", "refine_core", spec.stage, "--config", spec.config, *spec.overrides]
    script = f'printf \'%s\\n\' "${CONFIG_ENV}" > {CONFIG_IN_POD} && exec torchrun -m refine_core "$@"'
    return ["sh", "-c", script], ["refine-trainjob", spec.stage, "--config", CONFIG_IN_POD, *spec.overrides]


def build_trainjob(spec: TrainJobSpec) -> dict[str, Any]:
    """The ``TrainJob`` object for ``spec`` (a JSON-ready dict); see the module docstring for the mapping.

    Raises:
        ValueError: naming the bad field (name, node count, process count).
    """
    name = spec.name or default_name(spec.stage)
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        raise ValueError(
            f"TrainJob name {name!r} must be a DNS-1035 label (lower-case letters, digits, '-', starting with a "
            f"letter) of at most {_MAX_NAME} characters."
        )
    if spec.num_nodes < 1:
        raise ValueError(f"num_nodes={spec.num_nodes} must be >= 1.")
    check_resources(spec.resources, "resources (per node)")
    gpus = gpus_per_node(spec.resources)
    procs = spec.procs_per_node or gpus or 1
    if procs < 1:
        raise ValueError(f"procs_per_node={spec.procs_per_node} must be >= 1.")
    command, args = trainer_command(spec)
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": command,
        "args": args,
        "numNodes": spec.num_nodes,
        "numProcPerNode": procs,
    }
    env = copy.deepcopy(spec.env)
    if spec.config_yaml is not None:
        env = [e for e in env if e.get("name") != CONFIG_ENV] + [{"name": CONFIG_ENV, "value": spec.config_yaml}]
    if env:
        trainer["env"] = env
    if spec.resources:
        trainer["resourcesPerNode"] = {
            section: {key: quantity_text(value) for key, value in quantities.items()}
            for section, quantities in spec.resources.items()
            if quantities
        }

    volumes, mounts = _copied_volumes(spec)
    if spec.shm_size is not None and not any(m.get("mountPath") == "/dev/shm" for m in mounts):
        # PyTorch workers and NCCL exchange tensors through /dev/shm; the container default (64 MiB) is too small.
        volumes.append({"name": "refine-dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}})
        mounts.append({"name": "refine-dshm", "mountPath": "/dev/shm"})
    pod_spec: dict[str, Any] = {}
    if spec.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(spec.tolerations)
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        pod_spec["affinity"] = copy.deepcopy(spec.affinity)
    if volumes:
        pod_spec["volumes"] = volumes
    if mounts:
        pod_spec["containers"] = [{"name": NODE, "volumeMounts": mounts}]

    job_spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": spec.runtime_kind, "name": spec.runtime},
        "trainer": trainer,
    }
    if spec.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = int(spec.active_deadline_s)
    if pod_spec:
        job_spec["runtimePatches"] = [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {"name": NODE, "template": {"spec": {"template": {"spec": pod_spec}}}}
                            ]
                        }
                    }
                },
            }
        ]
    labels = {"app.kubernetes.io/part-of": "refine", "app.kubernetes.io/managed-by": "refine-launcher",
              "refine-core/stage": spec.stage, **spec.labels}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": spec.namespace, "labels": labels},
        "spec": job_spec,
    }


def _copied_volumes(spec: TrainJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The task's volumes and mounts minus those at paths the runtime mounts itself (see ``runtime_mounts``)."""
    owned = spec.runtime_mounts
    if owned is None:
        owned = REFINE_TORCH_MOUNTS if spec.runtime == DEFAULT_RUNTIME else ()
    kept = [copy.deepcopy(m) for m in spec.volume_mounts if m.get("mountPath") not in owned]
    dropped = {m.get("name") for m in spec.volume_mounts if m.get("mountPath") in owned}
    used = {m.get("name") for m in kept}
    volumes = [copy.deepcopy(v) for v in spec.volumes if v.get("name") in used or v.get("name") not in dropped]
    return volumes, kept


def validate_trainjob(body: Mapping[str, Any]) -> Any:
    """Check ``body`` against the ``kubeflow-trainer-api`` models; returns the model object.

    The models drop unknown fields silently (mlops-notes §3.3), so the object must also come back unchanged from
    ``to_dict()``: a misspelt or stale field (``podSpecOverrides``) fails here instead of vanishing in the cluster.

    Raises:
        ValueError: the object does not validate, or a field would be lost.
    """
    from kubeflow_trainer_api import models
    from pydantic import ValidationError

    try:
        job = models.TrainerV1alpha1TrainJob.from_dict(dict(body))
    except ValidationError as exc:
        raise ValueError(f"the TrainJob does not validate against the Trainer v2 API: {exc}") from exc
    if job is None:
        raise ValueError("the TrainJob is empty")
    back = job.to_dict()
    if back != body:
        raise ValueError(
            "the TrainJob does not round-trip through the Trainer v2 API models (an unknown or misplaced field "
            f"would be dropped by the cluster):\n sent: {dict(body)}\n kept: {back}"
        )
    return job


def current_namespace(default: str = "default") -> str:
    """The namespace of this pod's service account (the launcher's own), else ``default``."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def api_client_from_environment() -> k8s.ApiClient:
    """An ``ApiClient`` from the in-cluster service account, else from ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # Read $KUBECONFIG now: the kubernetes package reads it once, at import.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (config.ConfigException, OSError) as exc:
            raise TrainJobError(
                "no Kubernetes API to launch the TrainJob on: not in a cluster (no service account) and no "
                "kubeconfig ($KUBECONFIG or ~/.kube/config). Run multi-GPU stages on a Kubeflow cluster, or run the "
                "stage component directly for a local single-process run."
            ) from exc
    return k8s.ApiClient()


def _condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def _phase(obj: Mapping[str, Any], pods: Sequence[Any], num_nodes: int) -> tuple[str, dict[str, Any] | None]:
    """The SDK's phase: a true Complete/Failed condition, else Running once every node pod runs (or is done)."""
    for kind in (FAILED, COMPLETE):
        cond = _condition(obj, kind)
        if cond is not None:
            return kind, cond
    started = sum(1 for pod in pods if pod.status and pod.status.phase in ("Running", "Succeeded"))
    return (RUNNING if started >= num_nodes else CREATED), None


def _iter_lines(response: Any) -> Iterator[str]:
    """Lines of a streamed HTTP response as they arrive (the API server sends a followed log chunked)."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk if isinstance(chunk, bytes) else str(chunk).encode()
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


class _LogFollower:
    """Follows (``kubectl logs -f``) the trainer container of each trainer pod, one daemon thread per pod."""

    def __init__(self, core: k8s.CoreV1Api, namespace: str, sink: Callable[[str], None]) -> None:
        self.core = core
        self.namespace = namespace
        self.sink = sink
        self._threads: dict[str, threading.Thread] = {}
        self._responses: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def pods(self) -> list[str]:
        return list(self._threads)

    def follow(self, pod: str) -> None:
        if pod in self._threads:
            return
        thread = threading.Thread(target=self._run, args=(pod,), name=f"logs-{pod}", daemon=True)
        self._threads[pod] = thread
        thread.start()

    def _emit(self, line: str) -> None:
        with self._lock:  # one sink call at a time, so lines of different pods never interleave mid-line
            self.sink(line)

    def _run(self, pod: str) -> None:
        try:
            response = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=NODE, follow=True, _preload_content=False
            )
        except (ApiException, OSError) as exc:
            self._emit(f"[{pod}] (logs unavailable: {getattr(exc, 'status', '')} {getattr(exc, 'reason', exc)})")
            return
        self._responses[pod] = response
        try:
            for line in _iter_lines(response):
                self._emit(f"[{pod}] {line}")
        except Exception as exc:  # the connection was closed under us (job deleted, launcher stopping)
            logger.debug("log stream of %s ended: %s", pod, exc)
        finally:
            response.release_conn()

    def finish(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the streams to end (pods exit), then close the rest."""
        deadline = time.monotonic() + grace_s
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        for pod, thread in self._threads.items():
            if thread.is_alive() and pod in self._responses:
                response = self._responses[pod]
                with contextlib.suppress(Exception):  # best effort; the thread is a daemon either way
                    # close() waits for the read the follower thread is blocked in; urllib3's shutdown() (2.3+)
                    # interrupts that read first, so the grace period really bounds the wait.
                    getattr(response, "shutdown", lambda: None)()
                    response.close()
                thread.join(1.0)


def delete_trainjob(custom: k8s.CustomObjectsApi, name: str, namespace: str) -> bool:
    """Delete the TrainJob with its JobSet and pods (foreground); ``False`` if it was already gone."""
    try:
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    logger.info("deleted TrainJob %s/%s", namespace, name)
    return True


def launch_trainjob(
    spec: TrainJobSpec,
    api_client: k8s.ApiClient,
    timeout_s: float,
    poll_s: float = 10.0,
    log_sink: Callable[[str], None] | None = None,
    *,
    delete_on_success: bool = False,
    log_grace_s: float = 10.0,
) -> TrainJobStatus:
    """Create the TrainJob for ``spec``, stream its trainer pods' logs and wait until it completes.

    Args:
        spec: what to run (see :class:`TrainJobSpec`; use :meth:`TrainJobSpec.with_task_config` for KFP's
            ``TaskConfig``).
        api_client: a configured ``kubernetes.client.ApiClient`` (:func:`api_client_from_environment`).
        timeout_s: give up (and delete the job) after this many seconds.
        poll_s: seconds between status polls.
        log_sink: receives every log line as ``[<pod>] <line>`` (default: this module's logger).
        delete_on_success: also delete a completed job (by default it stays for inspection).
        log_grace_s: after the job ends, how long to wait for the log streams to drain.

    Returns:
        The final :class:`TrainJobStatus` (phase ``Complete``).

    Raises:
        TrainJobFailed: the job failed (it is deleted; the message has the condition's reason and message).
        TrainJobTimeout: ``timeout_s`` passed (the job is deleted).
        TrainJobError: creation was refused, or the job vanished while waiting.
        ValueError: the built object does not validate (nothing was created).
    """
    if timeout_s <= 0 or poll_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} and poll_s={poll_s} must be > 0.")
    sink = log_sink or (lambda line: logger.info("%s", line))
    body = build_trainjob(spec)
    validate_trainjob(body)
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    custom, core = k8s.CustomObjectsApi(api_client), k8s.CoreV1Api(api_client)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except ApiException as exc:
        hint = " (pick another name or delete the old job)" if exc.status == 409 else ""
        raise TrainJobError(f"creating TrainJob {namespace}/{name} failed: {exc.status} {exc.reason}{hint}") from exc
    logger.info(
        "created TrainJob %s/%s: %d node(s) x %d process(es), runtime %s, %s",
        namespace, name, spec.num_nodes, body["spec"]["trainer"]["numProcPerNode"], spec.runtime,
        " ".join(body["spec"]["trainer"]["command"] + body["spec"]["trainer"]["args"]),
    )

    status = TrainJobStatus(name=name, namespace=namespace)
    logs = _LogFollower(core, namespace, sink)
    selector = f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE}"
    start = time.monotonic()
    finished = False
    try:
        while True:
            try:
                obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            except ApiException as exc:
                if exc.status == 404:
                    raise TrainJobError(f"TrainJob {namespace}/{name} disappeared while waiting for it") from exc
                if exc.status is not None and exc.status < 500:
                    raise
                logger.warning("polling TrainJob %s/%s: %s %s (retrying)", namespace, name, exc.status, exc.reason)
                obj, pods = None, []
            if obj is not None:
                for pod in pods:
                    if pod.status and pod.status.phase in ("Running", "Succeeded", "Failed"):
                        logs.follow(pod.metadata.name)
                phase, cond = _phase(obj, pods, spec.num_nodes)
                if not status.phases_seen or status.phases_seen[-1] != phase:
                    status.phases_seen.append(phase)
                    logger.info("TrainJob %s/%s: %s", namespace, name, phase)
                status.phase = phase
                if cond is not None:
                    status.reason, status.message = cond.get("reason"), cond.get("message")
                if phase in (COMPLETE, FAILED):
                    break
            if time.monotonic() - start >= timeout_s:
                break
            time.sleep(min(poll_s, max(0.0, timeout_s - (time.monotonic() - start))))
        finished = True
    finally:
        status.elapsed_s = time.monotonic() - start
        if not finished or status.phase != COMPLETE or delete_on_success:
            # Failed, timed out, or the wait itself broke (API error, KeyboardInterrupt): do not leave GPUs held.
            try:
                status.deleted = delete_trainjob(custom, name, namespace)
            except ApiException as exc:
                logger.error("could not delete TrainJob %s/%s: %s %s", namespace, name, exc.status, exc.reason)
        logs.finish(log_grace_s if finished else 1.0)
        status.pods = logs.pods

    if status.phase == COMPLETE:
        logger.info("TrainJob %s/%s completed in %.0f s", namespace, name, status.elapsed_s)
        return status
    if status.phase == FAILED:
        detail = ": ".join(part for part in (status.reason, status.message) if part) or "no reason given"
        raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {detail}; deleted it.", status)
    raise TrainJobTimeout(
        f"TrainJob {namespace}/{name} did not complete within {timeout_s:.0f} s (last phase {status.phase}); "
        "deleted it.",
        status,
    )
