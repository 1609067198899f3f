"""Component ``train-refine``: REFINE mid-training, or its NTP-only baseline arm (``baseline=True``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components._image import REFINE_GPU_IMAGE


@dsl.component(base_image=REFINE_GPU_IMAGE, install_kfp_package=False)
def train_refine(
    config_yaml: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    baseline: bool = False,
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
    base_model: Input[Model] | None = None,
):
    """Mid-train on the prepared ``data`` with ``refine_core.stages.train_refine.train_refine``: the REFINE step,
    or with ``baseline=True`` (``refine.nsp_update=false``) the NTP-only arm on the same documents and steps.

    Args:
        config_yaml: the experiment config (``refine`` section).
        data: a ``prepare-data`` output.
        model: the final model (HF layout); metadata: MLflow run ids, arm, steps, held-out loss, data fingerprint.
        metrics: ``train/steps``, ``train/final_eval_loss``.
        report: a Markdown summary with the loss and reward curves as a table.
        baseline: train the NTP-only baseline arm instead of REFINE.
        parent_run_id: the pipeline's MLflow parent run (``start-run``'s output).
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` (also makes the cache key unique per run).
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        base_model: a model to start from; default: the config's ``model`` section (a hub checkpoint or scratch).
    """
    from refine_core import kfp_support as ks
    from refine_core.stages.train_refine import STAGE
    from refine_core.stages.train_refine import train_refine as run_stage

    stage, arm, settings = ks.training_arm(STAGE, baseline)
    cfg = ks.stage_config(config_yaml, stage, prepared_dir=data.path, model_dir=base_model.path if base_model else None,
                          settings=settings)
    ctx = ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    with ks.open_stage_run(cfg, stage, ctx, {"refine.arm": arm}) as tracker:
        result = run_stage(cfg, tracker)
        model.metadata.update(ks.export_training(result, stage, tracker, ctx, model.path, metrics, report.path,
                                                 arm=arm, data_fingerprint=data.metadata.get("data_fingerprint")))
