"""What the Kubeflow components (``components/*.py``) share, as plain Python: no ``kfp`` import here.

Each component body is a few lines: build the :class:`~refine_core.config.RunConfig` from the pipeline's
``config_yaml`` plus the task's artifact paths (:func:`stage_config`), open the stage's nested MLflow run under the
pipeline's parent run (:func:`open_stage_run`), call the one stage entry function, copy its result into the output
artifact (:func:`copy_dir`), and publish a few summary numbers to MLflow and to the KFP ``Metrics`` artifact
(:func:`publish_metrics`) plus a Markdown/HTML report. Everything here takes paths, dicts and duck-typed sinks, so
it is tested without kfp, and ``refine_core`` keeps its rule that nothing in it imports ``kfp``.

MLflow layout of one pipeline run::

    <cfg.name>-pipeline            parent run: tags kfp.run_id, kfp.pipeline, refine.role=pipeline; the config
      ├─ <cfg.name>-train-refine   nested run per stage: tags kfp.run_id, kfp.task, refine.stage, data fingerprint
      ├─ <cfg.name>-train-refine-baseline
      └─ ...

Artifacts carry the MLflow run ids in their metadata (``mlflow_run_id``, ``mlflow_parent_run_id``), so a person
looking at a KFP artifact finds its MLflow run, and the registry step can point the model version at the run that
logged the model.

The arms' comparison (``compare_report`` and its helpers) lives in :mod:`refine_core.evaluation.comparison`, a pure
function of numbers; it is imported here so that the ``compare-report`` component reaches everything through ``ks``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from refine_core import runtime
from refine_core.config import RunConfig, from_dict, parse_overrides, to_dict
from refine_core.evaluation.comparison import METRIC_GLOSSARY, compare_report, flat_scores, midtrain_scores  # noqa: F401
from refine_core.evaluation.report import inline_png, training_curves
from refine_core.tracking import NullTracker, Tracker, make_tracker, redact, resolve_tracking_uri

logger = logging.getLogger(__name__)

# Tags that tie MLflow runs to the KFP run and task (the KFP UI shows the same ids).
KFP_RUN_TAG = "kfp.run_id"
KFP_TASK_TAG = "kfp.task"
KFP_PIPELINE_TAG = "kfp.pipeline"
ROLE_TAG = "refine.role"
PIPELINE_ROLE = "pipeline"
# Where a component's stage writes checkpoints before the final model is copied into the output artifact: a fresh
# directory under $REFINE_WORK_DIR if set, else under the system temp dir (a pod mounts an emptyDir on /tmp,
# pipelines/_k8s.py).
WORK_DIR_ENV = "REFINE_WORK_DIR"
# Set to 1 to keep the working directories (they are removed when the component's process exits).
KEEP_WORK_DIR_ENV = "REFINE_KEEP_WORK_DIR"


class MetricSink(Protocol):
    """What a KFP ``Output[Metrics]`` offers: ``log_metric(name, value)``."""

    def log_metric(self, metric: str, value: float) -> None: ...


@dataclass(frozen=True)
class KfpContext:
    """Which pipeline run and task a component runs in; empty strings when called outside a pipeline.

    Attributes:
        parent_run_id: the pipeline's MLflow parent run (``""``: the stage run is not nested).
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` at run time.
        task_name: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER`` at run time.
    """

    parent_run_id: str = ""
    kfp_run_id: str = ""
    task_name: str = ""

    def tags(self) -> dict[str, str]:
        """The KFP tags for an MLflow run (only the known ones)."""
        tags = {KFP_RUN_TAG: self.kfp_run_id, KFP_TASK_TAG: self.task_name}
        return {k: v for k, v in tags.items() if v}



def config_from_yaml(config_yaml: str, overrides: Sequence[str] = (), settings: Mapping[str, Any] | None = None
                     ) -> RunConfig:
    """A validated :class:`RunConfig` from YAML text, ``key=value`` overrides and already-typed dotted settings.

    Args:
        config_yaml: the experiment YAML (what ``refine pipeline run/submit`` passes as the pipeline parameter).
        overrides: ``ntp.steps=20``-style strings, values read as YAML (as on the ``refine`` command line).
        settings: dotted key -> value, applied last and not parsed (paths stay strings whatever they contain).

    Returns:
        The config; a bad key or value raises :class:`~refine_core.config.ConfigError` naming it.
    """
    tree = yaml.safe_load(config_yaml) if config_yaml.strip() else {}
    if not isinstance(tree, dict):
        raise ValueError(f"config_yaml must hold a mapping at the top level, got {type(tree).__name__}")
    for key, value in [*parse_overrides(list(overrides)), *(settings or {}).items()]:
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"setting {key!r}: {part!r} is not a section of the config")
        node[leaf] = value
    return from_dict(RunConfig, tree)


def work_dir(stage: str) -> Path:
    """A fresh directory for a stage's checkpoints: under ``$REFINE_WORK_DIR`` if set, else the system temp dir.

    It is removed when the process exits (a component runs in its own process; what matters has been copied into
    the output artifact by then), unless ``$REFINE_KEEP_WORK_DIR`` is ``1``.
    """
    base = os.environ.get(WORK_DIR_ENV) or None
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"refine-{stage}-", dir=base))
    if os.environ.get(KEEP_WORK_DIR_ENV) != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def stage_config(
    config_yaml: str,
    stage: str,
    *,
    prepared_dir: str | None = None,
    model_dir: str | None = None,
    overrides: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
) -> RunConfig:
    """The config a component runs its stage with.

    Args:
        config_yaml: the pipeline's config parameter.
        stage: the stage name, used for the working directory's name.
        prepared_dir: an input ``Dataset`` path holding prepared shards (becomes ``data.prepared_dir``).
        model_dir: an input ``Model`` path in HF layout (becomes ``model.source``; the checkpoint's own
            ``config.json`` and tokenizer then win over ``model.config`` and ``model.tokenizer``).
        overrides: extra ``key=value`` strings.
        settings: extra typed dotted settings (e.g. ``{"refine.nsp_update": False}``).

    Returns:
        The config with ``output_dir`` set to a fresh working directory (:func:`work_dir`).
    """
    values: dict[str, Any] = {"output_dir": str(work_dir(stage))}
    if prepared_dir is not None:
        values["data.prepared_dir"] = prepared_dir
    if model_dir is not None:
        values.update({"model.source": model_dir, "model.tokenizer": None, "model.config": {}})
    values.update(settings or {})
    return config_from_yaml(config_yaml, overrides, values)


def training_arm(stage: str, baseline: bool = False) -> tuple[str, str, dict[str, Any]]:
    """``(run name, arm, settings)`` of a mid-training task: the REFINE stage, its NTP-only baseline arm
    (``train-refine`` with ``refine.nsp_update=false``), or ``train-ntp``.

    Raises:
        ValueError: an unknown stage, or ``baseline`` with a stage other than ``train-refine``.
    """
    if stage == "train-refine":
        if baseline:
            return f"{stage}-baseline", "ntp-baseline", {"refine.nsp_update": False}
        return stage, "refine", {"refine.nsp_update": True}
    if stage == "train-ntp" and not baseline:
        return stage, "ntp", {}
    raise ValueError(
        f"stage={stage!r} baseline={baseline}: use train-refine (optionally baseline=True for the NTP-only arm) or "
        "train-ntp; the other stages do not run data-parallel."
    )


def config_sha256(cfg: RunConfig) -> str:
    """A hash of the resolved config (paths that differ per task, i.e. ``output_dir``, left out)."""
    tree = to_dict(cfg)
    tree.pop("output_dir", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def task_files_fingerprint(patterns: Sequence[str]) -> str:
    """A short hash of the contents of the task files that ``patterns`` name (``""`` when there are none)."""
    if not patterns:
        return ""
    from refine_core.data.tasks import expand_task_files

    digest = hashlib.sha256()
    for path in expand_task_files(patterns):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def prepared_data_fingerprint(prepared_dir: str | os.PathLike[str]) -> str:
    """The fingerprint of prepared shards (what the training stages tag their runs with)."""
    from refine_core.data.shards import data_fingerprint, load_manifest

    return data_fingerprint(load_manifest(prepared_dir))



def open_pipeline_run(cfg: RunConfig, pipeline: str, kfp_run_id: str) -> str:
    """Create the MLflow parent run of one pipeline run and leave it RUNNING; returns its id (``""``: no tracking).

    :func:`close_pipeline_run`, the pipeline's exit task, ends it with the pipeline's final state.
    """
    tracker = make_tracker(
        cfg, PIPELINE_ROLE, {ROLE_TAG: PIPELINE_ROLE, KFP_RUN_TAG: kfp_run_id, KFP_PIPELINE_TAG: pipeline}
    )
    tracker.log_config(cfg)
    return tracker.run_id or ""


def close_pipeline_run(cfg: RunConfig, kfp_run_id: str, state: str) -> str | None:
    """End the parent run of ``kfp_run_id`` with the KFP final state (SUCCEEDED -> FINISHED, CANCELED -> KILLED,
    anything else -> FAILED).

    The exit task cannot take the parent run id from another task (KFP forbids that), so the run is found by its
    ``kfp.run_id`` tag. Returns the run id, or ``None`` when tracking is off or no such run exists (the first task
    failed before creating it).
    """
    if cfg.tracking.backend == "none" or not kfp_run_id:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{ROLE_TAG}` = '{PIPELINE_ROLE}' and tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'",
        max_results=1,
    )
    if not runs:
        logger.warning("no MLflow parent run tagged %s=%s; nothing to close", KFP_RUN_TAG, kfp_run_id)
        return None
    run_id = runs[0].info.run_id
    upper = state.upper()
    status = "FINISHED" if upper in ("SUCCEEDED", "SUCCESS") else "KILLED" if upper.startswith("CANCEL") else "FAILED"
    client.set_tag(run_id, "kfp.final_state", state)
    client.set_terminated(run_id, status=status)
    logger.info("MLflow parent run %s %s (KFP state %s)", run_id, status, state)
    return run_id


