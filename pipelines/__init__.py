"""Kubeflow pipelines that wire the components of ``components/``; each module compiles in ``__main__``.

| name | module | what |
| --- | --- | --- |
| ``full`` | :mod:`pipelines.full_pipeline` | prep → both arms: mid-train → post-train → TTT + eval; compare; register |
| ``midtrain`` | :mod:`pipelines.midtrain_pipeline` | data prep → NTP-baseline and REFINE mid-training |
| ``posttrain`` | :mod:`pipelines.posttrain_pipeline` | post-training of one model |
| ``eval`` | :mod:`pipelines.eval_pipeline` | test-time training + evaluation of one model |
| ``pretrain`` | :mod:`pipelines.pretrain_pipeline` | data prep → next-token prediction |

``refine pipeline compile|run|submit`` (:mod:`pipelines.cli`) looks pipelines up by these names.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, pipeline function); imported only when used, so listing names needs no kfp import.
PIPELINES: dict[str, tuple[str, str]] = {
    "full": ("pipelines.full_pipeline", "full_pipeline"),
    "midtrain": ("pipelines.midtrain_pipeline", "midtrain_pipeline"),
    "posttrain": ("pipelines.posttrain_pipeline", "posttrain_pipeline"),
    "eval": ("pipelines.eval_pipeline", "eval_pipeline"),
    "pretrain": ("pipelines.pretrain_pipeline", "pretrain_pipeline"),
}


def load_pipeline(name: str) -> Any:
    """The ``@dsl.pipeline`` object registered as ``name`` (a key of :data:`PIPELINES`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    module, function = PIPELINES[name]
    return getattr(importlib.import_module(module), function)
