"""Experiment tracking behind a small protocol: MLflow in production, a null tracker in tests (style.md §13).

Stages receive a :class:`Tracker` and never branch on whether tracking is on::

    with make_tracker(cfg, "train-ntp", {"refine.data_fingerprint": fp}) as tracker:
        tracker.log_config(cfg)
        tracker.log_metrics({"ntp/loss": 2.31, "ntp/lr": 1e-6}, step=10)
        tracker.log_artifacts(ckpt_dir, artifact_path="checkpoints/step_00000010")
    # an exception inside the block marks the run FAILED and propagates

With no tracking URI configured the MLflow backend uses an embedded store that needs no server:
``./mlruns/mlflow.db`` (sqlite) with artifacts under ``./mlruns/artifacts/<experiment>/<run id>/artifacts``. Browse
it with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

Every call uses ``MlflowClient`` with an explicit run id (no fluent ``mlflow.start_run`` state), so several trackers
can live in one process. Values of params and tags whose key looks secret are redacted before they leave the process,
and environment variables are never logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from refine_core import runtime
from refine_core.config import RunConfig, TrackingConfig, flatten, to_dict
from refine_core.redaction import redact
from refine_core.system_metrics import check_system_metrics, start_monitor
from refine_core.tracking_offline import (
    SYNCED_SUFFIX,
    OfflineJournal,
    TrackingUnavailable,
    bounded_http,
    read_journal,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

# The experiment tag MLflow 3's UI reads to pick the view it opens an experiment in (its JS names the kinds
# genai_development and custom_model_development); ours are model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

DEFAULT_TRACKING_DIR = "mlruns"
DEFAULT_DB_NAME = "mlflow.db"
CONFIG_ARTIFACT = "config.yaml"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_T = TypeVar("_T")

@runtime_checkable
class Tracker(Protocol):
    """What stages may call. Metric names are slash-separated: ``ntp/loss``, ``refine/reward/mean``."""

    @property
    def run_id(self) -> str | None: ...

    def log_config(self, cfg: Any) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, model_dir: str | Path, artifact_path: str = "model") -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> Tracker: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class _ContextMixin:
    """``with tracker:`` closes FINISHED, FAILED on an exception, KILLED on Ctrl-C; the exception propagates."""

    def close(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")


class NullTracker(_ContextMixin):
    """Accepts every call and does nothing; used for ``tracking.backend=none``, tests and non-zero ranks."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_config(self, cfg: Any) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_model(self, model_dir: str | Path, artifact_path: str = "model") -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - mlflow-skinny is a core dependency; this guards odd installs
        raise ImportError(
            "tracking.backend=mlflow needs the MLflow client: `pip install mlflow-skinny==3.17.2` (a tracking "
            "server) or `pip install 'refine-core[mlflow]'` (also the embedded sqlite store), or set "
            "tracking.backend=none."
        ) from exc
    return mlflow


# Stores that MLflow opens through SQLAlchemy (the embedded sqlite store among them). They need full MLflow (the
# `mlflow` extra: SQLAlchemy, alembic); mlflow-skinny, the core dependency and all the images carry, only talks to
# a tracking server, and would fail later with a less helpful error.
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def check_store_support(uri: str) -> str:
    """``uri``, once it is clear that this installation can open it.

    Raises:
        ImportError: ``uri`` is a database store (``sqlite:///...``, ``postgresql://...``) and SQLAlchemy or alembic
            is missing (mlflow-skinny without the ``mlflow`` extra).
    """
    import importlib.util

    scheme = uri.partition(":")[0].partition("+")[0].lower()
    if scheme in _DATABASE_SCHEMES:
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f"the MLflow store {uri} is a database, which needs full MLflow ({' and '.join(missing)} not "
                "installed): `pip install 'refine-core[mlflow]'` (mlflow==3.17.2), or point MLFLOW_TRACKING_URI "
                "(or tracking.tracking_uri) at a tracking server (http://...), or set tracking.backend=none."
            )
    return uri


