"""A copy of a stage's checkpoints under an ``s3://`` prefix, so that they outlive the pod that wrote them.

Layout and protocol, mirroring the local one of :mod:`refine_core.training.checkpoint`::

    s3://bucket/prefix/                      # RunConfig.checkpoint_uri + "/{stage}"
      step_00000050/state/.metadata, state/__0_0.distcp, ..., trainer_state.pt, config.json, ...
      step_00000050/COMPLETE                 # uploaded LAST: a step directory without it is not a checkpoint

* **Upload** (:meth:`S3CheckpointMirror.upload`) happens after the local atomic commit: every file but the marker,
  then, once those are all stored, the marker. S3 has no rename, so the marker is the commit: a crash mid-upload
  leaves a step directory without ``COMPLETE``, which :meth:`~S3CheckpointMirror.complete_steps` ignores and the
  next prune removes. Under FSDP each rank uploads its own DCP shard files (``state/__<rank>_<n>.distcp``) and rank 0
  the rest and, after a barrier, the marker (:meth:`refine_core.training.checkpoint.CheckpointManager.save`).
* **Download** (:meth:`S3CheckpointMirror.download`): every file of a complete step, marker included, goes into a
  ``.tmp-*`` directory under the local checkpoint root, which one rename then makes ``step_*`` (a local reader sees
  all of it or nothing); of concurrent downloads of the same step (nodes sharing ``output_dir``) the first rename
  wins.
* **Pruning** (:meth:`S3CheckpointMirror.prune`) keeps the newest ``keep`` complete steps, like the local pruning;
  a pruned step loses its marker first, so it is never seen complete with files missing.

Transfers go through :mod:`refine_core.storage` (boto3; endpoint and credentials from the environment).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from refine_core import storage
from refine_core.errors import RunFailed

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"  # the same name as refine_core.training.checkpoint.MARKER (that module imports this one)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


class MirrorUnavailable(RunFailed):
    """The checkpoint prefix cannot be listed or read (bucket, endpoint or credentials): the run stops in one line."""


class S3CheckpointMirror:
    """The checkpoints of one stage under ``uri`` (``s3://bucket/prefix``); see the module docstring.

    Args:
        uri: the stage's prefix, ``{checkpoint_uri}/{stage}``.
    """

    def __init__(self, uri: str) -> None:
        storage.split_s3_uri(uri)  # refuses anything but s3://bucket/...
        self.uri = uri.rstrip("/")

    def __repr__(self) -> str:
        return f"S3CheckpointMirror({self.uri!r})"

    def step_uri(self, step: int) -> str:
        return storage.join_uri(self.uri, _step_name(step))

    def _listing(self) -> dict[int, set[str]]:
        """``{step: {relative path in its directory}}`` of every ``step_*`` directory under the prefix."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            listed = storage.list_prefix(self.uri)
        except (BotoCoreError, ClientError) as exc:
            raise MirrorUnavailable(
                f"cannot list the checkpoints under {self.uri} ({storage._s3_reason(exc)}); check the bucket, the "
                "endpoint (AWS_ENDPOINT_URL) and the credentials, or set checkpoint_uri to a mounted directory"
            ) from exc
        steps: dict[int, set[str]] = {}
        for rel in listed:
            head, _, rest = rel.partition("/")
            match = _STEP_DIR.match(head)
            if match and rest:
                steps.setdefault(int(match.group(1)), set()).add(rest)
        return steps

    def complete_steps(self) -> list[int]:
        """Steps whose ``COMPLETE`` marker was uploaded, oldest first."""
        return sorted(step for step, files in self._listing().items() if MARKER in files)

    def is_complete(self, step: int) -> bool:
        return step in self.complete_steps()

    def has_any(self) -> bool:
        """Whether any checkpoint (complete or not) is stored under the prefix."""
        return bool(self._listing())

    def upload(self, local_dir: Path, step: int, files: Sequence[str] | None = None, marker: bool = True) -> None:
        """Upload ``files`` (relative to ``local_dir``; ``None``: every file but the marker), then the marker.

        Args:
            local_dir: the local step directory (or the temporary directory of a save in progress).
            step: the step the files belong to.
            files: which files; ``None``: all of them except ``COMPLETE``.
            marker: upload ``local_dir/COMPLETE`` after the files, which commits the checkpoint remotely.
        """
        local_dir = Path(local_dir)
        if files is None:
            files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                           if p.is_file() and p.name != MARKER)
        target = self.step_uri(step)
        storage.upload_files([(local_dir / rel, storage.join_uri(target, rel)) for rel in files])
        if marker:
            # Only now, with every other object stored, does the step count as a checkpoint (module docstring).
            storage.upload_files([(local_dir / MARKER, storage.join_uri(target, MARKER))])
            logger.info("mirrored checkpoint %s to %s", _step_name(step), target)

    def clear_step(self, step: int) -> None:
        """Remove whatever an earlier, interrupted upload left under ``step`` (marker first)."""
        files = self._listing().get(step, set())
        if files:
            ordered = ([MARKER] if MARKER in files else []) + sorted(files - {MARKER})
            storage.delete_objects(self.step_uri(step), ordered)

    def download(self, step: int, root: Path) -> Path:
        """Copy complete checkpoint ``step`` into ``root/step_*`` (atomically, marker last); returns that directory.

        Raises:
            ValueError: ``step`` is not complete in the mirror.
        """
        if not self.is_complete(step):
            raise ValueError(f"{self.step_uri(step)} is not a complete checkpoint (no {MARKER} marker)")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / _step_name(step)
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex}"
        logger.info("downloading checkpoint %s from %s", final.name, self.step_uri(step))
        try:
            storage.download_prefix(self.step_uri(step), tmp)
            json.loads((tmp / MARKER).read_text())  # our markers are JSON; anything else is not a checkpoint of ours
            # The directory is whole (marker included) before the rename, and the rename is the commit: it fails if
            # another process (a node sharing output_dir) renamed its copy first, and then that copy is kept.
            for _attempt in range(2):
                try:
                    os.rename(tmp, final)
                    return final
                except OSError:
                    if (final / MARKER).is_file():
                        shutil.rmtree(tmp)
                        return final
                    shutil.rmtree(final)  # left by a crash between a save's rename and its marker: no checkpoint
            raise OSError(f"could not move the downloaded checkpoint into {final}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def prune(self, keep: int, keep_also: int | None = None) -> None:
        """Delete complete steps beyond the newest ``keep`` (never ``keep_also``) and incomplete ones older than the
        newest complete step (leftovers of interrupted uploads; one writer per prefix at a time)."""
        listing = self._listing()
        complete = sorted(step for step, files in listing.items() if MARKER in files)
        kept = set(complete[-keep:]) | ({keep_also} if keep_also is not None else set())
        newest = complete[-1] if complete else None
        for step, files in sorted(listing.items()):
            stale = step not in kept if MARKER in files else (newest is not None and step < newest)
            if stale:
                logger.info("pruning mirrored checkpoint %s", self.step_uri(step))
                ordered = ([MARKER] if MARKER in files else []) + sorted(files - {MARKER})
                storage.delete_objects(self.step_uri(step), ordered)

    def delete_all(self) -> int:
        """Delete everything under the prefix (a fresh run with ``overwrite=true``); returns the object count."""
        return storage.delete_uri(self.uri)

