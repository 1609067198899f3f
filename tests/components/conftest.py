"""Shared fixtures of the component tests: stub KFP artifacts, a tiny config, an MLflow store in a temp dir.

Components are called through ``.python_func`` with :class:`StubArtifact` objects (a component called on its own
cannot take input artifacts in kfp.local, mlops-notes §2.6 item 2), so these tests run the real stage code
in-process in a few seconds each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from refine_core.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_PARENT_RUN_ID", "RANK")

# configs/tiny-cpu.yaml made smaller still: seconds per stage on 2 cores.
SMALLER = [
    "device=cpu",
    "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 16, synthetic_words: 60}]",
    "data.min_tokens=128",
    "data.max_tokens=128",
    "data.eval_docs=2",
    "ntp.steps=2",
    "ntp.eval_every=1",
    "ntp.eval_max_docs=2",
    "refine.steps=2",
    "refine.num_chunks=2",
    "refine.eval_every=1",
    "refine.eval_max_docs=2",
    "post.steps=1",
    "post.max_prompt_tokens=400",
    "eval.max_examples=4",
    "eval.max_seq_tokens=512",
    "tracking.experiment=component-tests",
]


class StubArtifact:
    """What a component body uses of a KFP artifact: ``path``, ``uri``, ``metadata``, ``log_metric``."""

    def __init__(self, path: Path | str, metadata: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.uri = str(path)
        self.name = Path(path).name
        self.metadata: dict[str, Any] = dict(metadata or {})

    def log_metric(self, metric: str, value: float) -> None:
        self.metadata[metric] = value


class StubStatus:
    """The ``dsl.PipelineTaskFinalStatus`` an exit task receives."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.pipeline_job_resource_name = "local"
        self.pipeline_task_name = "exit-handler-1"
        self.error_code = None
        self.error_message = None


def tiny_config_yaml(*overrides: str) -> str:
    """The YAML text a pipeline passes as ``config_yaml``: configs/tiny-cpu.yaml, smaller, absolute task paths."""
    cfg = load_config(TINY_CONFIG, [*SMALLER, *overrides])
    cfg.post.train_files = [str(REPO / p) for p in cfg.post.train_files]
    cfg.eval.task_files = [str(REPO / p) for p in cfg.eval.task_files]
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded MLflow store per test module, in ``$MLFLOW_TRACKING_URI`` (task subprocesses inherit it); the
    environment is restored afterwards, so other test modules keep their own tracking settings."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for name in MLFLOW_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def mlflow_client(tracking_uri: str):
    mlflow = pytest.importorskip("mlflow")
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def stub(tmp_path: Path, name: str, metadata: dict[str, Any] | None = None) -> StubArtifact:
    """An output artifact whose path does not exist yet, as KFP hands it to a component."""
    return StubArtifact(tmp_path / name, metadata)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Silence kfp's "non-Python base image" warning (our image names lack "python"; mlops-notes §2.6 item 7)."""
    for item in items:
        if os.fspath(item.path).startswith(os.fspath(Path(__file__).parent)):
            item.add_marker(pytest.mark.filterwarnings("ignore:.*non-Python base image.*:RuntimeWarning"))