def open_stage_run(cfg: RunConfig, stage: str, ctx: KfpContext, extra_tags: Mapping[str, Any] | None = None
                   ) -> Tracker:
    """The nested MLflow run of one stage: under ``ctx.parent_run_id``, tagged with the KFP run id and task name.

    Use it as a context manager so that a failing stage closes its run FAILED.
    """
    return make_tracker(cfg, stage, {**ctx.tags(), **(extra_tags or {})}, parent_run_id=ctx.parent_run_id or None)


def log_files_to_run(cfg: RunConfig, run_id: str, files: Sequence[str | os.PathLike[str]], artifact_path: str
                     ) -> None:
    """Add files to an existing run (e.g. the parent) without changing its status; no-op without a run id."""
    if not run_id or cfg.tracking.backend == "none":
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri))
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path)


def publish_metrics(
    metrics: Mapping[str, float | int | None],
    sink: MetricSink | None = None,
    tracker: Tracker | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Send the same summary numbers to the KFP ``Metrics`` artifact and the stage's MLflow run.

    Args:
        metrics: name -> value; ``None`` and non-finite values are dropped (KFP metadata cannot hold NaN).
        sink: an ``Output[Metrics]`` (anything with ``log_metric``), or ``None``.
        tracker: the stage's run, or ``None`` when the stage itself already logged these values.
        step: the MLflow step to log at.

    Returns:
        The values that were published.
    """
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    for name, value in clean.items():
        if sink is not None:
            sink.log_metric(name, value)
    if tracker is not None and clean:
        tracker.log_metrics(clean, step=step)
    return clean


def artifact_metadata(tracker: Tracker, ctx: KfpContext, stage: str, **values: Any) -> dict[str, Any]:
    """Metadata for an output artifact: the stage, its MLflow run ids and ``values`` (``None`` dropped)."""
    meta: dict[str, Any] = {
        "stage": stage,
        "mlflow_run_id": tracker.run_id or "",
        "mlflow_parent_run_id": ctx.parent_run_id,
        "git_commit": runtime.git_commit() or "",
    }
    meta.update({k: v for k, v in values.items() if v is not None})
    return meta



def copy_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a directory's contents into ``dst`` (an output artifact path; created, may already exist)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory; the stage did not produce what the component copies")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a report to an output artifact path (its parent is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_summary(results_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``summary.json`` of an evaluation results directory (what ``evaluate``/``ttt`` write)."""
    path = Path(results_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the results Dataset of a ttt-evaluate task")
    return json.loads(path.read_text())



def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.4g}"
    return "–" if value is None else str(value)


def _run_line(tracker: Tracker, ctx: KfpContext) -> str:
    parts = [f"MLflow run `{tracker.run_id}`" if tracker.run_id else "MLflow tracking off"]
    if ctx.parent_run_id:
        parts.append(f"parent run `{ctx.parent_run_id}`")
    if ctx.kfp_run_id:
        parts.append(f"KFP run `{ctx.kfp_run_id}`, task `{ctx.task_name}`")
    return "; ".join(parts)


def training_report(stage: str, steps: int, final_eval_loss: float | None, history: Sequence[Mapping[str, float]],
                    tracker: Tracker, ctx: KfpContext, max_rows: int = 12) -> str:
    """A Markdown report of a training stage: the summary and a thinned table of the logged history.

    Args:
        stage: the stage name.
        steps: optimizer/REFINE steps taken.
        final_eval_loss: the last held-out loss (``None`` when the stage has none).
        history: per-step metric dicts (``TrainResult.history``).
        tracker: the stage's run (for its id).
        ctx: the KFP context.
        max_rows: at most this many history rows (evenly spaced, the last one always shown).
    """
    lines = [f"# {stage}", "", _run_line(tracker, ctx), "", f"- steps: {steps}",
             f"- final held-out loss: {_fmt(final_eval_loss)}", ""]
    with tempfile.TemporaryDirectory(prefix="refine-curves-") as tmp:  # the curves, inlined for the KFP UI
        png = training_curves(history, Path(tmp) / "curves.png", title=stage) if history else None
        if png is not None:
            lines += [inline_png(png, f"{stage} training curves"), ""]
    if history:
        keys = [k for k in ("step", "eval/loss", "ntp/loss", "refine/ntp_loss", "refine/nsp_loss",
                            "refine/reward_mean", "post/sft_loss") if any(k in h for h in history)]
        stride = max(1, math.ceil(len(history) / max_rows))
        rows = [h for i, h in enumerate(history) if i % stride == 0 or i == len(history) - 1]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(h.get(k)) for k in keys) + " |" for h in rows]
    return "\n".join(lines) + "\n"