def default_tracking_uri() -> str:
    """The embedded store ``sqlite:///<cwd>/mlruns/mlflow.db`` (absolute, so later ``chdir`` calls don't move it)."""
    return f"sqlite:///{(Path.cwd() / DEFAULT_TRACKING_DIR / DEFAULT_DB_NAME).resolve()}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`.

    Raises:
        ImportError: the store needs full MLflow and only mlflow-skinny is installed (:func:`check_store_support`).
    """
    return check_store_support(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


def _local_sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for servers, in-memory and other stores)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):])


def _param_value(value: Any) -> str:
    """MLflow params are strings; lists/dicts become JSON so they stay readable and parseable."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(to_dict(value), default=str)
    return str(value)


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = f"...[truncated, {len(value)} chars; see {CONFIG_ARTIFACT}]"
    return value[: limit - len(marker)] + marker


class MlflowTracker(_ContextMixin):
    """One MLflow run, driven through ``MlflowClient`` with explicit run ids.

    Args:
        experiment: experiment name; ``None`` means ``$MLFLOW_EXPERIMENT_NAME``, else ``refine``. Ignored when
            ``parent_run_id`` is given (a nested run lives in its parent's experiment).
        tracking_uri: ``None`` means ``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///mlruns/mlflow.db``.
        run_name: the run's display name (``mlflow.runName``).
        tags: extra run tags (redacted like params).
        parent_run_id: make this a nested run under that run (``None``: ``$MLFLOW_PARENT_RUN_ID`` if set).
        run_id: continue this existing run instead of creating one (``None``: ``$MLFLOW_RUN_ID`` if set).
    """

    def __init__(
        self,
        experiment: str | None = None,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        system_metrics_interval_s: float | None = None,
    ) -> None:
        mlflow = _import_mlflow()
        from mlflow.entities import RunStatus
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
        from mlflow.utils.validation import (
            MAX_METRICS_PER_BATCH,
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
            MAX_TAG_VAL_LENGTH,
        )

        self._max_param_len = MAX_PARAM_VAL_LENGTH
        self._max_tag_len = MAX_TAG_VAL_LENGTH
        self._batch = MAX_PARAMS_TAGS_PER_BATCH
        self._metric_batch = MAX_METRICS_PER_BATCH
        self._closed = False
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        db_path = _local_sqlite_path(self.tracking_uri)
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        self.client: MlflowClient = mlflow.MlflowClient(tracking_uri=self.tracking_uri)

        run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        parent_run_id = parent_run_id or os.environ.get("MLFLOW_PARENT_RUN_ID") or None
        if run_id is not None:
            run = self.client.get_run(run_id)  # raises MlflowException naming the id if it does not exist
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._run_id: str = run.info.run_id
            self.experiment_id: str = run.info.experiment_id
            self._known_params: dict[str, str] = dict(run.data.params)
            self.set_tags(dict(tags or {}))
            logger.info("MLflow: continuing run %s (%s)", self._run_id, self.tracking_uri)
            return

        if parent_run_id is not None:
            self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or TrackingConfig().experiment
            self.experiment_id = self._get_or_create_experiment(name, db_path)
        all_tags = redact(resolve_tags(dict(tags or {})))  # adds mlflow.user / mlflow.source.* like start_run
        if parent_run_id is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_name is not None:
            all_tags[MLFLOW_RUN_NAME] = run_name
        run = self.client.create_run(self.experiment_id, tags=self._tag_values(all_tags), run_name=run_name)
        self._run_id = run.info.run_id
        self._known_params = {}
        logger.info("MLflow: run %s in experiment %s (%s)", self._run_id, self.experiment_id, self.tracking_uri)
        # MLflow's own monitor thread (system/... metrics of this run) until close()
        self._system_metrics = None
        if system_metrics_interval_s is not None:
            self._system_metrics = start_monitor(self._run_id, system_metrics_interval_s, self.tracking_uri)

    def _get_or_create_experiment(self, name: str, db_path: Path | None) -> str:
        """Experiment id for ``name``, creating it (artifacts next to a local sqlite db) when missing."""
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is None:
            location = None
            if db_path is not None:
                folder = re.sub(r"[^\w.-]+", "_", name)
                location = (db_path.parent.resolve() / "artifacts" / folder).as_uri()
            try:
                # MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts); tagged,
                # it opens on the runs, charts and models of model training.
                return self.client.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
                )
            except MlflowException:  # another process created it between our lookup and create
                existing = self.client.get_experiment_by_name(name)
                if existing is None:
                    raise
        if existing.lifecycle_stage == "active" and EXPERIMENT_KIND_TAG not in existing.tags:
            # made by an older version of this code or by hand: tag it once, so that the UI opens on the runs
            self.client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        if existing.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore --experiment-id "
                f"{existing.experiment_id}`) or set tracking.experiment to another name."
            )
        return existing.experiment_id

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def log_config(self, cfg: Any) -> None:
        """Log a config dataclass as flattened params (``ntp.lr``) plus the resolved YAML as ``config.yaml``."""
        import yaml

        tree = redact(to_dict(cfg))
        self.log_params(flatten(tree))
        self.client.log_text(self._run_id, yaml.safe_dump(tree, sort_keys=False), CONFIG_ARTIFACT)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches of MLflow's limit; long values are truncated (the full config is an artifact).

        MLflow refuses to change a param of a run. Re-logging an identical value is skipped; a different value (a
        resumed run with new settings) is skipped with a warning instead of failing the stage.
        """
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for key, value in redact(params).items():
            text = _truncate(_param_value(value), self._max_param_len)
            old = self._known_params.get(key)
            if old == text:
                continue
            if old is not None:
                logger.warning("MLflow param %r is already %r in run %s; not changing it to %r", key, old,
                               self._run_id, text)
                continue
            new[key] = text
        items = [Param(k, v) for k, v in new.items()]
        for start in range(0, len(items), self._batch):
            self.client.log_batch(self._run_id, params=items[start : start + self._batch])
        self._known_params.update(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics (floats, ints or 0-d tensors) at ``step``; names keep their slashes."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metric {key!r} has a non-scalar value {value!r}; log a float") from exc
            if not math.isfinite(number):
                logger.warning("metric %s=%s at step %d is not finite", key, number, step)
            items.append(Metric(key, number, timestamp, int(step)))
        for start in range(0, len(items), self._metric_batch):
            self.client.log_batch(self._run_id, metrics=items[start : start + self._metric_batch])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifacts (under ``artifact_path`` if given)."""
        self.client.log_artifact(self._run_id, str(path), safe_artifact_path(artifact_path))

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy a directory's contents into the run's artifacts (under ``artifact_path`` if given)."""
        self.client.log_artifacts(self._run_id, str(directory), safe_artifact_path(artifact_path))

    def log_model(self, model_dir: str | Path, artifact_path: str = "model") -> None:
        """Log a model directory (HF layout) as an MLflow ``pyfunc`` Model at ``artifact_path`` of this run.

        ``mlflow.pyfunc.load_model("runs:/<run>/model")`` (or the registered ``models:/<name>/<version>``) then
        generates text (:mod:`refine_core.serving`); the HF files sit inside it under ``artifacts/<dir name>/``.
        """
        import tempfile

        import mlflow.pyfunc

        code = Path(__file__).with_name("mlflow_model.py")  # a model from code: nothing pickled
        with tempfile.TemporaryDirectory(prefix="refine-mlflow-model-") as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(path=str(local), python_model=str(code), signature=pyfunc_signature(),
                                     artifacts={HF_ARTIFACT: str(model_dir)})
            self.log_artifacts(local, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified, secrets redacted)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._tag_values(redact(tags)).items()]
        for start in range(0, len(items), self._batch):
            self.client.log_batch(self._run_id, tags=items[start : start + self._batch])

    def _tag_values(self, tags: Mapping[str, Any]) -> dict[str, str]:
        return {k: _truncate(_param_value(v), self._max_tag_len) for k, v in tags.items() if v is not None}

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``; later calls do nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_system_metrics", None) is not None:
            self._system_metrics.finish()  # its last sample is logged before the run ends
        self.client.set_terminated(self._run_id, status=status)
        logger.info("MLflow: run %s %s", self._run_id, status)


HF_ARTIFACT = "hf"  # the artifact key of a logged model's Hugging Face layout directory
DEFAULT_MAX_NEW_TOKENS = 32


def pyfunc_signature() -> Any:
    """The logged model's interface (refine_core.serving): a list of prompts in, one generated text each out,
    ``max_new_tokens`` a parameter (default 32)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


