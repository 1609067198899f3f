"""Atomic, resumable training checkpoints.

Layout under ``root`` (``{output_dir}/{stage}/checkpoints``, see ``refine_core.training.session``)::

    root/
      step_00000050/
        state/, config.json, ...              # whatever ``write_fn`` wrote: training sessions write the model and
                                              # optimizer tensors with torch.distributed.checkpoint
                                              # (refine_core.training.sharded_state); older ones model.safetensors
        trainer_state.pt                      # optimizer param groups, scheduler, data position, RNG, step, ...
        COMPLETE                              # {"step": 50, "time": "..."}: written last; no marker = not a checkpoint
      step_00000100/ ...
      .tmp-step_00000150-<uuid>/              # being written (or left by a crash; removed by the next save)

A save writes everything into a ``.tmp-*`` directory, fsyncs it, renames it to ``step_{step:08d}`` and only then
writes ``COMPLETE``. A crash at any point leaves either no new directory, a ``.tmp-*`` directory or a ``step_*``
directory without the marker; :meth:`CheckpointManager.latest` ignores all three. When a step is saved again, the
old directory of that step is first renamed to ``.replaced-step_*-<uuid>`` (marker and all) and counts as complete
until the new one has its marker, so the root is never without a complete checkpoint.

With ``ranks`` (an FSDP run), every rank writes its part into the same temporary directory and rank 0 alone writes
``trainer_state.pt``, renames and marks it (:meth:`CheckpointManager.save`).

**Where checkpoints live** (``RunConfig.checkpoint_uri``, :func:`open_checkpoints`): by default under
``output_dir``; with a directory (a mounted volume) they are written there directly, as ``{dir}/{stage}/step_*``;
with an ``s3://`` prefix they are written under ``output_dir`` as above and each committed one is then uploaded to
``{prefix}/{stage}/step_*``, its marker last (:mod:`refine_core.training.checkpoint_mirror`). A resumed run whose
local root holds nothing as new as the newest uploaded checkpoint downloads that one first, so a retried or
pre-empted pod, which starts with an empty ``output_dir``, resumes where the last one stopped.

``trainer_state.pt`` holds only what ``torch.load(..., weights_only=True)`` accepts (tensors, dicts, lists, tuples,
numbers, str, None); :meth:`CheckpointManager.save` checks that before writing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from refine_core.errors import RunFailed
from refine_core.training.checkpoint_mirror import S3CheckpointMirror

if TYPE_CHECKING:
    from refine_core.config import RunConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_REPLACED_DIR = re.compile(r"^\.replaced-step_(\d{8,})-[0-9a-f]+$")
_TMP_PREFIX = ".tmp-"
# The DCP files rank r writes itself (torch.distributed.checkpoint.FileSystemWriter names them __<rank>_<n>.distcp).
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
# Types ``torch.load(weights_only=True)`` reads back without extra allow-listing.
_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


class RankGroup(Protocol):
    """The ranks that save one checkpoint together (``refine_core.distributed.ReplicaSync`` is one)."""

    @property
    def is_main(self) -> bool: ...

    @property
    def distributed(self) -> bool: ...

    def barrier(self) -> None: ...

    def broadcast_object(self, obj: T) -> T: ...


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or holds something that cannot be saved safely."""


class CheckpointWriteError(RunFailed):
    """Writing a checkpoint failed (disk full, I/O error): the run stops; the previous checkpoints are untouched."""


class UploadError(CheckpointWriteError):
    """A rank could not upload its part of a checkpoint to the mirror; the save failed on every rank."""


def _shard_files(directory: Path, rank: int) -> list[str]:
    """The DCP shard files ``rank`` wrote under ``directory`` (relative paths), e.g. ``state/__3_0.distcp``."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and (m := _SHARD_FILE.match(p.name)) and int(m.group(1)) == rank)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files). Directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    _fsync_file(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise if ``obj`` holds something ``torch.load(weights_only=True)`` would refuse.

    Types are matched exactly: subclasses such as ``numpy.float64`` (a ``float``), ``defaultdict`` or named tuples
    pickle as their own class and are refused at load time.
    """
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys.")
            _check_weights_only(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) cannot "
        "read back; store it as tensors, lists, dicts, numbers or strings (e.g. runtime.capture_rng_state() for RNG "
        "state, .tolist() / torch.from_numpy() for numpy values)."
    )


