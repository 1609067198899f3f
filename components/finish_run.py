"""Component ``finish-run``: the pipeline's exit task; ends the MLflow parent run with the pipeline's state."""

from kfp import dsl

from components._image import REFINE_CPU_IMAGE


@dsl.component(base_image=REFINE_CPU_IMAGE, install_kfp_package=False)
def finish_run(config_yaml: str, status: dsl.PipelineTaskFinalStatus, kfp_run_id: str = ""):
    """Close the parent run tagged ``kfp.run_id=kfp_run_id``: FINISHED if the pipeline succeeded, else FAILED
    (KILLED when cancelled). KFP forbids an exit task from reading another task's output, hence the tag lookup.

    Args:
        config_yaml: the experiment config (for the tracking settings).
        status: the final status KFP passes to exit tasks.
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
    """
    from refine_core import kfp_support as ks

    ks.close_pipeline_run(ks.config_from_yaml(config_yaml), kfp_run_id, status.state)
