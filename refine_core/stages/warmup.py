"""Stage: fill the Triton cache for a config's shapes before the real job runs.

On CUDA, fla compiles and autotunes each Triton kernel the first time it meets a new shape; at 1.3B parameters and
16K-token documents that is minutes at the start of every job, and again after every restart unless the cache
outlives the job. fla 0.6.0 already stores its autotuning results next to the compiled kernels
(``cache_results=True``), so all a job needs is a ``triton_cache_dir`` on a volume that persists, filled once.

``warmup(cfg)`` fills it: it builds the model of ``cfg.model`` on ``cfg.device`` (from scratch or from
``model.source``; random weights give the same kernels), makes random token documents of ``data.max_tokens`` tokens
in the model's vocabulary (no tokenizer files or prepared data are needed when ``model.source`` or
``model.config.vocab_size`` gives the vocabulary), and under the configured autocast runs

1. one NTP forward + backward per micro-batch size the training stages use (``refine.micro_batch_size`` and
   ``ntp.micro_batch_size``),
2. one :func:`~refine_core.training.refine_step.refine_step` on ``refine.mini_batch_size`` documents with the
   config's engine (entropy pass, rollouts, policy pass, one AdamW step),
3. one short sampled :func:`~refine_core.models.generate` call (prefill + recurrent decoding, as in evaluation).

It writes no checkpoints, no output directory and no MLflow run; the model is thrown away. It reports the cache
directory, the number of files in it before and after, and the seconds taken (logged and returned). On CPU no Triton
kernel runs, so it only checks that the config's shapes go through (a second with a tiny config).

Command line::

    refine warmup --config configs/delta_net-1.3b-16k.yaml triton_cache_dir=/mnt/ckpt/triton-cache
    refine train-refine --config configs/delta_net-1.3b-16k.yaml triton_cache_dir=/mnt/ckpt/triton-cache ...
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from refine_core import runtime
from refine_core.config import RunConfig
from refine_core.data.batching import left_pad
from refine_core.models import FastWeightForCausalLM, SamplingConfig, generate
from refine_core.models.ops.fla_configs import export_fla_configs
from refine_core.tokenizer import Tokenizer, load_tokenizer
from refine_core.training.refine_step import refine_step
from refine_core.training.session import micro_batch_loss
from refine_core.training.setup import build_or_load_model
from refine_core.training.timing import PhaseTimer

logger = logging.getLogger(__name__)

STAGE = "warmup"


def count_cache_files(cache_dir: Path) -> int:
    """Files under ``cache_dir`` (0 when it does not exist yet): Triton writes one directory per kernel variant."""
    if not cache_dir.is_dir():
        return 0
    return sum(1 for path in cache_dir.rglob("*") if path.is_file())


def _vocabulary_source(cfg: RunConfig) -> Tokenizer | None:
    """The tokenizer that sizes a from-scratch model, or ``None`` when the model's config already does.

    ``model.source`` brings its own config.json and ``model.config.vocab_size`` fixes the size, so no tokenizer is
    read then (warm-up needs shapes only). Otherwise the training stages size the model from the tokenizer, so
    warm-up reads it too (``byte`` needs no files; a hub tokenizer is a small download into ``model.cache_dir``).
    """
    if cfg.model.source is not None or "vocab_size" in cfg.model.config or cfg.model.tokenizer is None:
        return None
    return load_tokenizer(cfg.model.tokenizer, Path(cfg.model.cache_dir).expanduser())


def _random_documents(model: FastWeightForCausalLM, count: int, length: int, seed: int) -> list[torch.Tensor]:
    """``count`` documents of ``length`` random ordinary tokens (no pad, EOS or BOS, which real documents lack)."""
    config = model.config
    special = {i for i in (config.pad_id, config.eos_token_id, config.bos_token_id) if i is not None}
    ordinary = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return [ordinary[torch.randint(len(ordinary), (length,), generator=generator)] for _ in range(count)]


def warmup(cfg: RunConfig) -> dict[str, Any]:
    """Run the config's kernels once at its shapes so that Triton compiles and autotunes them into the cache.

    Returns:
        ``{"triton_cache_dir", "cache_files_before", "cache_files_after", "seconds", "phases", "device",
        "doc_tokens"}``: the cache in effect, its file counts before and after, the total wall time and the
        seconds of each phase (``build``, ``ntp``, ``refine_step``, ``generate``).
    """
    t_start = time.perf_counter()
    # Before anything compiles (the CLI has done it already; a direct call from Python or a component has not).
    cache_dir = runtime.configure_triton_cache(cfg.triton_cache_dir)
    files_before = count_cache_files(cache_dir)
    runtime.seed_everything(cfg.seed)
    device = runtime.select_device(cfg.device)
    phases = PhaseTimer(device)
    logger.info("warm-up: Triton cache %s (%d files), device %s, precision %s", cache_dir, files_before, device,
                cfg.precision)

    def autocast() -> Any:
        return runtime.autocast(device, cfg.precision)

    with phases("build"):
        model = build_or_load_model(cfg, _vocabulary_source(cfg), device).train()
    pad_id = model.config.pad_id
    if pad_id is None:  # a config with neither pad nor EOS: any id works, the documents have no padding
        pad_id = 0
    rcfg = cfg.refine
    micro_sizes = sorted({rcfg.micro_batch_size, cfg.ntp.micro_batch_size})
    count = max(rcfg.mini_batch_size, *micro_sizes)
    docs = _random_documents(model, count, cfg.data.max_tokens, cfg.seed)

    # 1. NTP forward + backward at every micro-batch size the training loops use (the gradients are dropped).
    with phases("ntp"):
        for size in micro_sizes:
            ids, mask = left_pad(docs[:size], pad_id)
            with autocast():
                loss_sum, n_targets = micro_batch_loss(model, ids.to(device), mask.to(device), rcfg.mask_pad_in_loss)
            (loss_sum / max(n_targets, 1)).backward()
            model.zero_grad(set_to_none=True)

    # 2. One REFINE step: entropy pass, positions, rollouts with the config's engine, rewards, policy pass, AdamW.
    with phases("refine_step"):
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=rcfg.lr, betas=rcfg.betas, weight_decay=rcfg.weight_decay
        )
        reference = copy.deepcopy(model).eval().requires_grad_(False) if rcfg.kl_coef > 0 else None
        metrics = refine_step(
            model,
            optimizer,
            docs[: rcfg.mini_batch_size],
            list(range(rcfg.mini_batch_size)),
            rcfg,
            seed=cfg.seed,
            step=0,
            pad_id=pad_id,
            eos_id=model.config.eos_token_id,
            autocast=autocast,
            reference_model=reference,
        )
        del optimizer, reference  # AdamW's state is as large as the model twice over

    # 3. A short sampled generation: prefill through the chunked kernels, then single-token recurrent steps.
    with phases("generate"), torch.no_grad():
        model.eval()
        ids, mask = left_pad(docs[: rcfg.micro_batch_size], pad_id)
        sampling = SamplingConfig(
            max_new_tokens=max(2, rcfg.rollout_tokens),  # at least one decoding step after the prefill
            do_sample=True,
            temperature=rcfg.temperature,
            top_p=rcfg.top_p,
            top_k=rcfg.top_k,
        )
        with autocast():
            generate(model, ids.to(device), mask.to(device), sampling, eos_token_id=model.config.eos_token_id,
                     pad_token_id=pad_id)

    # fla's config files: each key tuned here, with its chosen configuration (refine_core.models.ops.fla_configs)
    exported = export_fla_configs(cache_dir, cache_dir / runtime.FLA_CONFIGS_SUBDIR)
    files_after = count_cache_files(cache_dir)
    report = {
        "fla_config_kernels": len(exported),
        "triton_cache_dir": str(cache_dir),
        "cache_files_before": files_before,
        "cache_files_after": files_after,
        "seconds": round(time.perf_counter() - t_start, 3),
        "phases": {name: round(secs, 3) for name, secs in phases.seconds.items()},
        "device": str(device),
        "doc_tokens": cfg.data.max_tokens,
        "refine_optimizer_steps": int(metrics.get("refine/optimizer_steps", 0)),
    }
    logger.info(
        "warm-up done in %.1f s (%s): Triton cache %s now holds %d files (%+d)",
        report["seconds"],
        ", ".join(f"{name} {secs:.1f} s" for name, secs in phases.seconds.items()),
        cache_dir,
        files_after,
        files_after - files_before,
    )
    return report
