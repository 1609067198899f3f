"""Component ``compare-report``: both arms' scores and held-out losses side by side (Markdown and HTML)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import REFINE_CPU_IMAGE


@dsl.component(base_image=REFINE_CPU_IMAGE, install_kfp_package=False)
def compare_report(
    config_yaml: str,
    baseline_results: Input[Dataset],
    refine_results: Input[Dataset],
    baseline_model: Input[Model],
    refine_model: Input[Model],
    report: Output[Markdown],
    html_report: Output[HTML],
    metrics: Output[Metrics],
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
):
    """Compare the NTP-baseline and REFINE arms: evaluation scores (×100) of their ``ttt-evaluate`` results and
    the mid-training held-out loss and recall probe from their ``train-refine`` models (beside those of the model
    both started from, when the run started fresh), with differences to the baseline.

    The report goes to the KFP UI (Markdown and HTML outputs), to a nested MLflow run and to the parent run's
    ``reports/`` artifacts, where a person browsing the experiment looks first.

    Args:
        config_yaml: the experiment config (for the tracking settings).
        baseline_results: the baseline arm's ``ttt-evaluate`` results.
        refine_results: the REFINE arm's ``ttt-evaluate`` results.
        baseline_model: the baseline arm's mid-trained model (its metadata holds the held-out loss).
        refine_model: the REFINE arm's mid-trained model.
        report: the comparison in Markdown.
        html_report: the same as an HTML page.
        metrics: ``compare/refine_minus_ntp-baseline/<metric>`` differences.
        parent_run_id: the pipeline's MLflow parent run.
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
    """
    from refine_core import kfp_support as ks

    cfg, ctx = ks.config_from_yaml(config_yaml), ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    arms = {
        label: {**ks.flat_scores(ks.read_summary(results.path)), **ks.midtrain_scores(mid.metadata, "final")}
        for label, results, mid in (("ntp-baseline", baseline_results, baseline_model),
                                    ("refine", refine_results, refine_model))
    }
    start = ks.midtrain_scores(baseline_model.metadata, "initial")
    if start:  # where both arms started: the same model before its first step
        arms = {"start model": start, **arms}
    markdown, page, deltas = ks.compare_report(arms, baseline="ntp-baseline", caveat=ks.smoke_test_caveat(cfg))
    ks.write_text(report.path, markdown)
    ks.write_text(html_report.path, page)
    with ks.open_stage_run(cfg, "compare", ctx) as tracker:
        ks.publish_metrics(deltas, metrics, tracker)
        ks.log_reports(cfg, tracker, parent_run_id, {"compare.md": markdown, "compare.html": page})
