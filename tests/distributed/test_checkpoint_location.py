"""Checkpoints that outlive the pod (``checkpoint_uri``): mirrored to S3 with the marker last, pruned there too, and
downloaded by a resumed run that starts with an empty ``output_dir``; or written straight onto a volume.

S3 is moto's in-process mock (``tests/conftest.py``). The end-to-end case is the tiny CPU NTP run: interrupted after
its first checkpoint, resumed in a fresh ``output_dir`` (a new pod), it ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refine_core import storage
from refine_core.config import ConfigError, load_config
from refine_core.stages.prepare_data import prepare_data
from refine_core.stages.train_ntp import train_ntp
from refine_core.training import checkpoint_mirror
from refine_core.training.checkpoint import MARKER, CheckpointManager, open_checkpoints
from refine_core.training.checkpoint_mirror import S3CheckpointMirror

REMOTE = "s3://bkt/runs/r1/train-ntp"


def write_files(step: int):
    """A ``write_fn`` whose files depend on the step (a small DCP-like layout with a subdirectory)."""

    def write(directory: Path) -> None:
        (directory / "state").mkdir()
        (directory / "state" / "__0_0.distcp").write_bytes(bytes([step % 256]) * (1000 + step))
        (directory / "state" / ".metadata").write_text(f"meta {step}")
        (directory / "config.json").write_text("{}")

    return write


def remote_files(s3, step: int) -> dict[str, bytes]:
    prefix = f"runs/r1/train-ntp/step_{step:08d}/"
    listed = s3.list_objects_v2(Bucket="bkt", Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: s3.get_object(Bucket="bkt", Key=o["Key"])["Body"].read() for o in listed}


def local_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def uploads(monkeypatch) -> list[list[str]]:
    """Every ``storage.upload_files`` call, as the list of object URIs it stored (in call order)."""
    calls: list[list[str]] = []
    real = storage.upload_files

    def recording(files):
        real(files)  # stored before it is recorded: a recorded call is a finished one
        calls.append([uri for _, uri in files])

    monkeypatch.setattr(storage, "upload_files", recording)
    return calls


def test_each_commit_is_uploaded_with_its_marker_last_and_the_mirror_keeps_the_newest(tmp_path, s3, uploads):
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, mirror=S3CheckpointMirror(REMOTE))
    for step in (1, 2, 3, 4):
        manager.save(step, write_files(step), {"seed": step})
        step_calls = [c for c in uploads if f"step_{step:08d}/" in c[0]]
        # Everything but the marker in one call, then the marker alone, last.
        assert [len(c) for c in step_calls] == [4, 1]
        assert step_calls[-1] == [f"{REMOTE}/step_{step:08d}/{MARKER}"]
        assert uploads[-1] == step_calls[-1]
        # The remote copy is the local one, file for file and byte for byte.
        assert remote_files(s3, step) == local_files(manager.root / f"step_{step:08d}")
    assert manager.mirror.complete_steps() == [3, 4]  # pruned remotely as locally (keep=2)
    assert [p.name for p in manager.list_complete()] == ["step_00000003", "step_00000004"]
    assert remote_files(s3, 1) == {} and remote_files(s3, 2) == {}


def test_a_new_pod_downloads_the_newest_complete_checkpoint_and_resumes_from_it(tmp_path, s3):
    first = CheckpointManager(tmp_path / "pod-1", keep=3, mirror=S3CheckpointMirror(REMOTE))
    for step in (2, 4):
        first.save(step, write_files(step), {"seed": step})
    fresh = CheckpointManager(tmp_path / "pod-2", keep=3, mirror=S3CheckpointMirror(REMOTE))
    assert fresh.latest() is None
    path = fresh.fetch_from_mirror()
    assert path == fresh.root / "step_00000004" and fresh.latest() == path
    assert local_files(path) == local_files(first.root / "step_00000004")  # marker included
    assert CheckpointManager.load_trainer_state(path) == {"seed": 4, "step": 4}
    assert [p.name for p in fresh.root.iterdir()] == ["step_00000004"]  # no temporary directory left
    # A local checkpoint as new as the mirror's newest is used as it is; an older one is not.
    assert fresh.fetch_from_mirror() is None
    stale = CheckpointManager(tmp_path / "pod-3", keep=3, mirror=S3CheckpointMirror(REMOTE))
    stale.save(3, write_files(3), {"seed": 3})  # an older local one (the mirror now also has step 3)
    assert stale.fetch_from_mirror() == stale.root / "step_00000004"


def test_an_upload_cut_short_before_the_marker_is_not_a_checkpoint(tmp_path, s3, monkeypatch):
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, mirror=S3CheckpointMirror(REMOTE))
    manager.save(2, write_files(2), {})
    real = storage.upload_files

    def dies_at_the_marker(files):
        if files[-1][1].endswith(f"/{MARKER}"):
            raise storage.UploadFailed("uploading to s3://bkt/... failed after retries (the pod was killed)")
        real(files)

    monkeypatch.setattr(storage, "upload_files", dies_at_the_marker)
    with pytest.raises(storage.UploadFailed):
        manager.save(4, write_files(4), {})
    monkeypatch.setattr(storage, "upload_files", real)
    assert set(remote_files(s3, 4)) == {"state/__0_0.distcp", "state/.metadata", "config.json", "trainer_state.pt"}
    assert manager.mirror.complete_steps() == [2]  # step 4's files are there, its marker is not
    fresh = CheckpointManager(tmp_path / "pod-2", keep=2, mirror=S3CheckpointMirror(REMOTE))
    assert fresh.fetch_from_mirror() == fresh.root / "step_00000002"
    fresh.save(6, write_files(6), {})  # the next save prunes the leftover
    assert remote_files(s3, 4) == {} and fresh.mirror.complete_steps() == [2, 6]


def test_a_step_already_complete_in_the_mirror_is_not_uploaded_again(tmp_path, s3, uploads):
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, mirror=S3CheckpointMirror(REMOTE))
    manager.save(5, write_files(5), {})
    count = len(uploads)
    fresh = CheckpointManager(tmp_path / "pod-2", keep=2, mirror=S3CheckpointMirror(REMOTE))
    fresh.fetch_from_mirror()
    fresh.save(5, write_files(5), {})  # a run resumed at its last step saves that step once more when it finishes
    assert len(uploads) == count and fresh.mirror.complete_steps() == [5]
    assert fresh.is_complete(fresh.root / "step_00000005")


def cfg_for(tmp_path: Path, *extra: str):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", *extra])


def test_open_checkpoints_places_the_root_and_guards_a_fresh_run(tmp_path, s3, caplog):
    local = open_checkpoints(cfg_for(tmp_path), "train-ntp", 2, resume=False, section="ntp")
    assert local.root == tmp_path / "out" / "train-ntp" / "checkpoints" and local.mirror is None
    volume = tmp_path / "volume"
    on_volume = open_checkpoints(cfg_for(tmp_path, f"checkpoint_uri={volume}"), "train-ntp", 2, resume=False,
                                 section="ntp")
    assert on_volume.root == volume / "train-ntp" and on_volume.mirror is None
    on_volume.save(1, write_files(1), {})
    with pytest.raises(ConfigError, match=r"already holds checkpoints of an earlier run.*ntp\.resume=true"):
        open_checkpoints(cfg_for(tmp_path, f"checkpoint_uri={volume}"), "train-ntp", 2, resume=False, section="ntp")
    assert open_checkpoints(cfg_for(tmp_path, f"checkpoint_uri={volume}"), "train-ntp", 2, resume=True,
                            section="ntp").latest() == volume / "train-ntp" / "step_00000001"

    mirrored = open_checkpoints(cfg_for(tmp_path, "checkpoint_uri=s3://bkt/runs/r1"), "train-ntp", 2, resume=False,
                                section="ntp")
    assert mirrored.mirror is not None and mirrored.mirror.uri == REMOTE
    assert mirrored.root == tmp_path / "out" / "train-ntp" / "checkpoints"
    mirrored.save(3, write_files(3), {})
    with pytest.raises(ConfigError, match="s3://bkt/runs/r1/train-ntp already holds checkpoints"):
        open_checkpoints(cfg_for(tmp_path, "checkpoint_uri=s3://bkt/runs/r1"), "train-ntp", 2, resume=False,
                         section="ntp")
    with caplog.at_level(logging.WARNING):
        open_checkpoints(cfg_for(tmp_path, "checkpoint_uri=s3://bkt/runs/r1", "overwrite=true"), "train-ntp", 2,
                         resume=False, section="ntp")
    assert remote_files(s3, 3) == {} and "overwrite=true: deleting" in caplog.text


@pytest.mark.parametrize(("value", "message"), [
    ("gs://bucket/x", "only s3:// URIs and directories"),
    ("s3:///x", "has no bucket"),
    ("  ", "is empty"),
])
def test_a_bad_checkpoint_location_is_refused_at_load_time(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"checkpoint_uri={value!r}"])
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"trainjob.checkpoint_root={value!r}"])


def test_the_mirror_refuses_a_location_that_is_not_s3():
    with pytest.raises(ValueError, match="not an s3:// URI"):
        S3CheckpointMirror("/data/checkpoints")
    assert checkpoint_mirror.MARKER == MARKER


# -- end to end: an interrupted run resumes in a fresh output_dir from the mirror ------------------------------------

TINY = [
    "device=cpu", "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 24, synthetic_words: 60}]", "data.min_tokens=96",
    "data.max_tokens=128", "data.eval_docs=2", "ntp.steps=4", "ntp.save_every=2", "ntp.eval_every=0",
    "ntp.batch_size=4", "ntp.micro_batch_size=2", "ntp.lr=1e-3", "tracking.backend=none",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    prepare_data(load_config(None, [f"output_dir={root}", *TINY]))
    return root / "data"


def test_a_run_interrupted_in_one_pod_resumes_in_another_from_the_mirror(tmp_path, prepared, s3, caplog):
    def run(out: str, *extra: str):
        return train_ntp(load_config(None, [f"output_dir={tmp_path / out}", f"data.prepared_dir={prepared}", *TINY,
                                            *extra]))

    run("whole")
    mirror = ["checkpoint_uri=s3://bkt/runs/r2"]
    run("pod-1", *mirror, "ntp.stop_after=2")  # the first pod stops after its step-2 checkpoint
    assert S3CheckpointMirror("s3://bkt/runs/r2/train-ntp").complete_steps() == [2]
    with caplog.at_level(logging.INFO):
        run("pod-2", *mirror, "ntp.resume=true")  # a new pod: its output_dir is empty
    assert "resuming from mirrored checkpoint step 2 of s3://bkt/runs/r2/train-ntp" in caplog.text
    assert "resumed train-ntp from" in caplog.text and "at step 2" in caplog.text
    whole = load_file(str(tmp_path / "whole" / "train-ntp" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "pod-2" / "train-ntp" / "model" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name  # bitwise on the CPU
    assert S3CheckpointMirror("s3://bkt/runs/r2/train-ntp").complete_steps() == [2, 4]


def test_an_unreachable_bucket_stops_the_run_in_one_line(tmp_path, s3):
    from refine_core.errors import RunFailed

    manager = CheckpointManager(tmp_path / "ckpt", keep=2, mirror=S3CheckpointMirror("s3://no-such-bucket/x"))
    with pytest.raises(RunFailed, match=r"cannot list the checkpoints under s3://no-such-bucket/x \(NoSuchBucket"):
        manager.save(1, write_files(1), {})
    assert manager.list_complete() == []  # nothing was written before the mirror was found missing
