"""Process-level runtime helpers shared by every stage: device, precision, seeding, RNG state, logging, git sha.

Typical start of a stage::

    setup_logging("INFO")
    configure_triton_cache(cfg.triton_cache_dir)   # before fla's first kernel compiles
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    with autocast(device, cfg.precision):
        loss = model(batch).loss

``capture_rng_state()`` returns only tensors, lists, ints, floats, strings and ``None``, so it can go into a
checkpoint that loads with ``torch.load(..., weights_only=True)``; ``restore_rng_state`` puts it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refine_core.models.ops.fla_configs import use_fla_configs

logger = logging.getLogger(__name__)

# The checkout this package lives in (``<repo>/refine_core/runtime.py``); for a wheel install it is site-packages.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent
PRECISIONS = ("auto", "fp32", "bf16")
# Inside the Triton cache: fla's per-kernel configs exported from its autotune results (``refine warmup``).
FLA_CONFIGS_SUBDIR = "fla_configs"
LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


def select_device(spec: str) -> torch.device:
    """Turn a ``RunConfig.device`` string into a ``torch.device``.

    Args:
        spec: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The device. Raises ``ValueError`` when CUDA is requested but not usable, naming the fix.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"device={spec!r} is not a device torch understands; use 'auto', 'cpu', 'cuda' or "
                         "'cuda:N'.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={spec!r} but CUDA is not available (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}); set device=auto or device=cpu, or run on a GPU machine."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={spec!r} but only {count} CUDA device(s) are visible; use cuda:0..cuda:"
                             f"{count - 1} or check CUDA_VISIBLE_DEVICES.")
    return device


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Mixed-precision context for forward passes.

    ``auto``/``bf16`` on CUDA: bf16 autocast. ``auto``/``fp32`` on CPU: nothing (plain fp32). ``bf16`` on CPU: CPU
    bf16 autocast. ``fp32`` anywhere: nothing.

    Args:
        device: the device the model runs on.
        precision: ``auto``, ``fp32`` or ``bf16`` (``RunConfig.precision``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}.")
    device_type = torch.device(device).type
    use_bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    if not use_bf16:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        yield


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: an integer in ``[0, 2**32)`` (numpy's limit).
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32); pick a smaller non-negative seed.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG, loadable with ``torch.load(..., weights_only=True)``.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": uint8 tensor, "cuda": [uint8 tensor per device]}``. Python's
        ``random.getstate()`` tuple and numpy's state tuple are stored as dicts of tensors / ints / floats / str,
        because ``weights_only`` loading refuses arbitrary tuples of numpy objects.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),  # [625] values < 2**32
            "gauss_next": gauss_next,  # float | None
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),  # [624] uint32 values
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back a snapshot from :func:`capture_rng_state` (possibly after a ``torch.save``/``torch.load`` trip).

    CUDA states are restored for as many devices as both the snapshot and this process have; a mismatch warns.
    """
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((
        npst["bit_generator"],
        npst["keys"].cpu().numpy().astype(np.uint32),
        int(npst["pos"]),
        int(npst["has_gauss"]),
        float(npst["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda_states = list(state.get("cuda") or [])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != available:
        warnings.warn(
            f"the RNG snapshot has {len(cuda_states)} CUDA state(s) but this process sees {available} CUDA "
            "device(s); restoring the common ones, so GPU random draws will not match the original run exactly.",
            stacklevel=2,
        )
    for index, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8), device=index)


def git_commit() -> str | None:
    """HEAD sha of the checkout this package lives in, else ``$REFINE_GIT_COMMIT``, else ``None``. Never raises."""
    try:
        result = subprocess.run(
            ["git", "-C", str(_PACKAGE_PARENT), "rev-parse", "--verify", "--quiet", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        sha = result.stdout.strip()
        if result.returncode == 0 and sha:
            return sha
    except (OSError, subprocess.SubprocessError):
        pass  # no git binary, or it hung: fall back to the environment
    return os.environ.get("REFINE_GIT_COMMIT") or None


def setup_logging(level: int | str = "INFO") -> None:
    """Configure the root logger with one concise format; calling it again only changes the level.

    Under torchrun with more than one rank (``$WORLD_SIZE`` > 1) every line carries ``[rank R]`` and ranks other
    than 0 log warnings and errors only: rank 0 speaks for the job, and the TrainJob's streamed log stays readable.

    Args:
        level: a ``logging`` level name (``"DEBUG"``, ``"info"``) or number.
    """
    if isinstance(level, str):
        name = level.upper()
        resolved = logging.getLevelName(name)
        if not isinstance(resolved, int):
            raise ValueError(f"log level {level!r} is unknown; use DEBUG, INFO, WARNING or ERROR.")
        level = resolved
    log_format = LOG_FORMAT
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        rank = int(os.environ.get("RANK", "0") or 0)
        log_format = LOG_FORMAT.replace("%(name)s", f"[rank {rank}] %(name)s")
        if rank != 0:
            level = max(level, logging.WARNING)
    root = logging.getLogger()
    if not any(getattr(h, "_refine_handler", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(log_format, datefmt=LOG_DATEFMT))
        handler._refine_handler = True  # type: ignore[attr-defined]  # marks ours, so a second call adds none
        root.addHandler(handler)
    root.setLevel(level)


def _repo_root() -> Path | None:
    """The source checkout holding this package (has ``pyproject.toml`` or ``.git``), or ``None`` for a wheel."""
    if (_PACKAGE_PARENT / "pyproject.toml").is_file() or (_PACKAGE_PARENT / ".git").exists():
        return _PACKAGE_PARENT
    return None


def configure_triton_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Point ``$TRITON_CACHE_DIR`` at the cache to use and return it.

    Triton keeps compiled kernels there, and fla 0.6.0 (``cache_results=True``) its autotuning results too, so a
    cache that outlives the job spares the next run minutes of autotuning. Triton reads the variable when fla's
    kernels are first compiled, so call this before the first kernel runs (fla is imported lazily by
    ``refine_core.models.ops``, on the first CUDA call).

    Args:
        cache_dir: ``RunConfig.triton_cache_dir``. ``None`` (the default, the old behaviour) keeps
            ``$TRITON_CACHE_DIR`` if set, else sets it to ``<repo or cwd>/.triton_cache`` (git-ignored; avoids a
            shared ``~/.triton`` across jobs and users). A path wins over the environment: it is made absolute (so
            torchrun workers and subprocesses with another working directory agree), created, and exported.

    If the cache holds ``fla_configs/`` (written by ``refine warmup`` from the autotune results) and fla is not
    pointed elsewhere, fla takes its kernel configurations from there (``FLA_CACHE_MODE=strict``): each tuned key
    compiles its chosen configuration only, and a key never tuned is autotuned (a configuration tuned for another
    shape can overflow shared memory; :mod:`refine_core.models.ops.fla_configs` says why).

    Returns:
        The cache directory in effect.
    """
    path = _triton_cache_path(cache_dir)
    configs = path / FLA_CONFIGS_SUBDIR
    if "FLA_CONFIG_DIR" not in os.environ and configs.is_dir() and any(configs.glob("*.json")):
        try:
            use_fla_configs(configs)
            logger.info("fla kernel configs from %s (FLA_CACHE_MODE=strict)", configs)
        except RuntimeError as exc:  # fla imported already: its configs are fixed for this process
            logger.info("%s", exc)
    return path


def _triton_cache_path(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Set ``$TRITON_CACHE_DIR`` as :func:`configure_triton_cache` describes and return it."""
    if cache_dir is not None:
        path = Path(cache_dir).expanduser().absolute()
        previous = os.environ.get("TRITON_CACHE_DIR")
        if previous and Path(previous).expanduser().absolute() != path:
            logger.info("triton_cache_dir=%s replaces TRITON_CACHE_DIR=%s", path, previous)
        # Created now so that an unwritable or unmounted location fails here, not minutes later inside Triton.
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = str(path)
        logger.debug("TRITON_CACHE_DIR=%s", path)
        return path
    current = os.environ.get("TRITON_CACHE_DIR")
    if current:
        return Path(current)
    path = (_repo_root() or Path.cwd()) / ".triton_cache"
    os.environ["TRITON_CACHE_DIR"] = str(path)
    logger.debug("TRITON_CACHE_DIR=%s", path)
    return path
