"""Hand a KFP task's inputs to the pods of a ``TrainJob``, take their model back, and clean up afterwards.

The launcher component runs in a small pod of its own; the trainer pods of the TrainJob cannot see its KFP artifact
paths. Both reach one *staging* location: an ``s3://`` prefix (credentials from the ``refine-data-s3-credentials``
Secret) or a directory on a volume that both mount. Per KFP run and task it holds::

    {staging}/{kfp run id}/{task}/data/          the prepared shards  -> data.prepared_dir of the trainer
    {staging}/{kfp run id}/{task}/base-model/    the model to start from, when the task has one -> model.source
    {staging}/{kfp run id}/{task}/result/        model/ + result.json, written by the trainer's rank 0 (export_uri)
    {staging}/{kfp run id}/{task}/checkpoints/   {stage}/step_*: the trainers' checkpoints (checkpoint_uri), unless
                                                 the launcher is given a checkpoint_root: {root}/{kfp run id}/{task}

The trainer's stage downloads ``data/`` (:func:`refine_core.training.setup.localize_inputs`), trains, and publishes
its final model with :func:`refine_core.training.result.export_result`; the launcher reads it back with
:func:`pull_result` once the job has completed. The staging location is the launcher's ``staging_uri`` parameter,
else ``$REFINE_STAGING_URI`` (the ``refine-config`` ConfigMap, ``manifests/base/config``).

**Resuming.** The checkpoint location depends only on the KFP run and task, so a retry of the task (KFP's
``set_retry``) and a restarted job find the checkpoints of the attempt before; the trainers run with
``{section}.resume=true`` (:func:`trainer_settings`) and continue from the newest complete one.

**Cleaning up** (:func:`clean_up`): when the job ends the launcher deletes what it staged — ``data/``,
``base-model/`` and ``result/`` whatever the outcome, and the checkpoints once the job has succeeded (its model is in
the KFP artifact by then). A failed job's checkpoints stay for the retry that resumes from them. ``keep_staged`` keeps
everything (to debug a run); an object-store lifecycle rule on the prefix catches what a killed launcher leaves.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_core import storage
from refine_core.training.result import TrainResult, load_exported_result

logger = logging.getLogger(__name__)

STAGING_ENV = "REFINE_STAGING_URI"
# The trainer pods' output_dir (the refine-torch runtime mounts an emptyDir on /tmp): it goes with the pod, so the
# checkpoints that must outlive it go to checkpoint_uri (checkpoint_location).
POD_OUTPUT_DIR = "/tmp/refine-run"


@dataclass(frozen=True)
class Staging:
    """The staging locations of one launcher task (see the module docstring)."""

    prefix: str

    @property
    def data(self) -> str:
        return storage.join_uri(self.prefix, "data")

    @property
    def base_model(self) -> str:
        return storage.join_uri(self.prefix, "base-model")

    @property
    def result(self) -> str:
        return storage.join_uri(self.prefix, "result")

    @property
    def checkpoints(self) -> str:
        return storage.join_uri(self.prefix, "checkpoints")


def staging_for(staging_uri: str, kfp_run_id: str, task_name: str) -> Staging:
    """The :class:`Staging` of one task: ``{staging_uri or $REFINE_STAGING_URI}/{run id}/{task}``.

    Raises:
        ValueError: no staging location is configured (the message says where to set one).
    """
    base = staging_uri or os.environ.get(STAGING_ENV, "")
    if not base:
        raise ValueError(
            "a multi-GPU stage needs a staging location that the launcher and the TrainJob pods both reach: set "
            f"{STAGING_ENV} in the refine-config ConfigMap (manifests/base/config), e.g. s3://my-bucket/refine/"
            "staging, or pass staging_uri to the launcher component."
        )
    run = _safe(kfp_run_id) or uuid.uuid4().hex[:12]
    return Staging(storage.join_uri(base, run, _safe(task_name) or "task"))


def checkpoint_location(staging: Staging, checkpoint_root: str, kfp_run_id: str, task_name: str) -> str:
    """Where the trainers of this task keep their checkpoints (``checkpoint_uri``): ``{checkpoint_root}/{run id}/
    {task}``, or without a root the task's staging prefix (``{staging}/.../checkpoints``). Either way the same for
    every attempt of the task, so that a retry resumes."""
    if not checkpoint_root:
        return staging.checkpoints
    run = _safe(kfp_run_id) or staging.prefix.rstrip("/").rsplit("/", 2)[-2]
    return storage.join_uri(checkpoint_root, run, _safe(task_name) or "task")


# The config section of each data-parallel stage, whose ``resume`` the launcher sets.
RESUME_SECTIONS = {"train-ntp": "ntp", "train-refine": "refine"}


def trainer_settings(stage: str, checkpoint_uri: str, resume: bool) -> dict[str, Any]:
    """The dotted settings that make the trainers checkpoint to ``checkpoint_uri`` and, with ``resume``, continue
    from the newest complete checkpoint there (a first attempt finds none and starts at step 0).

    Raises:
        ValueError: a stage without a resumable training loop.
    """
    if stage not in RESUME_SECTIONS:
        raise ValueError(f"stage {stage!r} has no resumable training loop; use one of {', '.join(RESUME_SECTIONS)}.")
    return {"checkpoint_uri": checkpoint_uri, f"{RESUME_SECTIONS[stage]}.resume": bool(resume)}


def _safe(part: str) -> str:
    """A path component made of ``[A-Za-z0-9._-]`` (KFP task names may hold spaces and braces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-.")


def push_inputs(staging: Staging, data_dir: str | os.PathLike[str], base_model_dir: str | os.PathLike[str] | None
                ) -> dict[str, Any]:
    """Publish the task's input artifacts to ``staging``; returns the trainer's config settings that point at them.

    Returns:
        Dotted settings: ``data.prepared_dir``, ``export_uri``, ``output_dir`` and, with a base model,
        ``model.source`` (its own ``config.json`` and tokenizer then win, as in the single-pod components).
    """
    storage.publish_dir(data_dir, staging.data)
    settings: dict[str, Any] = {
        "data.prepared_dir": staging.data,
        "export_uri": staging.result,
        "output_dir": POD_OUTPUT_DIR,
    }
    if base_model_dir is not None:
        storage.publish_dir(base_model_dir, staging.base_model)
        settings.update({"model.source": staging.base_model, "model.tokenizer": None, "model.config": {}})
    logger.info("staged the inputs under %s", staging.prefix)
    return settings


def as_overrides(settings: Mapping[str, Any]) -> list[str]:
    """Dotted settings as ``key=value`` command-line overrides (values in YAML flow style, as the CLI reads them)."""
    import yaml

    out = []
    for key, value in settings.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
        out.append(f"{key}={text.removesuffix('...').strip()}")
    return out


def pull_result(staging: Staging, cache_dir: str | os.PathLike[str]) -> TrainResult:
    """The trainer's exported :class:`TrainResult`, with its model downloaded under ``cache_dir``."""
    return load_exported_result(staging.result, Path(cache_dir))


def clean_up(staging: Staging, checkpoint_uri: str | None, *, succeeded: bool, keep_staged: bool) -> list[str]:
    """Delete what the launcher staged for the job that just ended (module docstring); returns what was deleted.

    Failures to delete are logged, never raised: they must not hide the job's own outcome.
    """
    if keep_staged:
        logger.info("keep_staged: leaving %s and the checkpoints at %s in place", staging.prefix, checkpoint_uri)
        return []
    targets = [staging.data, staging.base_model, staging.result]
    if succeeded and checkpoint_uri:
        targets.append(checkpoint_uri)
    elif checkpoint_uri:
        logger.info("the job failed: keeping its checkpoints at %s for a retry to resume from", checkpoint_uri)
    deleted = []
    for uri in targets:
        try:
            if storage.delete_uri(uri):
                deleted.append(uri)
        except Exception as exc:  # noqa: BLE001 - botocore's and the file system's many errors alike
            logger.warning("could not delete staged %s (%s: %s); delete it by hand or by a lifecycle rule", uri,
                           type(exc).__name__, exc)
    logger.info("deleted the staged %s", ", ".join(deleted) if deleted else "nothing (none was there)")
    return deleted
