"""The data-parallel training task of a pipeline: in one pod, or through the TrainJob launcher.

:func:`training_task` returns a task with the outputs ``model``, ``metrics`` and ``report`` either way, so the
pipelines wire the rest identically. Which of the two it is follows the pipeline's :class:`~pipelines._k8s.
TrainPlacement`, fixed at compile time: KFP's local runner cannot run a ``dsl.OneOf`` that would merge a runtime
``dsl.If`` / ``dsl.Else`` choice (it fails with "Expected 1 artifact in ArtifactSelectorSpec. Got: 2"), and a
pipeline that cannot be run locally cannot be tested.
"""

from __future__ import annotations

from typing import Any

from kfp import dsl

from components.launch_trainjob import launch_trainjob
from components.train_ntp import train_ntp
from components.train_refine import train_refine
from pipelines import _k8s
from pipelines._k8s import StageResources, TrainPlacement, run_context


def training_task(
    stage: str,
    *,
    config_yaml: Any,
    data: Any,
    parent_run_id: Any,
    placement: TrainPlacement,
    resources: StageResources,
    name: str,
    baseline: bool = False,
    base_model: Any = None,
) -> dsl.PipelineTask:
    """A ``train-refine`` or ``train-ntp`` task placed by ``placement``.

    Args:
        stage: ``train-refine`` or ``train-ntp``.
        config_yaml, data, parent_run_id, base_model: the task's inputs (pipeline channels).
        placement: one GPU in the task's pod, or a TrainJob of ``nodes`` x ``gpus_per_node`` (with the config's
            ``trainjob`` settings: resources, checkpoint root, keep_staged); its trainers always run with
            ``resume=true``, so that a retried task resumes.
        resources: the one-GPU resources of the stage (scaled per node for a TrainJob).
        name: the task's display name.
        baseline: with ``train-refine``, the NTP-only arm.
    """
    inputs: dict[str, Any] = {"config_yaml": config_yaml, "data": data, "parent_run_id": parent_run_id,
                              **run_context()}
    if base_model is not None:
        inputs["base_model"] = base_model
    if placement.distributed:
        node = _k8s.per_node(resources, placement.gpus_per_node)
        settings = placement.trainjob
        task = launch_trainjob(stage=stage, baseline=baseline, num_nodes=placement.nodes,
                               procs_per_node=placement.gpus_per_node, timeout_s=node.timeout_s,
                               node_resources=_k8s.node_resources(node, settings.node),
                               checkpoint_root=settings.checkpoint_root or "", resume=True,
                               keep_staged=settings.keep_staged, **inputs)
        return _k8s.trainjob_stage(task, node, settings.launcher, f"{name} ({placement.label})")
    if stage == "train-refine":
        task = train_refine(baseline=baseline, **inputs)
    elif stage == "train-ntp" and not baseline:
        task = train_ntp(**inputs)
    else:
        raise ValueError(f"training_task: stage={stage!r} baseline={baseline} is not a data-parallel training stage")
    return _k8s.gpu_stage(task, resources, name)
