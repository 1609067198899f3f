"""Kubernetes settings of the pipeline tasks, in one place: resources, volumes, secrets, retries, timeouts, caching.

The pipelines only wire tasks; each task then goes through :func:`gpu_stage`, :func:`data_stage` or
:func:`light_stage`. Names of the cluster objects the pods read (they are created by ``manifests/``):

* Secret ``refine-data-s3-credentials`` -> ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (boto3: ``s3://``
  corpora and checkpoints; MLflow artifacts go through the server's proxy and need no keys);
* Secret ``refine-mlflow-auth`` (optional) -> ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, for an
  MLflow server behind basic auth;
* ConfigMap ``refine-config`` -> ``MLFLOW_TRACKING_URI``, and where present ``MLFLOW_EXPERIMENT_NAME``,
  ``MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD``, ``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``, and
  ``REFINE_STAGING_URI`` (where a TrainJob launcher and its trainer pods exchange data and models).

Credentials reach pods only this way: never as pipeline parameters, so the compiled IR and the KFP run records
hold none. ``tests/pipelines/test_compile.py`` asserts that.

Why one GPU per stage pod: a lightweight component runs the stage as one process. A data-parallel stage that is
given more GPUs (:class:`TrainPlacement`, chosen when the pipeline is compiled) goes through the Kubeflow Trainer
``TrainJob`` launcher (``components/launch_trainjob.py``, mlops-notes §4.3) instead; :func:`trainjob_stage` sets
that task up, and its resources are those of one trainer node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes

from refine_core.config import PodResources, TrainJobConfig

S3_SECRET = "refine-data-s3-credentials"
S3_SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_AUTH_SECRET = "refine-mlflow-auth"
MLFLOW_AUTH_ENV = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
CONFIG_MAP = "refine-config"
CONFIG_ENV = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
# Keys a deployment may leave out: an optional reference leaves a missing key's variable unset.
CONFIG_OPTIONAL_ENV = {
    key: key
    for key in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "AWS_ENDPOINT_URL_S3",
                "AWS_DEFAULT_REGION", "REFINE_STAGING_URI")
}
# The stages write checkpoints to a temporary directory before the final model is copied into the output
# artifact (refine_core.kfp_support.work_dir): an emptyDir on /tmp gives that a size limit and keeps it off the
# container's writable layer. Not an environment variable: kfp.local applies set_env_variable on a laptop too.
WORK_VOLUME, WORK_MOUNT = "tmp", "/tmp"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class StageResources:
    """What one task asks of the cluster.

    Attributes:
        cpu / memory: requests and limits (``"8"``, ``"64Gi"``).
        gpus: ``nvidia.com/gpu`` limit (0: a CPU task).
        timeout_s: the pod's ``activeDeadlineSeconds``.
        retries: retries after a failure (pod eviction, spot preemption, a transient S3 error); a retried
            one-pod training stage starts over, because its working directory is per pod, while a retried TrainJob
            launcher resumes from its trainers' last checkpoint (:func:`trainjob_stage`).
        shm: size of the ``/dev/shm`` memory emptyDir (PyTorch data loading and NCCL need more than Docker's 64M).
        work: size limit of the ``/tmp`` emptyDir where the stage keeps its checkpoints.
    """

    cpu: str
    memory: str
    gpus: int = 0
    timeout_s: int = 3600
    retries: int = 1
    shm: str = "16Gi"
    work: str = "200Gi"


@dataclass(frozen=True)
class TrainPlacement:
    """Where the data-parallel training stages (mid-training, pre-training) run; fixed when a pipeline is compiled.

    ``1 x 1`` runs the stage in its own pod on one GPU; anything larger runs it as a TrainJob of ``nodes`` pods with
    ``gpus_per_node`` GPUs and torchrun processes each (the config's batch sizes must be multiples of the total).
    Post-training and evaluation always run in one pod on one GPU. ``trainjob`` is the config's section of the same
    name (:class:`refine_core.config.TrainJobConfig`): the launcher pod's and each node's resources, where the
    checkpoints go and whether the staged data stay; :meth:`with_config` takes it from a run config.
    """

    nodes: int = 1
    gpus_per_node: int = 1
    trainjob: TrainJobConfig = field(default_factory=TrainJobConfig, compare=False)

    def with_config(self, trainjob: TrainJobConfig) -> TrainPlacement:
        """This placement with the ``trainjob`` section of a run config."""
        return TrainPlacement(self.nodes, self.gpus_per_node, trainjob)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes={self.nodes} and gpus_per_node={self.gpus_per_node} must both be >= 1.")

    @property
    def distributed(self) -> bool:
        return self.nodes * self.gpus_per_node > 1

    @property
    def label(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}gpu"


SINGLE_GPU = TrainPlacement()

# Sized for the paper's 1.3B DeltaNet at 16K tokens on one H100 (80 GB): mid-training runs for about a day.
MIDTRAIN = StageResources(cpu="12", memory="96Gi", gpus=1, timeout_s=48 * 3600, retries=2)
POSTTRAIN = StageResources(cpu="12", memory="96Gi", gpus=1, timeout_s=24 * 3600, retries=2)
EVALUATE = StageResources(cpu="12", memory="96Gi", gpus=1, timeout_s=24 * 3600, retries=2)
DATA = StageResources(cpu="8", memory="32Gi", timeout_s=6 * 3600, retries=2, shm="2Gi")
LIGHT = StageResources(cpu="1", memory="2Gi", timeout_s=15 * 60, retries=3, shm="", work="1Gi")


def per_node(res: StageResources, gpus: int) -> StageResources:
    """``res`` (sized for one GPU) scaled to a trainer node with ``gpus`` GPUs: CPU and memory grow with the GPUs."""
    memory_gi = int(res.memory.removesuffix("Gi"))
    return StageResources(cpu=str(int(res.cpu) * gpus), memory=f"{memory_gi * gpus}Gi", gpus=gpus,
                          timeout_s=res.timeout_s, retries=res.retries, shm=res.shm, work=res.work)


def node_resources(node: StageResources, configured: PodResources) -> dict[str, Any]:
    """``resourcesPerNode`` of the TrainJob: the config's ``trainjob.node`` values where set, else ``node``'s (sized
    from the GPUs by :func:`per_node`), and the node's GPUs as request and limit."""
    cpu, memory = configured.cpu or node.cpu, configured.memory or node.memory
    sized = PodResources(cpu=cpu, memory=memory, cpu_limit=configured.cpu_limit if configured.cpu else None,
                         memory_limit=configured.memory_limit if configured.memory else None).as_kubernetes()
    gpus = {GPU_RESOURCE: str(node.gpus)} if node.gpus else {}
    return {section: {**sized.get(section, {}), **gpus} for section in ("requests", "limits")}


def run_context() -> dict[str, str]:
    """The KFP run id and task name placeholders every MLflow-logging component takes (``**run_context()``).

    The run id also makes the task's cache key unique per pipeline run, so a task that logs to MLflow is never
    served from another run's cache.
    """
    return {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "kfp_task": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}


def _set_resources(task: dsl.PipelineTask, res: PodResources) -> None:
    """The task pod's CPU and memory requests and limits (a value left ``None`` is not set)."""
    wanted = res.as_kubernetes()
    requests, limits = wanted.get("requests", {}), wanted.get("limits", {})
    if "cpu" in requests:
        task.set_cpu_request(requests["cpu"]).set_cpu_limit(limits["cpu"])
    if "memory" in requests:
        task.set_memory_request(requests["memory"]).set_memory_limit(limits["memory"])


def _common(task: dsl.PipelineTask, res: StageResources, name: str, *, s3: bool, cache: bool,
            pod: PodResources | None = None) -> dsl.PipelineTask:
    task.set_display_name(name)
    _set_resources(task, pod or PodResources(cpu=res.cpu, memory=res.memory))
    task.set_retry(num_retries=res.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="900s")
    task.set_caching_options(enable_caching=cache)
    kubernetes.set_timeout(task, res.timeout_s)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, CONFIG_ENV)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, CONFIG_OPTIONAL_ENV, optional=True)
    kubernetes.use_secret_as_env(task, MLFLOW_AUTH_SECRET, MLFLOW_AUTH_ENV, optional=True)
    if s3:
        kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_ENV)
    if res.shm:
        kubernetes.empty_dir_mount(task, volume_name="shm", mount_path="/dev/shm", medium="Memory", size_limit=res.shm)
    if res.work:
        kubernetes.empty_dir_mount(task, volume_name=WORK_VOLUME, mount_path=WORK_MOUNT, size_limit=res.work)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "refine")
    return task