def write_directory_atomically(target: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Write a directory (e.g. the exported ``model/``) next to ``target``, then swap it in by renames.

    Readers see the old complete directory or the new complete one, never a half-written one; a failure while
    writing leaves the old one untouched and no temporary directory behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        write_fn(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


class CheckpointManager:
    """Writes, finds and prunes checkpoints under ``root``; one writer per ``root`` at a time.

    Args:
        root: the checkpoint directory (created on the first save).
        keep: how many complete checkpoints to keep (>= 1); older ones are deleted after each save.
        mirror: also upload every committed checkpoint there, and prune it to ``keep`` as well (module docstring).
    """

    def __init__(self, root: str | Path, keep: int, mirror: S3CheckpointMirror | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept; set ntp.keep_checkpoints >= 1.")
        self.root = Path(root)
        self.keep = keep
        self.mirror = mirror

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        """Whether ``path`` is a checkpoint directory whose ``COMPLETE`` marker was written."""
        return (Path(path) / MARKER).is_file()

    def _complete_by_step(self) -> dict[int, Path]:
        """Complete checkpoints by step; a ``.replaced-*`` copy stands in only while its step has no complete dir."""
        found: dict[int, Path] = {}
        replaced: dict[int, Path] = {}
        if not self.root.is_dir():
            return found
        for child in self.root.iterdir():
            if not child.is_dir() or not self.is_complete(child):
                continue
            if match := _STEP_DIR.match(child.name):
                found[int(match.group(1))] = child
            elif match := _REPLACED_DIR.match(child.name):
                replaced[int(match.group(1))] = child
        for step, path in replaced.items():
            found.setdefault(step, path)
        return found

    def list_complete(self) -> list[Path]:
        """Complete checkpoints, oldest step first."""
        by_step = self._complete_by_step()
        return [by_step[step] for step in sorted(by_step)]

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or ``None`` if there is none."""
        complete = self.list_complete()
        return complete[-1] if complete else None

    def save(
        self,
        step: int,
        write_fn: Callable[[Path], None],
        trainer_state: dict[str, Any],
        ranks: RankGroup | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones.

        Args:
            step: the optimizer step the state corresponds to (>= 0).
            write_fn: called with an empty directory; writes the model (and optimizer) state into it.
            trainer_state: optimizer/scheduler state dicts, data position, RNG state, ... (weights_only-loadable).
                ``step`` is added; if present it must equal ``step``.
            ranks: the ranks of a data-parallel run (``session.sync``), when every rank writes its own shards.
                Then every rank calls ``save``: rank 0 creates the temporary directory and tells the others its
                name, all ranks run ``write_fn`` into it (e.g. one ``torch.distributed.checkpoint.save``), and after
                a barrier rank 0 alone writes ``trainer_state`` and commits (rename, then the marker). Only rank 0's
                ``trainer_state`` is used. ``None`` (or one rank): this process writes everything.

        Returns:
            The final checkpoint directory ``root/step_{step:08d}``.
        """
        if ranks is not None and ranks.distributed:
            return self._save_ranks(step, write_fn, trainer_state, ranks)
        upload = self._mirror_begin(step)
        state, final, tmp = self._begin(step, trainer_state)
        self._run_write_fn(step, write_fn, tmp)
        final = self._commit(step, state, final, tmp)
        if upload:
            self._mirror_upload(final, step, files=None)
        return final

    # -- the mirror (RunConfig.checkpoint_uri = s3://...) -----------------------------------------------------------
    def _mirror_begin(self, step: int) -> bool:
        """Whether this save is to be uploaded; clears what an interrupted earlier upload of ``step`` left.

        A step already complete in the mirror is not uploaded again: saving the same step twice happens only when a
        run resumed at its last step finishes (the state is the one just downloaded), and re-uploading would first
        have to un-commit the only remote copy.
        """
        if self.mirror is None:
            return False
        if self.mirror.is_complete(step):
            logger.info("checkpoint step %d is already complete in %s; not uploading it again", step, self.mirror.uri)
            return False
        self.mirror.clear_step(step)
        return True

    def _mirror_upload(self, directory: Path, step: int, files: list[str] | None) -> None:
        """Upload ``files`` of ``directory`` (``None``: all), the marker last, then prune the mirror to ``keep``."""
        assert self.mirror is not None
        self.mirror.upload(directory, step, files=files, marker=True)
        self.mirror.prune(self.keep, keep_also=step)

    def fetch_from_mirror(self) -> Path | None:
        """Download the newest complete mirrored checkpoint when the local root has nothing as new; its path.

        ``None``: no mirror, nothing mirrored, or a local checkpoint is at least as new (it is used as is).
        """
        if self.mirror is None:
            return None
        remote = self.mirror.complete_steps()
        local = self.latest()
        local_step = int(_STEP_DIR.match(local.name).group(1)) if local is not None and _STEP_DIR.match(local.name) \
            else -1
        if not remote or remote[-1] <= local_step:
            if remote:
                logger.info("the local checkpoint %s is as new as the mirror's newest (step %d)", local, remote[-1])
            return None
        path = self.mirror.download(remote[-1], self.root)
        logger.info("resuming from mirrored checkpoint step %d of %s (downloaded to %s)", remote[-1], self.mirror.uri,
                    path)
        return path

    def _begin(self, step: int, trainer_state: dict[str, Any]) -> tuple[dict[str, Any], Path, Path]:
        """Check the state, then create the temporary directory: (state with ``step``, final dir, tmp dir)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if trainer_state.get("step", step) != step:
            raise CheckpointError(f"trainer_state['step']={trainer_state['step']} disagrees with step={step}")
        state = {**trainer_state, "step": step}
        _check_weights_only(state, "trainer_state")
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover_replaced()
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        return state, final, tmp

    def _write_error(self, step: int, exc: OSError) -> CheckpointWriteError:
        previous = self.latest()
        return CheckpointWriteError(
            f"writing checkpoint step {step} under {self.root} failed ({exc.strerror or exc}); "
            + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
            + ". Free space (or fix the volume), then run again with resume=true in the stage's section."
        )

    def _run_write_fn(self, step: int, write_fn: Callable[[Path], None], tmp: Path) -> None:
        try:
            write_fn(tmp)
        except OSError as exc:  # disk full, I/O error: nothing of this save remains, the older ones are untouched
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(step, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, step: int, state: dict[str, Any], final: Path, tmp: Path) -> Path:
        """Write ``trainer_state``, fsync, rename ``tmp`` to ``final``, write the marker, prune."""
        try:
            if (tmp / TRAINER_STATE).exists() or (tmp / MARKER).exists():
                raise CheckpointError(f"write_fn wrote {TRAINER_STATE} or {MARKER}; those names are reserved.")
            torch.save(state, tmp / TRAINER_STATE)
            _fsync_tree(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(step, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        replaced = None
        if final.exists():
            if self.is_complete(final):
                # Park the old copy under a name latest() still trusts until the new one is marked complete.
                replaced = self.root / f".replaced-{final.name}-{uuid.uuid4().hex}"
                os.replace(final, replaced)
            else:
                shutil.rmtree(final)  # a crash left it without its marker: it was never a checkpoint
            _fsync_dir(self.root)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._write_marker(final, step)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
        self._prune(keep_also=final)
        return final

    def _save_ranks(
        self, step: int, write_fn: Callable[[Path], None], trainer_state: dict[str, Any], ranks: RankGroup
    ) -> Path:
        """:meth:`save` with every rank writing into one temporary directory (see ``ranks`` there).

        Failures are told to every rank (through a broadcast, or by the collective ``write_fn`` itself), so no rank
        waits forever for one that gave up. A crash anywhere leaves at most a ``.tmp-*`` directory, which
        :meth:`latest` never trusts and the next save removes.

        After the write, every rank reports the shard files it wrote (``state/__<rank>_<n>.distcp``); with a mirror
        it first uploads them itself. Rank 0 then commits: locally when it sees every rank's files (storage all
        ranks share), else — node-local storage on several nodes — only in the mirror (the rest of the checkpoint
        and the marker from here; the partial local copies are removed), and without a mirror it refuses, since
        the checkpoint would be incomplete.
        """
        failure: BaseException | None = None
        tmp_name, begin_error, upload = None, None, False
        state: dict[str, Any] = {}
        final = self.root / step_dir_name(step)
        if ranks.is_main:
            try:
                upload = self._mirror_begin(step)
                state, final, tmp = self._begin(step, trainer_state)
                tmp_name = tmp.name
            except BaseException as exc:  # told to the other ranks, then raised here
                failure, begin_error = exc, f"{type(exc).__name__}: {exc}"
        tmp_name, begin_error, upload = ranks.broadcast_object((tmp_name, begin_error, upload))
        if failure is not None:
            raise failure
        if begin_error is not None:
            raise CheckpointError(f"rank 0 could not start checkpoint step {step}: {begin_error}")
        tmp = self.root / tmp_name
        if ranks.is_main:
            self._run_write_fn(step, write_fn, tmp)
        else:
            write_fn(tmp)  # rank 0 removes the directory if this fails (the collective write fails there too)
        ranks.barrier()  # every rank's shards are written (and fsynced by the writer) before rank 0 commits
        rank = dist.get_rank()
        own = _shard_files(tmp, rank)
        upload_error = None
        if upload and not ranks.is_main:
            try:
                assert self.mirror is not None
                self.mirror.upload(tmp, step, files=own, marker=False)
            except Exception as exc:  # reported to rank 0, which fails the save on every rank
                upload_error = f"rank {rank}: {type(exc).__name__}: {exc}"
        reports: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (own, upload_error))  # also the barrier after the ranks' own uploads
        commit_error = None
        if ranks.is_main:
            try:
                self._commit_ranks(step, state, final, tmp, reports, upload)
            except BaseException as exc:
                failure, commit_error = exc, f"{type(exc).__name__}: {exc}"
        commit_error = ranks.broadcast_object(commit_error)
        if not ranks.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # this node's part of a checkpoint committed elsewhere
        if failure is not None:
            raise failure
        if commit_error is not None:
            raise CheckpointWriteError(f"rank 0 could not commit checkpoint step {step}: {commit_error}")
        return final

    def _commit_ranks(self, step: int, state: dict[str, Any], final: Path, tmp: Path,
                      reports: list[tuple[list[str], str | None]], upload: bool) -> None:
        """Rank 0's half of :meth:`_save_ranks` once every rank has written (and uploaded) its shards."""
        errors = [error for _, error in reports if error]
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UploadError(f"uploading checkpoint step {step} failed on {errors[0]}")
        others = {rel for rank, (files, _) in enumerate(reports) if rank != 0 for rel in files}
        missing = sorted(rel for rel in others if not (tmp / rel).is_file())
        if missing and self.mirror is None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(
                f"checkpoint step {step}: rank 0 does not see the shard files other ranks wrote "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) under {self.root}: the ranks' "
                "output_dir is not on storage they share. With parallel=fsdp on several nodes set checkpoint_uri to "
                "an s3:// prefix (each rank uploads its own shards) or to a directory on a volume every node mounts."
            )

        def rest(directory: Path) -> list[str]:
            """Everything of the checkpoint but the marker and the other ranks' shards (they uploaded those)."""
            return sorted(rel for p in directory.rglob("*")
                          if p.is_file() and p.name != MARKER and (rel := p.relative_to(directory).as_posix()) not in
                          others)

        if not missing:
            self._commit(step, state, final, tmp)
            if upload:
                self._mirror_upload(final, step, files=rest(final))
            return
        # Node-local storage: the whole checkpoint exists only in the mirror.
        if not upload:  # already complete there (see _mirror_begin): nothing to add
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            torch.save(state, tmp / TRAINER_STATE)
            self._write_marker(tmp, step)
            self._mirror_upload(tmp, step, files=rest(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("checkpoint step %d is complete in %s only (this node does not hold the other nodes' shards)",
                    step, self.mirror.uri if self.mirror else "")

    @staticmethod
    def _write_marker(directory: Path, step: int) -> None:
        marker_tmp = directory / f"{MARKER}.tmp"
        marker_tmp.write_text(
            json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time()})
        )
        _fsync_file(marker_tmp)
        os.replace(marker_tmp, directory / MARKER)
        _fsync_dir(directory)

    def _recover_replaced(self) -> None:
        """After a crash mid-replacement, move a parked complete copy back where its step directory belongs."""
        for child in list(self.root.iterdir()):
            match = _REPLACED_DIR.match(child.name)
            if not match or not child.is_dir():
                continue
            final = self.root / step_dir_name(int(match.group(1)))
            if self.is_complete(final) or not self.is_complete(child):
                shutil.rmtree(child, ignore_errors=True)
                continue
            if final.exists():
                shutil.rmtree(final)
            os.replace(child, final)
            _fsync_dir(self.root)
            logger.warning("recovered checkpoint %s from an interrupted replacement", final)

    def _prune(self, keep_also: Path) -> None:
        """Delete complete checkpoints beyond the newest ``keep``, incomplete ``step_*`` dirs and ``.tmp-*`` dirs."""
        complete = self.list_complete()
        keep = set(complete[-self.keep :]) | {keep_also}
        for path in complete:
            if path not in keep:
                logger.info("pruning checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)
        for child in self.root.iterdir():
            stale_tmp = child.name.startswith(_TMP_PREFIX)
            incomplete = bool(_STEP_DIR.match(child.name)) and not self.is_complete(child)
            if child.is_dir() and (stale_tmp or incomplete):
                logger.info("removing leftover %s", child)
                shutil.rmtree(child, ignore_errors=True)

    @staticmethod
    def load_trainer_state(path: str | Path) -> dict[str, Any]:
        """Read ``trainer_state.pt`` of a complete checkpoint with ``weights_only=True`` onto the CPU.

        Args:
            path: a checkpoint directory (e.g. from :meth:`latest`).

        Returns:
            The dict passed to :meth:`save`, plus ``step``.
        """
        path = Path(path)
        if not CheckpointManager.is_complete(path):
            raise CheckpointError(
                f"{path} has no {MARKER} marker, so it is not a complete checkpoint (an interrupted save, or not a "
                "checkpoint directory); resume from CheckpointManager(root, keep).latest() instead."
            )
        state = torch.load(path / TRAINER_STATE, weights_only=True, map_location="cpu")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path / TRAINER_STATE} holds a {type(state).__name__}, expected a dict")
        return state


def open_checkpoints(cfg: RunConfig, stage: str, keep: int, *, resume: bool, section: str) -> CheckpointManager:
    """The :class:`CheckpointManager` of ``stage`` where ``cfg.checkpoint_uri`` says (module docstring).

    Every rank of a torchrun job calls this (after the process group is up). With ``resume`` and an ``s3://``
    location, one rank per node (``LOCAL_RANK`` 0) first downloads the newest mirrored checkpoint when its local root
    holds none as new; without ``resume`` rank 0 makes sure the location holds no earlier run's checkpoints (as
    :func:`refine_core.training.run_identity.claim_stage_dir` does for ``output_dir``): it refuses them, or with
    ``overwrite=true`` deletes them.

    Args:
        cfg: the run config (``checkpoint_uri``, ``output_dir``, ``overwrite``).
        stage: the stage directory name (``train-ntp``, ``post-train-nested_sft``, ...).
        keep: checkpoints to keep (the section's ``keep_checkpoints``).
        resume: whether the run resumes (the section's ``resume`` is true or ``force``).
        section: the config section, for messages (``ntp``, ``refine``, ``post``).
    """
    from refine_core import storage
    from refine_core.config import ConfigError

    local_root = cfg.stage_dir(stage) / "checkpoints"
    uri = cfg.checkpoint_uri
    if uri is None:
        return CheckpointManager(local_root, keep)
    if storage.is_s3_uri(uri):
        manager = CheckpointManager(local_root, keep, mirror=S3CheckpointMirror(storage.join_uri(uri, stage)))
        where = manager.mirror.uri if manager.mirror else uri
    else:
        manager = CheckpointManager(Path(os.path.expanduser(uri)) / stage, keep)
        where = str(manager.root)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    error = None
    try:
        if not resume and rank == 0:
            if manager.mirror is not None:
                stored = manager.mirror.has_any()
            else:
                stored = manager.root.is_dir() and any(manager.root.iterdir())
            if stored and not cfg.overwrite:
                raise ConfigError(
                    f"{where} already holds checkpoints of an earlier run; a fresh run does not mix with them. "
                    f"Continue that run with {section}.resume=true, set another checkpoint_uri, or set overwrite=true "
                    "to delete them first."
                )
            if stored:
                logger.warning("overwrite=true: deleting the checkpoints of an earlier run under %s", where)
                if manager.mirror:
                    manager.mirror.delete_all()
                else:
                    shutil.rmtree(manager.root)
        if resume and local_rank == 0:
            manager.fetch_from_mirror()
    except Exception as exc:  # told to every rank below, so that none waits for this one
        error = exc
    if distributed:
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        if error is None and (first := next((e for e in errors if e), None)):
            raise CheckpointError(f"another rank could not open the checkpoints under {where}: {first}")
    if error is not None:
        raise error
    return manager
