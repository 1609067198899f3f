"""Kernel configurations for fla without autotuning: Triton's stored autotune results turned into fla's config files.

Every fla kernel is autotuned on its first call at a new key (head count, head dims, chunk size, flags, dtypes): on a
fresh GPU machine the first NTP and REFINE steps of a 340M DeltaNet spent about 380 s there (BENCHMARKS.md). Two
stores avoid that:

* Triton's cache (``TRITON_CACHE_DIR``): fla asks Triton to keep each autotune result (``<kernel>.autotune.json``,
  all configurations with their timings) next to the compiled kernels, so a restart with the same cache and the same
  shapes neither tunes nor compiles (``refine warmup`` fills it; ``RunConfig.triton_cache_dir`` keeps it with the
  job).
* fla's own config files (``FLA_CONFIG_DIR/<kernel>.json``, read when ``FLA_CACHE_MODE`` is set): one chosen
  configuration per key. :func:`export_fla_configs` writes them from the Triton cache's results, and
  :func:`use_fla_configs` points fla at them with ``FLA_CACHE_MODE=strict``: a key that was tuned takes its own
  configuration and compiles only that one; any other key is autotuned as usual.

Why not ``fuzzy``, which also lends a tuned configuration to keys that differ only in numbers: those numbers include
the head dims and block sizes (``K``, ``V``, ``BK``, ``BV``), not only the head count, and fla takes the first such
entry. On an H100 (2026-12-05) a 1.3B REFINE step got ``chunk_bwd_kernel_dqkwg``'s 3-stage configuration tuned at
``V = 128`` for its branch pass at ``V = 256`` and died with Triton's ``OutOfResources`` (344,064 bytes of shared
memory against 232,448). A configuration is only known to fit the key it was tuned for, so a new model shape is
tuned once, by ``refine warmup --config <that config>``.

Both variables are read when fla is first imported: call :func:`use_fla_configs` before that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SUFFIX = ".autotune.json"


def _serialize(key: Any) -> str:
    """fla's ``AutotuneKey.serialize`` (``fla/ops/utils/cache.py``): the text whose md5 names an entry."""
    return json.dumps(key, separators=(",", ":"), sort_keys=True)


def best_config(configs_timings: list) -> dict[str, Any]:
    """The fastest configuration of one Triton autotune record (timings are quantiles; the first is the median)."""
    config, _ = min(configs_timings, key=lambda item: item[1][0] if isinstance(item[1], list) else item[1])
    return config


def export_fla_configs(triton_cache: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write ``out_dir/<kernel>.json`` in fla's format from the autotune results in a Triton cache directory.

    Args:
        triton_cache: a ``TRITON_CACHE_DIR`` that fla's kernels were autotuned into.
        out_dir: where to write (created when there is something to write); existing files for the same kernels
            are merged, new keys win.

    Returns:
        Entries written per kernel name.
    """
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(Path(triton_cache).glob(f"*/*{_SUFFIX}")):
        record = json.loads(path.read_text())
        if not record.get("configs_timings"):
            continue
        kernel = path.name[: -len(_SUFFIX)]
        key = record["key"]
        digest = hashlib.md5(_serialize(key).encode()).hexdigest()
        entries.setdefault(kernel, {})[digest] = {"autotune_key": key, "config": best_config(record["configs_timings"])}
    out = Path(out_dir)
    if entries:  # nothing tuned (CPU, or no fla): leave no empty folder behind
        out.mkdir(parents=True, exist_ok=True)
    for kernel, found in entries.items():
        target = out / f"{kernel}.json"
        merged = json.loads(target.read_text()).get("autotune_entries", {}) if target.exists() else {}
        merged.update(found)
        target.write_text(json.dumps({"kernel_name": kernel, "autotune_entries": merged}, indent=1) + "\n")
    logger.info("exported %d fla kernel configs (%d keys) to %s", len(entries),
                sum(len(v) for v in entries.values()), out)
    return {kernel: len(found) for kernel, found in entries.items()}


def use_fla_configs(config_dir: str | Path, mode: str = "strict") -> None:
    """Point fla at ``config_dir`` (``FLA_CONFIG_DIR``) with lookup ``mode`` (``FLA_CACHE_MODE``).

    Raises ``RuntimeError`` when fla is already imported: it reads both variables once, at import.
    """
    if any(name == "fla" or name.startswith("fla.") for name in sys.modules):
        raise RuntimeError("fla is already imported; call use_fla_configs() before anything imports fla")
    os.environ["FLA_CONFIG_DIR"] = str(Path(config_dir).resolve())
    os.environ["FLA_CACHE_MODE"] = mode
