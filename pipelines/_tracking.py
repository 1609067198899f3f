"""The MLflow parent run around a pipeline's tasks: one ``start-run`` task inside an exit handler whose exit task
``finish-run`` closes the run with the pipeline's final state (also when a stage fails)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kfp import dsl

from components.finish_run import finish_run
from components.start_run import start_run
from pipelines import _k8s

if TYPE_CHECKING:
    from kfp.dsl.pipeline_channel import PipelineParameterChannel


@contextmanager
def tracked_run(config_yaml: str, pipeline_name: str) -> Iterator[PipelineParameterChannel]:
    """Open the exit handler and the parent run; yields the parent run id for every stage's ``parent_run_id``.

    Usage inside a ``@dsl.pipeline`` function::

        with tracked_run(config_yaml, NAME) as parent:
            train_refine(..., parent_run_id=parent, **run_context())
    """
    closing = _k8s.light_stage(finish_run(config_yaml=config_yaml, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                               "close MLflow run")
    with dsl.ExitHandler(closing, name="tracked-run"):
        opening = start_run(config_yaml=config_yaml, pipeline_name=pipeline_name,
                            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        yield _k8s.light_stage(opening, "open MLflow run").output
