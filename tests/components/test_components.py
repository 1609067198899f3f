"""Each component's body through ``.python_func`` with stub artifacts: the real stage runs on a tiny config, the
artifact paths and metadata are filled, and MLflow has the nested stage run under the parent run.

The stages chain through module-scoped fixtures (data -> both mid-training arms -> post-training -> evaluation),
so each runs once; about half a minute in all on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components.compare_report import compare_report
from components.finish_run import finish_run
from components.post_train import post_train
from components.prepare_data import prepare_data
from components.register_model import register_model
from components.start_run import start_run
from components.train_ntp import train_ntp
from components.train_refine import train_refine
from components.ttt_evaluate import ttt_evaluate
from refine_core.kfp_support import KFP_RUN_TAG, KFP_TASK_TAG
from tests.components.conftest import StubArtifact, StubStatus, stub, tiny_config_yaml

KFP_RUN = "kfp-run-123"
CONFIG = tiny_config_yaml()


def outputs(tmp: Path, *names: str) -> dict[str, StubArtifact]:
    return {name: stub(tmp, name) for name in names}


def ctx(task: str, parent: str) -> dict[str, str]:
    return {"parent_run_id": parent, "kfp_run_id": KFP_RUN, "kfp_task": task}


@pytest.fixture(scope="module")
def parent(tracking_uri: str) -> str:
    run_id = start_run.python_func(config_yaml=CONFIG, pipeline_name="refine-test", kfp_run_id=KFP_RUN)
    assert run_id
    return run_id


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StubArtifact]:
    out = outputs(tmp_path_factory.mktemp("data"), "dataset", "metrics", "report")
    prepare_data.python_func(config_yaml=CONFIG, **out)
    return out


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory, data, parent) -> dict[str, dict[str, StubArtifact]]:
    result = {}
    for arm, baseline in (("ntp-baseline", True), ("refine", False)):
        out = outputs(tmp_path_factory.mktemp(arm), "model", "metrics", "report")
        train_refine.python_func(config_yaml=CONFIG, data=data["dataset"], baseline=baseline,
                                 **ctx(f"train-refine-{arm}", parent), **out)
        result[arm] = out
    return result


@pytest.fixture(scope="module")
def posts(tmp_path_factory: pytest.TempPathFactory, arms, parent) -> dict[str, dict[str, StubArtifact]]:
    result = {}
    for arm, mid in arms.items():
        out = outputs(tmp_path_factory.mktemp(f"post-{arm}"), "model", "metrics", "report")
        post_train.python_func(config_yaml=CONFIG, base_model=mid["model"], **ctx(f"post-{arm}", parent), **out)
        result[arm] = out
    return result


@pytest.fixture(scope="module")
def evals(tmp_path_factory: pytest.TempPathFactory, posts, parent) -> dict[str, dict[str, StubArtifact]]:
    result = {}
    for arm, post in posts.items():
        out = outputs(tmp_path_factory.mktemp(f"eval-{arm}"), "results", "metrics", "report")
        ttt_evaluate.python_func(config_yaml=CONFIG, model=post["model"], **ctx(f"eval-{arm}", parent), **out)
        result[arm] = out
    return result


def nested_run(client, run_id: str, parent: str) -> Any:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[KFP_RUN_TAG] == KFP_RUN
    return run


def test_start_and_finish_run_bracket_the_parent(mlflow_client, parent: str) -> None:
    run = mlflow_client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.data.tags[KFP_RUN_TAG] == KFP_RUN and run.data.tags["refine.role"] == "pipeline"
    assert run.data.params["refine.steps"] == "2"  # the config is logged on the parent
    other = start_run.python_func(config_yaml=CONFIG, pipeline_name="refine-test", kfp_run_id="failed-run")
    finish_run.python_func(config_yaml=CONFIG, status=StubStatus("FAILED"), kfp_run_id="failed-run")
    assert mlflow_client.get_run(other).info.status == "FAILED"
    finish_run.python_func(config_yaml=CONFIG, status=StubStatus("SUCCEEDED"), kfp_run_id="no-such-run")  # no-op


def test_prepare_data_writes_shards_fingerprint_metrics_report(data) -> None:
    dataset = Path(data["dataset"].path)
    assert (dataset / "manifest.json").is_file() and (dataset / "tokenizer").is_dir()
    assert len(data["dataset"].metadata["data_fingerprint"]) == 16
    assert data["dataset"].metadata["eval_docs"] == 2
    assert data["metrics"].metadata["data/docs_kept"] > 2
    assert "fingerprint" in Path(data["report"].path).read_text()


def test_train_refine_arms(mlflow_client, arms, parent: str, data) -> None:
    for arm, out in arms.items():
        model, meta = Path(out["model"].path), out["model"].metadata
        assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
        assert not (model / "checkpoints").exists()  # only the final model is exported
        assert meta["arm"] == arm and meta["steps"] == 2 and meta["mlflow_parent_run_id"] == parent
        assert meta["data_fingerprint"] == data["dataset"].metadata["data_fingerprint"]
        assert out["metrics"].metadata["train/steps"] == 2.0
        run = nested_run(mlflow_client, meta["mlflow_run_id"], parent)
        assert run.data.tags[KFP_TASK_TAG] == f"train-refine-{arm}"
        assert run.data.params["refine.nsp_update"] == str(arm == "refine")
        assert run.data.tags["refine.data_fingerprint"] == meta["data_fingerprint"]
        assert "train/final_eval_loss" in run.data.metrics and "eval/loss" in run.data.metrics
        assert ("refine/reward_mean" in run.data.metrics) == (arm == "refine")
        assert f"# {meta['stage']}" in Path(out["report"].path).read_text()


def test_train_ntp(tmp_path: Path, mlflow_client, data, parent: str) -> None:
    out = outputs(tmp_path, "model", "metrics", "report")
    train_ntp.python_func(config_yaml=CONFIG, data=data["dataset"], **ctx("train-ntp", parent), **out)
    assert (Path(out["model"].path) / "model.safetensors").is_file()
    run = nested_run(mlflow_client, out["model"].metadata["mlflow_run_id"], parent)
    assert "ntp/loss" in run.data.metrics


def test_post_train_carries_the_arm_and_fingerprints(mlflow_client, posts, arms, parent: str) -> None:
    for arm, out in posts.items():
        meta = out["model"].metadata
        assert (Path(out["model"].path) / "model.safetensors").is_file()
        assert meta["arm"] == arm and meta["data_fingerprint"] == arms[arm]["model"].metadata["data_fingerprint"]
        assert len(meta["post_data_fingerprint"]) == 16
        run = nested_run(mlflow_client, meta["mlflow_run_id"], parent)
        assert run.info.run_name.endswith(f"post-train-{arm}")
        assert run.data.params["model.source"] == arms[arm]["model"].path


def test_ttt_evaluate_writes_results_and_scores(mlflow_client, evals, parent: str) -> None:
    for arm, out in evals.items():
        results = Path(out["results"].path)
        summary = json.loads((results / "summary.json").read_text())
        assert summary["counts"]["ruler_squadqa"] == 4
        assert (results / "predictions" / "ruler_squadqa.jsonl").is_file()
        assert out["metrics"].metadata["eval/ruler_squadqa"] == pytest.approx(summary["scores"]["ruler_squadqa"])
        assert out["results"].metadata["arm"] == arm
        run = nested_run(mlflow_client, out["results"].metadata["mlflow_run_id"], parent)
        assert run.info.run_name.endswith(f"ttt-{arm}") and "eval/ruler_squadqa" in run.data.metrics
        assert "ruler_squadqa" in Path(out["report"].path).read_text()


def test_ttt_evaluate_without_ttt_is_plain_evaluation(tmp_path: Path, mlflow_client, posts, parent: str) -> None:
    out = outputs(tmp_path, "results", "metrics", "report")
    ttt_evaluate.python_func(config_yaml=tiny_config_yaml("ttt.method=none"), model=posts["refine"]["model"],
                             **ctx("eval-plain", parent), **out)
    run = nested_run(mlflow_client, out["results"].metadata["mlflow_run_id"], parent)
    assert run.info.run_name.endswith("evaluate-refine")
    assert "ttt/optimizer_steps" not in run.data.metrics and "eval/ruler_squadqa" in run.data.metrics


def test_compare_report_puts_both_arms_side_by_side(tmp_path: Path, mlflow_client, evals, arms, parent: str) -> None:
    out = outputs(tmp_path, "report", "html_report", "metrics")
    compare_report.python_func(
        config_yaml=CONFIG, baseline_results=evals["ntp-baseline"]["results"],
        refine_results=evals["refine"]["results"], baseline_model=arms["ntp-baseline"]["model"],
        refine_model=arms["refine"]["model"], **ctx("compare", parent), **out,
    )
    markdown = Path(out["report"].path).read_text()
    # both arms started fresh: the model they started from stands beside them (its held-out loss before step 1)
    assert "| metric | start model | ntp-baseline | refine | Δ start model | Δ refine |" in markdown
    start = arms["ntp-baseline"]["model"].metadata["initial_eval_loss"]
    assert start > arms["ntp-baseline"]["model"].metadata["final_eval_loss"]
    assert "eval/ruler_squadqa" in markdown and "midtrain/final_eval_loss" in markdown
    # the recall probe, ×100 like the scores, for the start model and both arms
    recall_row = next(line for line in markdown.splitlines() if line.startswith("| midtrain/final_recall_acc |"))
    start_recall = 100 * arms["ntp-baseline"]["model"].metadata["initial_recall_acc"]
    assert recall_row.split(" | ")[1] == f"{start_recall:.4g}"
    assert "midtrain/final_first_mention_acc" in markdown
    assert "<table>" in Path(out["html_report"].path).read_text()
    loss = {arm: arms[arm]["model"].metadata["final_eval_loss"] for arm in arms}
    delta = out["metrics"].metadata["compare/refine_minus_ntp-baseline/midtrain/final_eval_loss"]
    assert delta == pytest.approx(loss["refine"] - loss["ntp-baseline"])
    parent_files = {a.path for a in mlflow_client.list_artifacts(parent, "reports")}
    assert parent_files == {"reports/compare.md", "reports/compare.html"}


def test_register_model_creates_a_tagged_version(mlflow_client, posts, evals, parent: str) -> None:
    post = posts["refine"]["model"]
    uri = register_model.python_func(config_yaml=CONFIG, model=post, model_name="refine-test-model",
                                     results=evals["refine"]["results"], **ctx("register", parent))
    assert uri.startswith("models:/refine-test-model/")
    version = mlflow_client.get_model_version("refine-test-model", uri.rsplit("/", 1)[1])
    assert version.source == f"runs:/{post.metadata['mlflow_run_id']}/model"  # the weights the stage logged
    tags = version.tags
    assert tags["refine.data_fingerprint"] == post.metadata["data_fingerprint"]
    assert tags["refine.post_data_fingerprint"] == post.metadata["post_data_fingerprint"]
    assert len(tags["refine.config_sha256"]) == 64 and tags[KFP_RUN_TAG] == KFP_RUN
    assert "refine.git_commit" in tags and "eval/ruler_squadqa" in tags and tags["refine.arm"] == "refine"


def test_tracking_off_gives_no_parent_and_no_registration(tmp_path: Path, posts) -> None:
    config = tiny_config_yaml("tracking.backend=none")
    assert start_run.python_func(config_yaml=config, pipeline_name="p", kfp_run_id="r") == ""
    finish_run.python_func(config_yaml=config, status=StubStatus("SUCCEEDED"), kfp_run_id="r")
    assert register_model.python_func(config_yaml=config, model=posts["refine"]["model"], model_name="m") == ""
