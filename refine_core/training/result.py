"""What a training stage hands to the next one, and how it travels between machines.

:class:`TrainResult` is the return value of ``train_ntp``, ``train_refine`` and ``post_train``. When a stage runs
in other pods than the one that asked for it (a Kubeflow Trainer ``TrainJob`` started by the launcher component),
rank 0 publishes it with :func:`export_result` to ``cfg.export_uri`` and the launcher reads it back with
:func:`load_exported_result`::

    {export_uri}/model/        the final model in HF layout (config.json, model.safetensors, tokenizer)
    {export_uri}/result.json   steps, final held-out loss, the per-step history; written last

``result.json`` is written after every model file, so its presence means the export is complete: a reader never
takes a half-uploaded model for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refine_core import storage

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
MODEL_DIR = "model"
_FORMAT = 1


@dataclass
class TrainResult:
    """What a training stage hands to the next one."""

    model_dir: Path  # final model in HF layout (config.json + model.safetensors + tokenizer)
    steps: int
    final_eval_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def export_result(result: TrainResult, uri: str, stage: str = "") -> str:
    """Publish ``result`` to ``uri`` (an ``s3://`` prefix or a directory): the model first, ``result.json`` last.

    Returns:
        ``uri``.
    """
    storage.publish_dir(result.model_dir, storage.join_uri(uri, MODEL_DIR))
    summary: dict[str, Any] = {
        "format": _FORMAT,
        "stage": stage,
        "steps": result.steps,
        "final_eval_loss": result.final_eval_loss,
        "history": result.history,
    }
    with tempfile.TemporaryDirectory(prefix="refine-export-") as tmp:
        path = Path(tmp) / RESULT_FILE
        path.write_text(json.dumps(summary, indent=1))
        storage.publish_file(path, storage.join_uri(uri, RESULT_FILE))
    logger.info("exported the final model and result of %s to %s", stage or "the stage", uri)
    return uri


def load_exported_result(uri: str, cache_dir: str | os.PathLike[str]) -> TrainResult:
    """The :class:`TrainResult` that :func:`export_result` published at ``uri``, its model made local.

    Args:
        uri: the ``export_uri`` the stage ran with.
        cache_dir: where ``s3://`` objects are downloaded (a local ``uri`` is used in place).

    Raises:
        FileNotFoundError: no complete export at ``uri`` (the stage did not finish, or wrote elsewhere).
    """
    try:
        summary_path = storage.resolve(storage.join_uri(uri, RESULT_FILE), cache_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no {RESULT_FILE} under {uri}: the training stage did not complete its export there (did it run with "
            f"export_uri={uri}, and did it reach its last step?)"
        ) from exc
    summary = json.loads(Path(summary_path).read_text())
    if summary.get("format") != _FORMAT:
        raise ValueError(f"{uri}/{RESULT_FILE} has format {summary.get('format')!r}; this code reads {_FORMAT}.")
    model_dir = storage.resolve(storage.join_uri(uri, MODEL_DIR), cache_dir)
    loss = summary.get("final_eval_loss")
    return TrainResult(
        model_dir=Path(model_dir),
        steps=int(summary["steps"]),
        final_eval_loss=None if loss is None else float(loss),
        history=[{k: float(v) for k, v in row.items()} for row in summary.get("history", [])],
    )
