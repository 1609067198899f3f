"""The model and optimizer state of a checkpoint, through ``torch.distributed.checkpoint`` (DCP), resharding on load.

Inside a checkpoint directory (:mod:`refine_core.training.checkpoint`)::

    step_00000050/
      state/.metadata, state/__0_0.distcp, state/__1_0.distcp, ...   # DCP: model weights + optimizer tensors
      config.json                                                    # the model's architecture, for people
      trainer_state.pt                                               # + the optimizer's param_groups
      COMPLETE

Every rank writes its own part: FSDP its shards, DDP and one process the whole model (DCP writes a replicated
tensor once, from one rank). The state dicts come from ``get_state_dict`` (``torch.distributed.checkpoint.
state_dict``), which names everything by parameter FQN (``model.layers.0.attn.q_proj.weight``) whatever the wrapper,
so a checkpoint written by ``W`` ranks with DDP or FSDP loads with any other number of ranks and either wrapper:
``dcp.load`` reads, for each tensor of *this* run's state dict, the slices of the saved chunks that overlap it.

Only tensors go into DCP. The optimizer's ``param_groups`` (learning rates, betas, parameter FQNs) are plain values
and go into ``trainer_state.pt`` (read with ``weights_only=True``). The reason is safety: DCP's own reader
unpickles ``.metadata`` with a plain ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``
(torch 2.13, ``FileSystemReader.read_metadata`` / ``DefaultLoadPlanner.load_bytes``), either of which runs whatever
a crafted file asks for. We read ``.metadata`` with an unpickler that allows only DCP's metadata classes, torch's
``Size`` / dtypes / layouts and paths (:class:`SafeFileSystemReader`) and refuse non-tensor entries
(:class:`TensorOnlyLoadPlanner`); the tensor files themselves are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_DIR = "state"

# What a DCP ``.metadata`` pickle may name (torch 2.13 writes exactly these; anything else is refused).
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never holds; refusing to load it"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a ``.metadata`` unpickler restricted to DCP's own classes (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Same steps as FileSystemReader.read_metadata (torch 2.13), except the unpickler.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses the non-tensor entries that ``DefaultLoadPlanner`` would ``torch.load(weights_only=False)``."""

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise pickle.UnpicklingError(
            f"checkpoint entry {read_item.dest_index.fqn} is a pickled object, not a tensor; refusing to load it"
        )


def _no_dist() -> bool:
    """One process without a process group (said explicitly: DCP otherwise warns that it assumes so)."""
    return not (dist.is_available() and dist.is_initialized())


def _check_tensors(tree: Any, where: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _check_tensors(value, f"{where}.{key}")
    elif not isinstance(tree, torch.Tensor):
        raise TypeError(f"{where} is a {type(tree).__name__}; only tensors go into the sharded checkpoint state")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This rank's tensors to save (``{"model": ..., "optim": ...}``) and the optimizer's ``param_groups``.

    The ``param_groups`` are plain values with parameters named by FQN; they go into ``trainer_state``.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state["state"]}
    _check_tensors(tensors, "state")
    return tensors, optim_state["param_groups"]


def write_sharded_state(tensors: dict[str, Any], directory: Path, collective: bool = True) -> None:
    """Write :func:`sharded_state`'s tensors under ``directory/state``.

    ``collective``: every rank calls this and writes its own part (FSDP shards; the directory must be on storage
    all ranks share). ``False``: this process alone writes everything it holds (one process, or rank 0 of a DDP
    run, whose replicated state is complete), as checkpoints were written before, on node-local storage too.
    """
    # sync_files=True (the default, spelled out): each rank fsyncs its own files before the commit's barrier.
    try:
        dcp.save(tensors, storage_writer=FileSystemWriter(directory / STATE_DIR, sync_files=True),
                 no_dist=not collective or _no_dist())
    except CheckpointException as exc:
        # DCP wraps each rank's failure ({rank: (exception, traceback)}); a disk error stays an OSError, which the
        # CheckpointManager turns into its one-line "disk full, the previous checkpoint is intact" failure.
        for failure in exc.failures.values():
            error = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(error, OSError):
                raise error from exc
        raise


def has_sharded_state(directory: Path) -> bool:
    """Whether a checkpoint directory holds DCP state (older checkpoints hold ``model.safetensors`` instead)."""
    return (directory / STATE_DIR / ".metadata").is_file()


def load_sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, param_groups: list[dict[str, Any]]
) -> None:
    """Load ``directory/state`` into ``model`` and ``optimizer`` as they are sharded now (collective).

    ``get_state_dict`` gives this run's layout (DTensor shards under FSDP, whole tensors otherwise; on an optimizer
    that has not stepped yet it first creates the state with a zero-learning-rate step, which changes no weight);
    ``dcp.load`` fills it in place from whatever layout was saved.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state["state"]}
    dcp.load(
        tensors,
        storage_reader=SafeFileSystemReader(directory / STATE_DIR),
        planner=TensorOnlyLoadPlanner(),
        no_dist=_no_dist(),
    )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict={"state": tensors["optim"], "param_groups": param_groups},
    )
