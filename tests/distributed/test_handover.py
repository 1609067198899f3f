"""Hand-over between a launcher task and TrainJob pods: staging, the export of a finished stage, S3 data inputs.

S3 is moto's in-process mock; the training runs are the tiny CPU NTP runs of ``tests/stages/test_train_ntp.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from refine_core import storage
from refine_core.config import parse_overrides
from refine_core.distributed import handover
from refine_core.stages.train_ntp import train_ntp
from refine_core.training.result import RESULT_FILE, TrainResult, export_result, load_exported_result
from refine_core.training.setup import localize_inputs
from tests.stages.test_train_ntp import prepared, run_cfg  # noqa: F401 - `prepared` is a module fixture


def fake_model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "delta_net"}')
    (root / "model.safetensors").write_bytes(b"\0" * 1000)
    return root


def test_an_export_round_trips_through_a_directory(tmp_path):
    result = TrainResult(fake_model(tmp_path / "m"), steps=7, final_eval_loss=1.5,
                         history=[{"step": 1.0, "ntp/loss": 3.0}, {"step": 7.0, "eval/loss": 1.5}])
    export_result(result, str(tmp_path / "shared" / "result"), stage="train-ntp")
    back = load_exported_result(str(tmp_path / "shared" / "result"), tmp_path / "cache")
    assert (back.steps, back.final_eval_loss, back.history) == (7, 1.5, result.history)
    assert (back.model_dir / "model.safetensors").read_bytes() == b"\0" * 1000
    assert json.loads((tmp_path / "shared" / "result" / RESULT_FILE).read_text())["stage"] == "train-ntp"


def test_an_export_round_trips_through_s3(tmp_path, s3):
    result = TrainResult(fake_model(tmp_path / "m"), steps=3, final_eval_loss=None)
    export_result(result, "s3://bkt/staging/run/task/result")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="bkt")["Contents"])
    assert keys == ["staging/run/task/result/model/config.json", "staging/run/task/result/model/model.safetensors",
                    f"staging/run/task/result/{RESULT_FILE}"]
    back = load_exported_result("s3://bkt/staging/run/task/result", tmp_path / "cache")
    assert back.steps == 3 and back.final_eval_loss is None
    assert (back.model_dir / "config.json").read_text() == '{"model_type": "delta_net"}'


def test_a_missing_or_incomplete_export_is_named(tmp_path, s3):
    with pytest.raises(FileNotFoundError, match="did not complete its export"):
        load_exported_result(str(tmp_path / "nothing"), tmp_path / "cache")
    # The model was uploaded but result.json (written last) was not: not complete.
    storage.upload_dir(fake_model(tmp_path / "m"), "s3://bkt/half/model")
    with pytest.raises(FileNotFoundError, match="result.json"):
        load_exported_result("s3://bkt/half", tmp_path / "cache")


def test_staging_needs_a_location_and_makes_safe_paths(monkeypatch):
    monkeypatch.delenv(handover.STAGING_ENV, raising=False)
    with pytest.raises(ValueError, match="REFINE_STAGING_URI"):
        handover.staging_for("", "run-1", "mid-train")
    monkeypatch.setenv(handover.STAGING_ENV, "s3://bkt/staging/")
    staging = handover.staging_for("", "run-1", "launch-trainjob {arm}")
    assert staging.prefix == "s3://bkt/staging/run-1/launch-trainjob-arm"
    assert staging.data == "s3://bkt/staging/run-1/launch-trainjob-arm/data"
    assert handover.staging_for("/shared/x", "r", "t").result == "/shared/x/r/t/result"  # the parameter wins


def test_overrides_read_back_as_the_same_settings(tmp_path):
    staging = handover.staging_for(str(tmp_path / "staging"), "r", "t")
    settings = handover.push_inputs(staging, fake_model(tmp_path / "data"), fake_model(tmp_path / "base"))
    settings["refine.nsp_update"] = False
    assert dict(parse_overrides(handover.as_overrides(settings))) == settings
    assert settings["model.source"] == staging.base_model and settings["model.config"] == {}
    assert (Path(staging.data) / "config.json").is_file() and (Path(staging.base_model) / "model.safetensors").is_file()


def test_a_stage_downloads_s3_data_and_exports_its_result(tmp_path, prepared, s3):  # noqa: F811 - the fixture
    storage.upload_dir(prepared, "s3://bkt/staging/r/t/data")
    cfg = run_cfg(tmp_path, prepared, "data.prepared_dir=s3://bkt/staging/r/t/data", "ntp.steps=2", "ntp.save_every=0",
                  f"model.cache_dir={tmp_path / 'cache'}", "export_uri=s3://bkt/staging/r/t/result")
    local = localize_inputs(cfg)
    assert Path(local.data.prepared_dir).is_relative_to(tmp_path / "cache")
    assert local.export_uri == cfg.export_uri and local.model == cfg.model
    result = train_ntp(cfg)
    back = load_exported_result("s3://bkt/staging/r/t/result", tmp_path / "pulled")
    assert back.steps == result.steps == 2 and back.final_eval_loss == result.final_eval_loss
    assert back.history == result.history
    ours = load_file(result.model_dir / "model.safetensors")
    theirs = load_file(back.model_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_a_stopped_run_exports_nothing(tmp_path, prepared):  # noqa: F811 - the fixture
    target = tmp_path / "export"
    train_ntp(run_cfg(tmp_path, prepared, "ntp.steps=4", "ntp.stop_after=1", f"export_uri={target}"))
    assert not target.exists()  # only a complete run publishes a result the launcher would take for final


def stage_everything(staging: handover.Staging, tmp_path: Path) -> str:
    """Stage inputs, a result and a checkpoint under ``staging`` as a launcher and its trainers would; the
    checkpoint location."""
    handover.push_inputs(staging, fake_model(tmp_path / "data"), fake_model(tmp_path / "base"))
    storage.publish_dir(fake_model(tmp_path / "result"), staging.result)
    checkpoints = handover.checkpoint_location(staging, "", "run-1", "train")
    storage.publish_dir(fake_model(tmp_path / "ckpt"), storage.join_uri(checkpoints, "train-ntp", "step_00000002"))
    return checkpoints


def left(uri: str) -> set[str]:
    """The top-level entries still under a staging prefix (``data``, ``checkpoints``, ...)."""
    if storage.is_s3_uri(uri):
        return {key.split("/", 1)[0] for key in storage.list_prefix(uri)}
    return {p.name for p in Path(uri).iterdir()} if Path(uri).is_dir() else set()


@pytest.mark.parametrize("where", ["volume", "s3"])
@pytest.mark.parametrize(("succeeded", "keep_staged", "kept"), [
    (True, False, set()),  # the model is in the artifact: nothing is needed any more
    (False, False, {"checkpoints"}),  # the retry resumes from the checkpoints and stages the inputs again
    (True, True, {"data", "base-model", "result", "checkpoints"}),
    (False, True, {"data", "base-model", "result", "checkpoints"}),
])
def test_clean_up_deletes_what_was_staged_but_a_failed_jobs_checkpoints(tmp_path, request, where, succeeded,
                                                                       keep_staged, kept):
    base = str(tmp_path / "volume") if where == "volume" else "s3://bkt/staging"
    if where == "s3":
        request.getfixturevalue("s3")
    staging = handover.staging_for(base, "run-1", "train")
    checkpoints = stage_everything(staging, tmp_path)
    assert left(staging.prefix) == {"data", "base-model", "result", "checkpoints"}
    deleted = handover.clean_up(staging, checkpoints, succeeded=succeeded, keep_staged=keep_staged)
    assert left(staging.prefix) == kept
    assert len(deleted) == 4 - len(kept)


def test_clean_up_never_hides_the_outcome_of_the_job(tmp_path, monkeypatch, caplog):
    staging = handover.staging_for(str(tmp_path / "volume"), "run-1", "train")
    checkpoints = stage_everything(staging, tmp_path)

    def refused(uri: str) -> int:
        raise PermissionError(13, "Permission denied", uri)

    monkeypatch.setattr(storage, "delete_uri", refused)
    assert handover.clean_up(staging, checkpoints, succeeded=True, keep_staged=False) == []
    assert caplog.text.count("could not delete staged") == 4 and "lifecycle rule" in caplog.text


def test_the_checkpoint_location_is_the_same_for_every_attempt_of_a_task():
    staging = handover.staging_for("s3://bkt/staging", "run-1", "mid-train refine")
    assert handover.checkpoint_location(staging, "", "run-1", "mid-train refine") == (
        "s3://bkt/staging/run-1/mid-train-refine/checkpoints")
    assert handover.checkpoint_location(staging, "/mnt/ckpt/", "run-1", "mid-train refine") == (
        "/mnt/ckpt/run-1/mid-train-refine")
    assert handover.trainer_settings("train-refine", "s3://x/c", True) == {"checkpoint_uri": "s3://x/c",
                                                                          "refine.resume": True}
    assert handover.trainer_settings("train-ntp", "/c", False) == {"checkpoint_uri": "/c", "ntp.resume": False}
    with pytest.raises(ValueError, match="no resumable training loop"):
        handover.trainer_settings("ttt-evaluate", "/c", True)
