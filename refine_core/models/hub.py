"""Saving and loading models in the Hugging Face layout that fla uses.

A model directory holds ``config.json`` (fla's field names, ``model_type`` and ``architectures``) and
``model.safetensors`` (or shards with ``model.safetensors.index.json``), plus the tokenizer when one is saved.
Such a directory loads back here with a strict key check and into fla's ``AutoModelForCausalLM``; fla-hub
checkpoints (e.g. ``fla-hub/delta_net-1.3B-100B``) load here the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from refine_core.models.causal_lm import FastWeightForCausalLM, build_model
from refine_core.models.configuration import FastWeightConfig, config_from_dict

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def save_pretrained(
    model: FastWeightForCausalLM,
    directory: str | Path,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer) into ``directory``.

    Tied weights are written once under each name (safetensors refuses shared storage), which fla and HF both load.
    ``state_dict``: the weights to write instead of ``model.state_dict()`` (e.g. an FSDP model's gathered weights).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.clone().contiguous()
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.config.to_dict()
    # The dtype of the weights written (under FSDP with bf16 compute, model.dtype may be an unsharded bf16 copy's).
    written = next((t.dtype for t in state.values() if t.is_floating_point()), model.dtype)
    config["torch_dtype"] = str(dtype or written).removeprefix("torch.")
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def read_config(directory: str | Path) -> FastWeightConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs config.json (HF / fla layout)")
    return config_from_dict(json.loads(path.read_text()))


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of a model directory (single file or shards); pickles are refused."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_safetensors(directory / shard))
        return state
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise ValueError(
            f"{directory} holds pickled weights (*.bin / *.pt); refine_core loads safetensors only. Convert them "
            "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``load_file`` with a message that names the file when it is not a whole safetensors file."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt: copy it again from "
            "its source, or point model.source at another checkpoint"
        ) from exc


def load_model_dir(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> FastWeightForCausalLM:
    """Build the model described by ``directory/config.json`` and load its weights with a strict key check."""
    directory = Path(directory)
    config = read_config(directory)
    if config_overrides:
        merged = {**config.to_dict(), **config_overrides}
        config = config_from_dict(merged)
    with torch.device("meta"):
        model = build_model(config)
    state = read_state_dict(directory)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embeddings.weight"]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not match the {config.model_type} architecture in its config.json: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    model.mark_no_weight_decay()
    dtype = parse_dtype(dtype)
    model.to(device=device or "cpu", dtype=dtype)
    return model


def load_pretrained(
    source: str,
    cache_dir: str | Path = "~/.cache/refine",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> FastWeightForCausalLM:
    """Load from a local directory, a hub name (``fla-hub/delta_net-1.3B-100B``) or ``s3://bucket/prefix``."""
    from refine_core.storage import resolve

    directory = resolve(source, Path(cache_dir).expanduser())
    model = load_model_dir(directory, dtype=dtype, device=device, config_overrides=config_overrides)
    logger.info("loaded %s (%s, %.1fM parameters)", source, model.config.model_type, model.num_parameters() / 1e6)
    return model
