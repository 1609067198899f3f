"""Hand a KFP task's inputs to the pods of a ``TrainJob`` and take their model back.

The launcher component runs in a small pod of its own; the trainer pods of the TrainJob cannot see its KFP artifact
paths. Both reach one *staging* location: an ``s3://`` prefix (credentials from the ``refine-data-s3-credentials``
Secret) or a directory on a volume that both mount. Per KFP run and task it holds::

    {staging}/{kfp run id}/{task}/data/          the prepared shards  -> data.prepared_dir of the trainer
    {staging}/{kfp run id}/{task}/base-model/    the model to start from, when the task has one -> model.source
    {staging}/{kfp run id}/{task}/result/        model/ + result.json, written by the trainer's rank 0 (export_uri)

The trainer's stage downloads ``data/`` (:func:`refine_core.training.setup.localize_inputs`), trains, and publishes
its final model with :func:`refine_core.training.result.export_result`; the launcher reads it back with
:func:`pull_result` once the job has completed. The staging location is the launcher's ``staging_uri`` parameter,
else ``$REFINE_STAGING_URI`` (the ``refine-config`` ConfigMap, ``manifests/base/config``). Nothing is deleted: an
object-store lifecycle rule is the right tool for that, and a failed run's staged inputs help to debug it.
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
# Where the trainer pods keep their checkpoints: the refine-torch runtime mounts an emptyDir on /tmp.
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
