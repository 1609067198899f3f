"""Component ``train-ntp``: ``refine_core.stages.train_ntp.train_ntp`` (next-token prediction) into a ``Model``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components._image import REFINE_GPU_IMAGE


@dsl.component(base_image=REFINE_GPU_IMAGE, install_kfp_package=False)
def train_ntp(
    config_yaml: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
    base_model: Input[Model] | None = None,
):
    """Train with next-token prediction on the prepared ``data`` (``refine train-ntp``), from ``base_model`` if
    given, else from the config's ``model`` section; logs a nested MLflow run under ``parent_run_id``.

    Args:
        config_yaml: the experiment config (``ntp`` section).
        data: a ``prepare-data`` output.
        model: the final model (HF layout); metadata: MLflow run ids, steps, held-out loss, data fingerprint.
        metrics: ``train/steps``, ``train/final_eval_loss``.
        report: a Markdown summary with the loss curve as a table.
        parent_run_id: the pipeline's MLflow parent run (``start-run``'s output).
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` (also makes the cache key unique per run).
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        base_model: a model to continue from.
    """
    from refine_core import kfp_support as ks
    from refine_core.stages.train_ntp import STAGE
    from refine_core.stages.train_ntp import train_ntp as run_stage

    cfg = ks.stage_config(config_yaml, STAGE, prepared_dir=data.path, model_dir=base_model.path if base_model else None)
    ctx = ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    with ks.open_stage_run(cfg, STAGE, ctx) as tracker:
        result = run_stage(cfg, tracker)
        model.metadata.update(ks.export_training(result, STAGE, tracker, ctx, model.path, metrics, report.path,
                                                 data_fingerprint=data.metadata.get("data_fingerprint")))
