"""Kubeflow pipelines that wire the components of ``components/``; each module compiles in ``__main__``.

| name | module | what |
| --- | --- | --- |
| ``full`` | :mod:`pipelines.full_pipeline` | prep → both arms: mid-train → post-train → TTT + eval; compare; register |
| ``midtrain`` | :mod:`pipelines.midtrain_pipeline` | data prep → NTP-baseline and REFINE mid-training |
| ``posttrain`` | :mod:`pipelines.posttrain_pipeline` | post-training of one model |
| ``eval`` | :mod:`pipelines.eval_pipeline` | test-time training + evaluation of one model |
| ``pretrain`` | :mod:`pipelines.pretrain_pipeline` | data prep → next-token prediction |

``refine pipeline compile|run|submit`` (:mod:`pipelines.cli`) looks pipelines up by these names. ``full``,
``midtrain`` and ``pretrain`` also have ``build(placement)``: with more than one GPU their mid-/pre-training runs as a
Kubeflow Trainer ``TrainJob`` (``--nodes``, ``--gpus-per-node``).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, pipeline function, whether the module's build(placement) places a data-parallel training stage);
# imported only when used, so listing names needs no kfp import.
PIPELINES: dict[str, tuple[str, str, bool]] = {
    "full": ("pipelines.full_pipeline", "full_pipeline", True),
    "midtrain": ("pipelines.midtrain_pipeline", "midtrain_pipeline", True),
    "posttrain": ("pipelines.posttrain_pipeline", "posttrain_pipeline", False),
    "eval": ("pipelines.eval_pipeline", "eval_pipeline", False),
    "pretrain": ("pipelines.pretrain_pipeline", "pretrain_pipeline", True),
}


def load_pipeline(name: str, placement: Any = None) -> Any:
    """The ``@dsl.pipeline`` object registered as ``name`` (a key of :data:`PIPELINES`).

    Args:
        name: the pipeline.
        placement: a :class:`pipelines._k8s.TrainPlacement` for its data-parallel training stage; ``None`` or one
            GPU: the default build.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or more than one GPU for a pipeline
            without a data-parallel stage.
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    module_name, function, placeable = PIPELINES[name]
    module = importlib.import_module(module_name)
    if placement is None or not placement.distributed:
        return getattr(module, function)
    if not placeable:
        raise ValueError(
            f"pipeline {name!r} has no data-parallel training stage (post-training and evaluation run on one GPU); "
            f"--nodes/--gpus-per-node apply to {', '.join(n for n, (_, _, p) in PIPELINES.items() if p)}."
        )
    return module.build(placement)