def eval_report(stage: str, table: str, summary: Mapping[str, Any], tracker: Tracker, ctx: KfpContext,
                heatmap: str | os.PathLike[str] | None = None) -> str:
    """A Markdown report of an evaluation: the results table (×100) and the per-task example counts."""
    counts = summary.get("counts", {})
    lines = [f"# {stage}", "", _run_line(tracker, ctx), "", table, ""]
    lines += [f"- {task}: {n} examples" for task, n in counts.items()]
    if heatmap is not None and Path(heatmap).is_file():  # the NIAH heatmap, inlined for the KFP UI
        lines += ["", inline_png(heatmap, "RULER NIAH heatmap")]
    return "\n".join(lines) + "\n"


def smoke_test_caveat(cfg: RunConfig) -> str:
    """What a report of a tiny from-scratch run must say about itself (empty for a real run)."""
    if cfg.model.source is None and cfg.data.max_tokens < 4096:
        return (f"This is a smoke test of the workflow ({cfg.name}: a tiny model trained from scratch for a minute on "
                f"{cfg.data.max_tokens}-token generated documents), not the paper's result; configs/"
                "delta_net-1.3b-16k.yaml is the paper's scale.")
    return ""


def data_report(counts: Mapping[str, int], stats: Mapping[str, Any], fingerprint: str, prepared_dir: str) -> str:
    """A Markdown report of a data preparation: documents per split, the filter's counts, the fingerprint."""
    lines = ["# prepare-data", "", f"- fingerprint: `{fingerprint}`", f"- location: `{prepared_dir}`"]
    lines += [f"- {split} documents: {n}" for split, n in counts.items()]
    lines += [f"- {key}: {value}" for key, value in stats.items() if isinstance(value, (int, float))]
    return "\n".join(lines) + "\n"



