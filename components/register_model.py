"""Component ``register-model``: a ``Model`` artifact becomes a version in the MLflow model registry."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components._image import REFINE_CPU_IMAGE


@dsl.component(base_image=REFINE_CPU_IMAGE, install_kfp_package=False)
def register_model(
    config_yaml: str,
    model: Input[Model],
    model_name: str,
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
    results: Input[Dataset] | None = None,
) -> str:
    """Register ``model`` as a new version of ``model_name``, tagged with its data fingerprints, the config hash,
    the git commit, the KFP run and (with ``results``) its evaluation scores. The version points at the ``model``
    artifact of the training run named in the model's metadata, so the weights are not uploaded twice.

    Args:
        config_yaml: the experiment config (logged with the registering run; its hash becomes a tag).
        model: the model to register (a ``post-train`` output).
        model_name: the registered model's name.
        parent_run_id: the pipeline's MLflow parent run.
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        results: the model's ``ttt-evaluate`` results, for score tags.

    Returns:
        ``models:/<model_name>/<version>`` (``""`` when tracking is off).
    """
    from refine_core import kfp_support as ks

    cfg, ctx = ks.config_from_yaml(config_yaml), ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    scores = ks.flat_scores(ks.read_summary(results.path)) if results else {}
    with ks.open_stage_run(cfg, "register", ctx) as tracker:
        tracker.log_config(cfg)
        tags = ks.registry_tags(cfg, model.metadata, ctx, scores)
        source_run_id = model.metadata.get("mlflow_run_id", "")
        return ks.register_model_version(cfg, model.path, model_name, tracker, tags, source_run_id)