def gpu_stage(task: dsl.PipelineTask, res: StageResources, name: str) -> dsl.PipelineTask:
    """A training or evaluation task: GPUs, ``/dev/shm``, a working volume, secrets, retries, a timeout, and no
    caching.

    Caching is off for training although it is seeded: on GPUs the result is not bitwise reproducible (bf16
    autocast, atomics in the Triton kernels), and each run must log its own nested MLflow run under this
    pipeline's parent run, with metrics, which a cache hit would skip. The run-id placeholder in the task's
    inputs (:func:`run_context`) would make the cache key unique anyway; this states it in the IR.
    """
    _common(task, res, name, s3=True, cache=False)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(res.gpus)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


def trainjob_stage(task: dsl.PipelineTask, node: StageResources, launcher: PodResources, name: str
                   ) -> dsl.PipelineTask:
    """A ``launch-trainjob`` task: ``launcher`` sizes its own small pod, ``node`` describes one trainer node.

    The node's resources travel as the component's ``node_resources`` parameter; the GPU toleration and the node
    selector reach the TrainJob through the component's ``task_config_passthroughs`` and are not applied to the
    launcher's pod; its env, secrets and volumes apply to both (the ``/dev/shm`` and ``/tmp`` scratch volumes stay
    with the launcher, since the ``refine-torch`` runtime mounts its own). The launcher pod's deadline leaves an
    hour beyond the job's own timeout for staging the data and copying the model back. A retry of the task creates
    a new TrainJob that resumes from the trainers' last committed checkpoint (same KFP run and task, same
    checkpoint location).
    """
    _common(task, node, name, s3=True, cache=False, pod=launcher)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    kubernetes.set_timeout(task, node.timeout_s + 3600)
    return task


def data_stage(task: dsl.PipelineTask, res: StageResources, name: str) -> dsl.PipelineTask:
    """Data preparation: cached, since its output depends only on the config and the corpora it names (it logs
    no MLflow run and takes no run id). A changed config text gives a new cache key."""
    return _common(task, res, name, s3=True, cache=True)


def light_stage(task: dsl.PipelineTask, name: str, res: StageResources = LIGHT) -> dsl.PipelineTask:
    """A small CPU task that talks to MLflow (parent run, report, registry): not cached, no S3 credentials
    (MLflow's proxied artifact store holds them server-side)."""
    return _common(task, res, name, s3=False, cache=False)