def export_training(
    result: Any,
    stage: str,
    tracker: Tracker,
    ctx: KfpContext,
    model_path: str,
    metrics_sink: MetricSink | None,
    report_path: str | None,
    **metadata: Any,
) -> dict[str, Any]:
    """What every training component does with a ``TrainResult``: copy the final model into the ``Model``
    artifact, publish ``train/steps`` and ``train/final_eval_loss`` (KFP and MLflow), write the Markdown report.

    Returns:
        The ``Model`` artifact's metadata (MLflow run ids, steps, loss, ``metadata``).
    """
    copy_dir(result.model_dir, model_path)
    publish_metrics({"train/steps": result.steps, "train/final_eval_loss": result.final_eval_loss},
                    metrics_sink, tracker, step=result.steps)
    if report_path is not None:
        write_text(report_path, training_report(stage, result.steps, result.final_eval_loss, result.history,
                                                tracker, ctx))
    # the held-out loss before the first step (a fresh run logs it at step 0): the starting model's, for the
    # comparison of trained arms against what they started from
    initial = next((h["eval/loss"] for h in result.history if h.get("step") == 0.0 and "eval/loss" in h), None)
    # the recall probe (refine_core.training.recall_probe) before the first step and at the last evaluation
    recall = [h for h in result.history if "eval/recall_acc" in h]
    probe = {}
    for key in ("recall_acc", "first_mention_acc"):
        probe[f"initial_{key}"] = next((h[f"eval/{key}"] for h in recall if h.get("step") == 0.0), None)
        probe[f"final_{key}"] = recall[-1][f"eval/{key}"] if recall and recall[-1].get("step") != 0.0 else None
    # post-training has no held-out loss: its last task-SFT loss (answer tokens given the prompt) says how it ended
    sft = next((h["post/sft_loss"] for h in reversed(result.history) if "post/sft_loss" in h), None)
    return artifact_metadata(tracker, ctx, stage, steps=result.steps, final_eval_loss=result.final_eval_loss,
                             initial_eval_loss=initial, final_sft_loss=sft, **probe, **metadata)


