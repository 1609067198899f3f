"""Component ``ttt-evaluate``: test-time training then evaluation (``refine ttt``), or plain evaluation
(``refine evaluate``) when ``ttt.method=none``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components._image import REFINE_GPU_IMAGE


@dsl.component(base_image=REFINE_GPU_IMAGE, install_kfp_package=False)
def ttt_evaluate(
    config_yaml: str,
    results: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
    model: Input[Model] | None = None,
):
    """Adapt on each batch of test prompts and answer it (``ttt.method`` refine/ntp), or answer with fixed weights
    (``none``), over every task of the config's ``eval`` section; ``model`` if given, else the config's model.

    Args:
        config_yaml: the experiment config (``eval``, ``ttt`` and, for the inner step, ``refine`` sections).
        results: predictions, ``summary.json``, ``summary.md`` (and plots); metadata: MLflow run ids, scores, arm.
        metrics: ``eval/<task>`` scores ×100 and ``eval/avg/<name>`` averages.
        report: the results table in Markdown.
        parent_run_id: the pipeline's MLflow parent run.
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        model: the model to evaluate.
    """
    from refine_core import kfp_support as ks

    upstream = dict(model.metadata) if model else {}
    cfg = ks.stage_config(config_yaml, "ttt-evaluate", model_dir=model.path if model else None)
    entry, run_stage = ks.evaluation_entry(cfg)
    stage = f"{entry}-{upstream['arm']}" if upstream.get("arm") else entry
    ctx = ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    with ks.open_stage_run(cfg, stage, ctx, {"refine.arm": upstream.get("arm", "")}) as tracker:
        result = run_stage(cfg, tracker)
        results.metadata.update(ks.export_evaluation(
            result, stage, tracker, ctx, results.path, metrics, report.path,
            arm=upstream.get("arm"), model_run_id=upstream.get("mlflow_run_id"),
        ))
