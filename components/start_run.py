"""Component ``start-run``: open the pipeline run's MLflow parent run; its id goes to every stage."""

from kfp import dsl

from components._image import REFINE_CPU_IMAGE


@dsl.component(base_image=REFINE_CPU_IMAGE, install_kfp_package=False)
def start_run(config_yaml: str, pipeline_name: str, kfp_run_id: str = "") -> str:
    """Create the MLflow parent run (tags ``kfp.run_id``, ``kfp.pipeline``; the config as params) and leave it
    RUNNING for the exit task :func:`components.finish_run.finish_run` to close.

    Args:
        config_yaml: the experiment config (its ``tracking`` section picks the experiment).
        pipeline_name: the pipeline's name, as a tag.
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.

    Returns:
        The parent run id (``""`` when ``tracking.backend=none``).
    """
    from refine_core import kfp_support as ks

    return ks.open_pipeline_run(ks.config_from_yaml(config_yaml), pipeline_name, kfp_run_id)
