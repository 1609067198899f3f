"""What every training stage sets up the same way: remote inputs made local, the prepared data's tokenizer, the
model."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from refine_core import storage
from refine_core.config import ConfigError, RunConfig
from refine_core.models import FastWeightForCausalLM, build_model, config_from_dict, load_pretrained
from refine_core.runtime import configure_triton_cache
from refine_core.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def localize_inputs(cfg: RunConfig) -> RunConfig:
    """``cfg`` with an ``s3://`` ``data.prepared_dir`` downloaded into ``model.cache_dir`` and replaced by the local
    copy; a remote ``model.source`` (``s3://`` or a hub name) is fetched into the same cache, so that loading it
    later finds it there.

    Under torchrun call it on one rank per node first and on the others after a barrier (the session does): the
    cache is shared by the ranks of a node, and a download replaces an outdated copy in place.
    """
    cache = Path(cfg.model.cache_dir).expanduser()
    source = cfg.model.source
    if source is not None and (storage.is_s3_uri(source) or storage.is_hub_name(source)):
        storage.resolve(source, cache)
    remote_data = cfg.data.prepared_dir
    if remote_data is None or not storage.is_s3_uri(remote_data):
        return cfg
    local = storage.resolve(remote_data, cache)
    logger.info("prepared data %s -> %s", remote_data, local)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(local)))


def prepared_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The tokenizer that ``refine prepare-data`` saved next to the shards (so every stage uses the same one)."""
    path = cfg.prepared_dir / "tokenizer"
    if not path.exists():
        raise FileNotFoundError(
            f"no prepared data at {cfg.prepared_dir} (missing {path}); run `refine prepare-data --config ...` first "
            "or set data.prepared_dir"
        )
    return load_tokenizer(str(path), cfg.model.cache_dir)


def check_model_section(cfg: RunConfig) -> None:
    """Refuse a from-scratch ``model.config`` that cannot build a model, before any data or weights are read."""
    if cfg.model.source is not None:
        return
    try:
        config_from_dict({"model_type": cfg.model.arch, **cfg.model.config})
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"model.config: {exc}") from exc


def build_or_load_model(cfg: RunConfig, tokenizer: Tokenizer | None, device: torch.device) -> FastWeightForCausalLM:
    """Load ``cfg.model.source`` or build a fresh ``cfg.model.arch``; float32 master weights on ``device``, with
    ``cfg.model.gradient_checkpointing`` applied.

    ``tokenizer`` sizes a fresh model's vocabulary and special ids and is checked against a loaded one; ``None``
    (``refine warmup``, which needs only the shapes) takes them from ``model.config`` / the config class defaults.
    A set ``cfg.triton_cache_dir`` is put into effect first, for the KFP components and other callers that run a
    stage without the ``refine`` command line: fla's kernels compile on the model's first CUDA call.
    """
    if cfg.triton_cache_dir is not None:
        configure_triton_cache(cfg.triton_cache_dir)
    if cfg.model.source is not None:
        model = load_pretrained(
            cfg.model.source,
            cache_dir=Path(cfg.model.cache_dir).expanduser(),
            dtype=torch.float32,
            device=device,
            config_overrides=cfg.model.config or None,
        )
    else:
        from_tokenizer = {} if tokenizer is None else {
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        fields = {"model_type": cfg.model.arch, **from_tokenizer, **cfg.model.config}
        try:
            config = config_from_dict(fields)
        except TypeError as exc:
            raise ConfigError(f"model.config: {exc}") from exc
        if config.extra:
            raise ConfigError(
                f"model.config has fields {sorted(config.extra)} that {cfg.model.arch} does not use; check the "
                "spelling against fla's config names (hidden_size, num_hidden_layers, num_heads, ...)"
            )
        model = build_model(config).to(device)
    # Read by FastWeightForCausalLM.forward in training mode (a loaded checkpoint never carries it).
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; use the checkpoint's own tokenizer or raise model.config.vocab_size"
        )
    logger.info(
        "model %s: %.2fM parameters on %s%s",
        model.config.model_type,
        model.num_parameters() / 1e6,
        device,
        ", gradient checkpointing" if model.gradient_checkpointing else "",
    )
    return model