def export_evaluation(
    result: Any,
    stage: str,
    tracker: Tracker,
    ctx: KfpContext,
    results_path: str,
    metrics_sink: MetricSink | None,
    report_path: str | None,
    **metadata: Any,
) -> dict[str, Any]:
    """What the evaluation component does with an ``EvalResult``: copy the results directory (predictions,
    ``summary.json``, ``summary.md``, plots) into the ``Dataset`` artifact, publish the scores to KFP (the stage
    already logged them to MLflow), write the Markdown report.

    Returns:
        The results artifact's metadata (MLflow run ids, the scores, ``metadata``).
    """
    copy_dir(result.output_dir, results_path)
    scores = publish_metrics(flat_scores(result.summary), metrics_sink)
    if report_path is not None:
        write_text(report_path, eval_report(stage, result.table, result.summary, tracker, ctx,
                                            heatmap=Path(result.output_dir) / "niah_heatmap.png"))
    return artifact_metadata(tracker, ctx, stage, scores=scores, **metadata)


def log_reports(cfg: RunConfig, tracker: Tracker, parent_run_id: str, reports: Mapping[str, str],
                artifact_path: str = "reports") -> None:
    """Log text reports (file name -> content) to the stage run and, where a person looks first, the parent run."""
    with tempfile.TemporaryDirectory(prefix="refine-reports-") as tmp:
        paths = [write_text(Path(tmp) / name, text) for name, text in reports.items()]
        for path in paths:
            tracker.log_artifact(path, artifact_path)
        log_files_to_run(cfg, parent_run_id, paths, artifact_path)


