"""Moving bench/repro.py's results and models between device slots: what a command brings back, and models carried in.

A device command brings back at most 8 files (16 MiB each, 64 MiB together) from ``$OUT``, and a call carries at
most 64 MiB with the working tree; checkpoints (weights and AdamW state, ~210 MB for the study's model) do not fit,
so a model that a later arm starts from travels as its final weights in bf16 (34.7 MB for the 17.4M-parameter base),
tarred with its config and tokenizer and cut into ``model-<arm>-s<seed>.tar.partNN`` files of at most 15 MiB. Loading
casts them back to float32 master weights (refine_core.training.setup), so an arm started from a carried model
starts from the bf16-rounded weights of its parent; EXPERIMENTS.md says so next to the numbers.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.repro_arms import ARMS

logger = logging.getLogger("repro")

PART_BYTES = 15 * 2**20
# A device command brings back at most 8 files: the results, the log, and the parts of one or two models.
MAX_FILES_BACK = 8


def bring_back(study: Any, out: Path) -> None:
    """The results (one tar.gz) and the weights of finished starting models (parts) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if study.results.is_dir():
        with tarfile.open(out / "repro-results.tar.gz", "w:gz") as tar:
            tar.add(study.results, arcname="repro")
    for name, seed in study.finished_models:
        files = len(list(out.iterdir()))
        size = sum(f.stat().st_size for f in study.model_dir(ARMS[name], seed).iterdir())
        if files + math.ceil(size / 2 / PART_BYTES) + 1 > MAX_FILES_BACK:
            logger.warning("not packing %s seed %d: %s would hold more than %d files; pack it in the next command "
                           "with `python bench/repro.py pack %s:%d --out \"$OUT\"`", name, seed, out,
                           MAX_FILES_BACK, name, seed)
            continue
        pack_model(study, ARMS[name], seed, out)


def pack_model(study: Any, arm: Any, seed: int, out: Path) -> list[Path]:
    """The arm's final model with bf16 weights as ``model-<arm>-s<seed>.tar.partNN`` files in ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    model = study.model_dir(arm, seed)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(model, copy)
        weights = load_file(str(copy / "model.safetensors"))
        if json.loads((copy / "config.json").read_text()).get("tie_word_embeddings"):
            weights.pop("lm_head.weight", None)  # the embedding, written twice; loading ties it again
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
                  str(copy / "model.safetensors"), metadata={"format": "pt"})
        blob = Path(tmp) / "model.tar"
        with tarfile.open(blob, "w") as tar:
            tar.add(copy, arcname=str(model.relative_to(study.work)))
        data = blob.read_bytes()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        part = out / f"model-{arm.name}-s{seed}.tar.part{i // PART_BYTES:02d}"
        part.write_bytes(data[i : i + PART_BYTES])
        parts.append(part)
    logger.info("packed %s (bf16, %.1f MiB) into %d part(s) in %s", model, len(data) / 2**20, len(parts), out)
    return parts


def unpack(study: Any, source: Path) -> list[Path]:
    """Models from ``model-*.tar.partNN`` files in ``source`` into the work directory (a model already there stays)."""
    restored = []
    for first in sorted(source.glob("model-*.tar.part00")) if source.is_dir() else []:
        stem = first.name[: -len(".part00")]
        data = b"".join(p.read_bytes() for p in sorted(source.glob(f"{stem}.part*")))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            model = study.work / Path(tar.getnames()[0]).parts[0]  # <arm>-s<seed>
            inner = [Path(n) for n in tar.getnames() if n.endswith("/model/config.json")]
            if inner and (study.work / inner[0]).is_file():
                continue
            tar.extractall(study.work, filter="data")
        restored.append(model)
        logger.info("unpacked %s into %s", stem, model)
    return restored