def safe_artifact_path(artifact_path: str | None) -> str | None:
    """``artifact_path`` if it stays inside the run's artifact root (relative, no ``..``); refused otherwise."""
    if artifact_path is None:
        return None
    parts = artifact_path.replace("\\", "/").split("/")
    if artifact_path.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise ValueError(
            f"artifact path {artifact_path!r} would leave the run's artifact folder; use a relative path without '..'"
        )
    return artifact_path


def make_tracker(
    cfg: RunConfig,
    stage: str,
    extra_tags: Mapping[str, Any] | None = None,
    *,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> Tracker:
    """The tracker a stage should use for ``cfg``.

    ``tracking.backend=none`` and processes with ``$RANK`` != 0 get a :class:`NullTracker`. Otherwise an
    :class:`MlflowTracker` run named ``{cfg.name}-{stage}`` with tags ``refine.stage``, ``refine.run_name``,
    ``refine.git_commit`` (when known), ``cfg.tracking.tags`` and ``extra_tags`` (e.g. a data fingerprint).

    The experiment is ``tracking.experiment``; when that is left at its default (``refine``),
    ``$MLFLOW_EXPERIMENT_NAME`` wins so a deployment can group runs without editing configs.

    Args:
        cfg: the run configuration.
        stage: the stage name (``train-ntp``).
        extra_tags: more tags for this run.
        parent_run_id: nest this run under a pipeline's parent run (else ``$MLFLOW_PARENT_RUN_ID``, if set).
        run_id: continue an existing run (else ``$MLFLOW_RUN_ID``, if set).
    """
    if cfg.tracking.backend == "none" or int(os.environ.get("RANK", "0") or 0) != 0:
        return NullTracker()
    tags: dict[str, Any] = {"refine.stage": stage, "refine.run_name": cfg.name}
    commit = runtime.git_commit()
    if commit:
        tags["refine.git_commit"] = commit
    tags.update(cfg.tracking.tags)
    tags.update(extra_tags or {})
    experiment: str | None = cfg.tracking.experiment
    if experiment == TrackingConfig().experiment and os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        experiment = None  # let the environment choose
    bounded_http(cfg.tracking.request_timeout_s, cfg.tracking.max_retries)
    tracking = cfg.tracking
    system_metrics = check_system_metrics(tracking.system_metrics_interval_s) if tracking.system_metrics else None
    run_name = f"{cfg.name}-{stage}"
    header = {
        "experiment": experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.tracking.experiment,
        "run_name": run_name, "tags": redact(tags), "tracking_uri": resolve_tracking_uri(cfg.tracking.tracking_uri),
        "parent_run_id": parent_run_id,
    }
    journal = Path(cfg.output_dir) / "tracking-offline" / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"

    def open_real() -> MlflowTracker:
        return MlflowTracker(
            experiment=experiment,
            tracking_uri=cfg.tracking.tracking_uri,
            run_name=run_name,
            tags=tags,
            parent_run_id=parent_run_id,
            run_id=run_id,
            system_metrics_interval_s=system_metrics,
        )

    return ResilientTracker(open_real, journal, header, offline=cfg.tracking.offline)


# ------------------------------------------------------------------ when the tracking server fails
class ResilientTracker(_ContextMixin):
    """A tracker that falls back to an :class:`OfflineJournal` when the real one fails (see the module docstring).

    Args:
        open_real: builds the real tracker (an :class:`~refine_core.tracking.MlflowTracker`); may raise.
        journal_path: where the journal goes if it is needed.
        header: what the journal records about the run (experiment, run name, tags, tracking URI).
        offline: fall back (``True``) or fail the stage with one clear line (``False``).
    """

    def __init__(self, open_real: Callable[[], Any], journal_path: Path, header: Mapping[str, Any],
                 offline: bool = True) -> None:
        self._journal_path, self._header, self._offline = journal_path, dict(header), offline
        self._journal: OfflineJournal | None = None
        self._real = None
        try:
            self._real = open_real()
        except Exception as exc:  # noqa: BLE001  (any failure of the tracking server, whatever its client raises)
            self._fall_back("opening the run", exc)

    @property
    def offline(self) -> bool:
        return self._journal is not None

    def _fall_back(self, doing: str, exc: BaseException) -> None:
        uri = self._header.get("tracking_uri")
        if not self._offline:
            raise TrackingUnavailable(
                f"tracking server {uri} failed while {doing} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                "); check tracking.tracking_uri / $MLFLOW_TRACKING_URI, or set tracking.offline=true to keep "
                "training and upload later"
            ) from exc
        self._journal = OfflineJournal(self._journal_path, self._header, redact)
        self._real = None
        logger.warning(
            "tracking server %s failed while %s (%s: %s); training goes on and tracking continues offline into %s; "
            "upload it later with: refine tracking sync %s", uri, doing, type(exc).__name__,
            str(exc).splitlines()[0][:160] if str(exc) else "", self._journal_path, self._journal_path,
        )

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._real is not None:
            try:
                return getattr(self._real, name)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                if isinstance(exc, (TypeError, ValueError)) and not _looks_remote(exc):
                    raise  # our own misuse (a non-scalar metric, a bad status): a bug to see, not an outage
                self._fall_back(f"{name}", exc)
        return getattr(self._journal, name)(*args, **kwargs)

    @property
    def run_id(self) -> str | None:
        return self._real.run_id if self._real is not None else None

    def log_config(self, cfg: Any) -> None:
        self._call("log_config", cfg)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", directory, artifact_path)

    def log_model(self, model_dir: str | Path, artifact_path: str = "model") -> None:
        self._call("log_model", model_dir, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", tags)

    def close(self, status: str = "FINISHED") -> None:
        self._call("close", status)
        if self._journal is not None:
            logger.warning("tracking ran offline: upload %s with `refine tracking sync %s`", self._journal_path,
                           self._journal_path)



def _looks_remote(exc: BaseException) -> bool:
    """MLflow wraps server and connection failures in exceptions whose names or causes say so."""
    text = f"{type(exc).__module__}.{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("mlflow", "connection", "http", "timeout", "max retries"))


def sync_journal(path: str | Path, tracking_uri: str | None = None) -> str:
    """Replay journal ``path`` into the tracking server as one new run; returns its run id.

    The journal is renamed ``*.synced`` afterwards, so it is not uploaded twice.
    """
    path = Path(path)
    start, events = read_journal(path)
    tracker = MlflowTracker(
        experiment=start.get("experiment"), tracking_uri=tracking_uri or start.get("tracking_uri"),
        run_name=start.get("run_name"), tags={**start.get("tags", {}), "refine.synced_from": str(path)},
    )
    status = "FINISHED"
    for event in events:
        kind = event["event"]
        if kind == "params":
            tracker.log_params(event["values"])
        elif kind == "tags":
            tracker.set_tags(event["values"])
        elif kind == "metrics":
            tracker.log_metrics(event["values"], step=event["step"])
        elif kind == "model":
            if Path(event["path"]).exists():
                tracker.log_model(event["path"], event.get("artifact_path") or "model")
            else:
                logger.warning("%s: %s is gone; its model is not uploaded", path, event["path"])
        elif kind in ("artifact", "artifacts"):
            if Path(event["path"]).exists():
                getattr(tracker, f"log_{kind}")(event["path"], event.get("artifact_path"))
            else:
                logger.warning("%s: %s is gone; its artifact is not uploaded", path, event["path"])
        elif kind == "end":
            status = event["status"]
    tracker.close(status)
    path.rename(path.with_name(path.name + SYNCED_SUFFIX))
    return tracker.run_id
