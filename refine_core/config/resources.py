"""Where the Kubernetes side of a run is configured: pod resources (Kubernetes quantities) and the TrainJob section,
and the checkpoint locations that outlive a pod."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from refine_core.config.errors import ConfigError

# Kubernetes quantities (the forms `kubectl` accepts for CPU and memory): a decimal number with an optional suffix.
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_QUANTITY_SCALE = {
    None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}


def parse_quantity(text: str, where: str) -> float:
    """The value of a Kubernetes resource quantity (``"500m"`` -> 0.5, ``"64Gi"`` -> 68719476736.0).

    Raises:
        ConfigError: not a quantity (the message names ``where`` and shows the accepted forms).
    """
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ConfigError(
            f"{where}={text!r} is not a Kubernetes quantity; use e.g. '8', '500m' or '0.5' for CPUs and '64Gi', "
            "'512Mi' or '1G' for memory."
        )
    return float(match.group(1)) * _QUANTITY_SCALE[match.group(2)]


@dataclass
class PodResources:
    """CPU and memory of one pod's container (requests; limits default to the requests, the Guaranteed QoS class)."""

    # CPUs requested (``"8"``, ``"500m"``); ``None``: no request.
    cpu: str | None = None
    # Memory requested (``"64Gi"``); ``None``: no request.
    memory: str | None = None
    # ``None``: the same as the request; a larger value lets the container burst above its request.
    cpu_limit: str | None = None
    # ``None``: the same as the request (a container above its memory limit is killed).
    memory_limit: str | None = None

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError` for a value that is not a quantity, not positive, or a limit below its request."""
        for key in ("cpu", "memory", "cpu_limit", "memory_limit"):
            value = getattr(self, key)
            if value is not None and parse_quantity(value, f"{where}.{key}") <= 0:
                raise ConfigError(f"{where}.{key}={value!r} must be > 0 (or null for none).")
        for key in ("cpu", "memory"):
            request, limit = getattr(self, key), getattr(self, f"{key}_limit")
            if limit is not None and request is None:
                raise ConfigError(f"{where}.{key}_limit is set without {where}.{key}; set the request too.")
            if request is not None and limit is not None and (
                parse_quantity(limit, f"{where}.{key}_limit") < parse_quantity(request, f"{where}.{key}")
            ):
                raise ConfigError(
                    f"{where}.{key}_limit={limit!r} is below the request {where}.{key}={request!r}; a limit must be "
                    "at least the request."
                )

    def as_kubernetes(self) -> dict[str, dict[str, str]]:
        """``{"requests": {...}, "limits": {...}}`` as a container's ``resources`` (unset values left out)."""
        out: dict[str, dict[str, str]] = {}
        for key in ("cpu", "memory"):
            request = getattr(self, key)
            if request is not None:
                out.setdefault("requests", {})[key] = str(request)
                out.setdefault("limits", {})[key] = str(getattr(self, f"{key}_limit") or request)
        return out


@dataclass
class LauncherResources(PodResources):
    """The TrainJob launcher's own small pod: it stages data, creates and watches the job, copies the model back."""

    # CPUs requested; the launcher mostly waits, and copies files at the start and the end.
    cpu: str | None = "1"
    # Memory requested.
    memory: str | None = "4Gi"


@dataclass
class NodeResources(PodResources):
    """Each trainer node of a TrainJob (``resourcesPerNode``); its GPUs come from ``--gpus-per-node``."""

    # CPUs requested per node; ``None``: 12 per GPU (pipelines/_k8s.py MIDTRAIN, sized for DeltaNet-1.3B at 16K).
    cpu: str | None = None
    # Memory requested per node; ``None``: 96Gi per GPU.
    memory: str | None = None


@dataclass
class TrainJobConfig:
    """A training stage run as a Kubeflow Trainer ``TrainJob`` (``refine pipeline ... --nodes N --gpus-per-node G``).

    Read when the pipeline is built for this config (``refine pipeline submit|run|compile --config``): the values go
    into the compiled pipeline as the ``launch-trainjob`` task's own resources and parameters.
    """

    # The launcher task's own small pod: it stages data, creates and watches the TrainJob, copies the model back.
    launcher: LauncherResources = field(default_factory=LauncherResources)
    # Each trainer node (``resourcesPerNode`` of the TrainJob; the GPUs come from ``--gpus-per-node``).
    node: NodeResources = field(default_factory=NodeResources)
    # Where the trainers keep their checkpoints so that a retried or pre-empted job resumes: an ``s3://`` prefix or
    # a directory on a volume the trainer pods mount; the launcher adds ``/{kfp run id}/{task}``. ``None``:
    # ``{REFINE_STAGING_URI}/{kfp run id}/{task}/checkpoints``.
    checkpoint_root: str | None = None
    # Keep what the launcher staged (the data, the base model, the exported result; on success the checkpoints
    # too) when the job ends. ``false`` deletes it; a failed job's checkpoints always stay, for its retry.
    keep_staged: bool = False

    def __post_init__(self) -> None:
        self.launcher.check("trainjob.launcher")
        self.node.check("trainjob.node")
        if self.checkpoint_root is not None:
            check_location("trainjob.checkpoint_root", self.checkpoint_root)


def check_location(where: str, value: str) -> None:
    """A checkpoint location is an ``s3://bucket/prefix`` URI or a directory path (not another URI scheme)."""
    if not value.strip():
        raise ConfigError(f"{where} is empty; give an s3://bucket/prefix URI or a directory, or null for none.")
    if "://" in value and not value.startswith("s3://"):
        raise ConfigError(
            f"{where}={value!r}: only s3:// URIs and directories (e.g. a mounted volume) are supported."
        )
    if value.startswith("s3://") and not value[len("s3://"):].split("/", 1)[0]:
        raise ConfigError(f"{where}={value!r} has no bucket; use s3://bucket/prefix.")
