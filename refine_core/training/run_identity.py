"""Which run a checkpoint belongs to, so that a run never resumes, prunes or exports another run's work.

Every checkpoint's trainer state carries :func:`run_identity`: a hash of the settings that define what is being
trained (model, data, seed, precision and the stage's own sections, without the keys that only steer a run:
``steps``, ``resume``, logging, evaluation and checkpoint cadence, paths), the data fingerprint and the code version.

* **Resume** (:func:`check_resume`): a checkpoint of another run (different settings or data, or written before
  checkpoints carried an identity) is refused with both identities named, unless ``resume: force``.
* **A fresh run** (:func:`claim_stage_dir`) refuses a stage directory that already holds checkpoints or an exported
  model, unless ``overwrite: true``, which clears them first; so a fresh run never prunes checkpoints it did not
  write and never leaves an earlier run's ``model/`` beside its own ``config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from refine_core.config import ConfigError, RunConfig, to_dict
from refine_core.runtime import git_commit

logger = logging.getLogger(__name__)

# Keys of a training section that steer the run but do not change what it trains.
_STEERING = {
    "steps", "resume", "stop_after", "log_every", "eval_every", "eval_max_docs", "save_every", "keep_checkpoints",
    "max_skipped_steps",
}


def _code_version() -> str:
    try:
        from importlib.metadata import version

        package = version("refine-core")
    except Exception:  # not installed as a package (a bare checkout on the path)
        package = "unknown"
    return f"{package}+{git_commit() or 'nogit'}"


def run_identity(cfg: RunConfig, sections: tuple[str, ...], data_fingerprint: str | None) -> dict[str, str]:
    """``{"config_hash", "data_fingerprint", "code_version"}`` of a stage training on ``sections`` of ``cfg``."""
    tree = to_dict(cfg)
    model = {k: v for k, v in tree["model"].items() if k != "cache_dir"}
    data = {k: v for k, v in tree["data"].items() if k != "prepared_dir"}
    defining: dict[str, Any] = {"seed": tree["seed"], "precision": tree["precision"], "model": model, "data": data}
    for name in sections:
        defining[name] = {k: v for k, v in tree[name].items() if k not in _STEERING}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config_hash": digest, "data_fingerprint": data_fingerprint or "", "code_version": _code_version()}


def _describe(identity: dict[str, str] | None) -> str:
    if not identity:
        return "no run identity (written by an older refine_core)"
    return f"config {identity.get('config_hash')}, data {identity.get('data_fingerprint') or '-'}"


def check_resume(
    checkpoint: Path, stored: dict[str, str] | None, ours: dict[str, str], section: str, force: bool
) -> None:
    """Refuse to resume from ``checkpoint`` when it was written by another run (unless ``force``)."""
    same = bool(stored) and all(stored.get(k) == ours[k] for k in ("config_hash", "data_fingerprint"))
    if same:
        return
    message = (
        f"{checkpoint} belongs to another run ({_describe(stored)}; this run: {_describe(ours)}): a changed setting "
        "or data set"
    )
    if force:
        logger.warning("%s; resuming from it anyway (%s.resume=force)", message, section)
        return
    raise ConfigError(
        f"{message}. Use a new output_dir for this run, or set {section}.resume=force to continue from that "
        "checkpoint anyway."
    )


def claim_stage_dir(stage_dir: Path, section: str, overwrite: bool) -> None:
    """Make sure a fresh run (not resuming) starts from a stage directory with no earlier checkpoints or model."""
    found = [p for p in (stage_dir / "checkpoints", stage_dir / "model") if p.exists() and any(p.iterdir())]
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{stage_dir} already holds {' and '.join(str(p) for p in found)} from an earlier run; a fresh run does "
            f"not mix with them. Continue that run with {section}.resume=true, choose another output_dir, or set "
            "overwrite=true to delete them first."
        )
    for path in found:
        logger.warning("overwrite=true: deleting %s of an earlier run", path)
        shutil.rmtree(path)