def registry_tags(cfg: RunConfig, model_metadata: Mapping[str, Any], ctx: KfpContext,
                  scores: Mapping[str, float] | None = None) -> dict[str, str]:
    """Tags of a registered model version: data fingerprints, config hash, git commit, source runs, scores."""
    tags = {
        "refine.data_fingerprint": model_metadata.get("data_fingerprint"),
        "refine.post_data_fingerprint": model_metadata.get("post_data_fingerprint"),
        "refine.config_sha256": config_sha256(cfg),
        "refine.config_name": cfg.name,
        "refine.git_commit": runtime.git_commit() or model_metadata.get("git_commit"),
        "refine.arm": model_metadata.get("arm"),
        "refine.source_stage": model_metadata.get("stage"),
        "refine.source_run_id": model_metadata.get("mlflow_run_id"),
        **ctx.tags(),
        **{name: f"{value:.4g}" for name, value in (scores or {}).items()},
    }
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}



def register_model_version(
    cfg: RunConfig,
    model_dir: str | os.PathLike[str],
    name: str,
    tracker: Tracker,
    tags: Mapping[str, Any],
    source_run_id: str = "",
) -> str:
    """Register ``model_dir`` in the MLflow model registry as a new version of ``name``.

    The version's source is the ``model`` artifact of ``source_run_id`` (the training run that already logged the
    final model), so the weights are not uploaded twice; without one, ``model_dir`` is logged into ``tracker``'s
    run first. Tags are redacted like run tags.

    Args:
        cfg: the run config (for the tracking URI).
        model_dir: the final model in HF layout.
        name: the registered model's name (created if missing).
        tracker: the registering stage's run.
        tags: version tags (data fingerprint, config hash, git commit, ...).
        source_run_id: the run whose ``model`` artifact holds these weights, if any.

    Returns:
        ``models:/<name>/<version>``, or ``""`` when tracking is off.
    """
    if isinstance(tracker, NullTracker) or tracker.run_id is None:
        logger.info("tracking is off: model %s is not registered", name)
        return ""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri))
    run_id = source_run_id
    if not run_id or not client.list_artifacts(run_id, "model"):
        tracker.log_model(model_dir)
        run_id = tracker.run_id
    try:
        client.create_registered_model(name, description="REFINE fast-weight LM (refine_core)")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    clean = {k: str(v) for k, v in redact(tags).items() if v not in (None, "")}
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=clean)
    uri = f"models:/{name}/{version.version}"
    tracker.set_tags({"refine.registered_model": uri})
    logger.info("registered %s (source runs:/%s/model)", uri, run_id)
    return uri


def evaluation_entry(cfg: RunConfig) -> tuple[str, Callable[[RunConfig, Tracker], Any]]:
    """The stage that evaluates ``cfg``: ``ttt`` (test-time training, then answer) or ``evaluate`` when
    ``ttt.method`` is ``none`` (plain evaluation with fixed weights)."""
    if cfg.ttt.method == "none":
        from refine_core.stages.evaluate import STAGE, evaluate

        return STAGE, evaluate
    from refine_core.stages.ttt import STAGE, test_time_train

    return STAGE, test_time_train
