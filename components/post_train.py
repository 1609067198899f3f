"""Component ``post-train``: task SFT / Nested SFT / Nested REFINE (``post.mode``) on top of a ``Model``."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from components._image import REFINE_GPU_IMAGE


@dsl.component(base_image=REFINE_GPU_IMAGE, install_kfp_package=False)
def post_train(
    config_yaml: str,
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
    base_model: Input[Model] | None = None,
):
    """Post-train ``base_model`` (else the config's ``model``) on ``post.train_files`` with
    ``refine_core.stages.post_train.post_train``; logs a nested MLflow run under ``parent_run_id``.

    Args:
        config_yaml: the experiment config (``post`` section; the inner step's settings from ``refine``).
        model: the post-trained model; metadata: MLflow run ids, arm and data fingerprints carried from
            ``base_model``, and the task files' fingerprint.
        metrics: ``train/steps``.
        report: a Markdown summary with the SFT loss curve as a table.
        parent_run_id: the pipeline's MLflow parent run.
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        base_model: the mid-trained model.
    """
    from refine_core import kfp_support as ks
    from refine_core.stages.post_train import post_train as run_stage

    upstream = dict(base_model.metadata) if base_model else {}
    cfg = ks.stage_config(config_yaml, "post-train", model_dir=base_model.path if base_model else None)
    stage, ctx = f"post-train-{upstream.get('arm', cfg.post.mode)}", ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    with ks.open_stage_run(cfg, stage, ctx, {"refine.arm": upstream.get("arm", "")}) as tracker:
        result = run_stage(cfg, tracker)
        model.metadata.update(ks.export_training(
            result, stage, tracker, ctx, model.path, metrics, report.path, arm=upstream.get("arm"),
            data_fingerprint=upstream.get("data_fingerprint"),
            post_data_fingerprint=ks.task_files_fingerprint(cfg.post.train_files),
        ))
