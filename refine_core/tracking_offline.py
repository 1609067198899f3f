"""A local journal of one tracked run, for when the tracking server cannot be reached.

:class:`~refine_core.tracking.ResilientTracker` writes every call of a stage's tracker here once the MLflow server
fails (JSON lines, one event each, flushed per event so that a crash loses nothing); ``refine tracking sync JOURNAL``
(:func:`refine_core.tracking.sync_journal`) replays it into a server later. :func:`bounded_http` caps MLflow's HTTP
timeout and retries so that a dead server is noticed in seconds: MLflow's own defaults (120 s, 7 retries with
backoff) held a stage for minutes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from refine_core.config import flatten, to_dict
from refine_core.errors import RunFailed

SYNCED_SUFFIX = ".synced"


class TrackingUnavailable(RunFailed):
    """The tracking server failed and ``tracking.offline`` is off: the stage stops (exit status 1 in the CLI)."""


def bounded_http(timeout_s: float, max_retries: int) -> None:
    """Short HTTP timeouts and few retries for MLflow's REST client, unless the environment chose its own."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max(0, max_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


class OfflineJournal:
    """A tracker that appends every call to a JSON-lines file (flushed per event: a crash loses nothing)."""

    def __init__(self, path: str | Path, header: Mapping[str, Any],
                 redact: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        self.path = Path(path)
        self._redact = redact
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"event": "start", "time": time.time(), **header})

    def _write(self, event: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event, default=str) + "\n")

    @property
    def run_id(self) -> str | None:
        return None

    def log_config(self, cfg: Any) -> None:
        self.log_params(flatten(self._redact(to_dict(cfg))))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write({"event": "params", "values": self._redact(params)})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._write({"event": "metrics", "step": int(step), "time": time.time(),
                     "values": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write({"event": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._write({"event": "artifacts", "path": str(Path(directory).resolve()), "artifact_path": artifact_path})

    def log_model(self, model_dir: str | Path, artifact_path: str = "model") -> None:
        self._write({"event": "model", "path": str(Path(model_dir).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._write({"event": "tags", "values": self._redact(tags)})

    def close(self, status: str = "FINISHED") -> None:
        self._write({"event": "end", "status": status, "time": time.time()})


def read_journal(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The start event and the later events of journal ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tracking journal at {path}; the stage names it when it falls back offline")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not events or events[0].get("event") != "start":
        raise ValueError(f"{path} is not a refine tracking journal (its first line is not a start event)")
    return events[0], events[1:]
