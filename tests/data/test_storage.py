"""storage.resolve / upload_dir against moto's in-process S3, plus local and hub paths."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from refine_core import storage
from refine_core.progress import Progress
from refine_core.storage import COMPLETE_MARKER, is_hub_name, resolve, upload_dir


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {"config.json": b'{"a": 1}', "sub/dir/weights.bin": bytes(range(256)) * 100, "notes.txt": b"hello"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != COMPLETE_MARKER}


def _flaky_transfer(monkeypatch: pytest.MonkeyPatch, fail_on: int) -> dict[str, int]:
    """Make the ``fail_on``-th download of each transfer raise, as if the network dropped."""
    import boto3.s3.transfer

    real = boto3.s3.transfer.create_transfer_manager
    calls = {"n": 0}

    def flaky(client: Any, config: Any = None) -> Any:
        manager = real(client, config)
        original = manager.download

        def download(bucket: str, key: str, filename: str, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == fail_on:
                raise ConnectionError("simulated network drop")
            return original(bucket, key, filename, *args, **kwargs)

        manager.download = download
        return manager

    monkeypatch.setattr(boto3.s3.transfer, "create_transfer_manager", flaky)
    return calls


def test_local_paths(tmp_path: Path) -> None:
    assert resolve(tmp_path, tmp_path / "cache") == tmp_path
    with pytest.raises(FileNotFoundError, match="nowhere/at-all/x"):
        resolve(str(tmp_path / "nowhere/at-all/x"), tmp_path / "cache")


def test_hub_name_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_name("fla-hub/delta_net-1.3B-100B")
    assert is_hub_name("hf://org/name")
    assert not is_hub_name("a/b/c") and not is_hub_name("./a/b") and not is_hub_name("/abs/x")
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_name("org/name")  # an existing local directory wins


def test_upload_then_resolve_round_trip(s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_tree(src)
    uris = upload_dir(src, "s3://bkt/models/tiny/")
    assert uris == sorted(f"s3://bkt/models/tiny/{rel}" for rel in files)
    local = resolve("s3://bkt/models/tiny", tmp_path / "cache")
    assert local == tmp_path / "cache" / "s3" / "bkt" / "models" / "tiny"
    assert _read_tree(local) == files
    marker = json.loads((local / COMPLETE_MARKER).read_text())
    assert set(marker["objects"]) == {f"models/tiny/{rel}" for rel in files}
    assert not list(local.parent.glob(".*tmp-*"))


def test_marker_skips_identical_download(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _make_tree(tmp_path / "src")
    upload_dir(tmp_path / "src", "s3://bkt/m")
    first = resolve("s3://bkt/m", tmp_path / "cache")
    calls = _flaky_transfer(monkeypatch, fail_on=1)  # any download would now fail
    assert resolve("s3://bkt/m", tmp_path / "cache") == first
    assert calls["n"] == 0
    assert _read_tree(first) == files


def test_changed_object_is_downloaded_again(s3: Any, tmp_path: Path) -> None:
    _make_tree(tmp_path / "src")
    upload_dir(tmp_path / "src", "s3://bkt/m")
    local = resolve("s3://bkt/m", tmp_path / "cache")
    s3.put_object(Bucket="bkt", Key="m/notes.txt", Body=b"changed")
    assert resolve("s3://bkt/m", tmp_path / "cache") == local
    assert (local / "notes.txt").read_bytes() == b"changed"


def test_interrupted_download_leaves_no_complete_looking_copy(s3: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = _make_tree(tmp_path / "src")
    upload_dir(tmp_path / "src", "s3://bkt/m")
    cache = tmp_path / "cache"
    target = cache / "s3" / "bkt" / "m"
    with monkeypatch.context() as patch:
        _flaky_transfer(patch, fail_on=2)
        with pytest.raises(ConnectionError, match="simulated"):
            resolve("s3://bkt/m", cache)
    assert not target.exists()  # nothing that looks like a copy
    assert not list(target.parent.glob(".m.tmp-*"))  # and the partial download was removed
    # A crash (no chance to clean up) leaves a temp dir; the next call ignores it, removes it and downloads.
    stale, young = target.parent / ".m.tmp-deadbeef", target.parent / ".m.tmp-0123abcd"
    for tmp in (stale, young):
        (tmp / "sub").mkdir(parents=True)
        (tmp / "config.json").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for path in (stale, stale / "sub", stale / "config.json"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert _read_tree(resolve("s3://bkt/m", cache)) == files
    assert not stale.exists()
    assert young.exists()  # may be a concurrent download into a shared cache: left alone


def test_failed_refresh_keeps_the_old_complete_copy(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _make_tree(tmp_path / "src")
    upload_dir(tmp_path / "src", "s3://bkt/m")
    local = resolve("s3://bkt/m", tmp_path / "cache")
    s3.put_object(Bucket="bkt", Key="m/extra.txt", Body=b"new object")
    _flaky_transfer(monkeypatch, fail_on=1)
    with pytest.raises(ConnectionError):
        resolve("s3://bkt/m", tmp_path / "cache")
    assert _read_tree(local) == files and (local / COMPLETE_MARKER).exists()


def test_directory_without_marker_is_not_trusted(s3: Any, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src")
    upload_dir(tmp_path / "src", "s3://bkt/m")
    target = tmp_path / "cache" / "s3" / "bkt" / "m"
    target.mkdir(parents=True)
    (target / "config.json").write_bytes(b"half")
    assert _read_tree(resolve("s3://bkt/m", tmp_path / "cache")) == files


def test_single_object_and_missing_prefix(s3: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket="bkt", Key="data/corpus.jsonl", Body=b'{"text": "x"}\n')
    path = resolve("s3://bkt/data/corpus.jsonl", tmp_path / "cache")
    assert path.name == "corpus.jsonl" and path.read_bytes() == b'{"text": "x"}\n'
    assert resolve("s3://bkt/data/corpus.jsonl", tmp_path / "cache") == path  # cached
    with pytest.raises(FileNotFoundError, match="holds no objects"):
        resolve("s3://bkt/nothing/here", tmp_path / "cache")
    with pytest.raises(ValueError, match="cannot list"):
        resolve("s3://no-such-bucket/x", tmp_path / "cache")


def test_multipart_transfer(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_PART_BYTES", 5 * 1024 * 1024)  # S3's minimum part size
    big = tmp_path / "src" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(bytes(range(256)) * (11 * 1024 * 4))  # 11 MiB: three parts
    upload_dir(tmp_path / "src", "s3://bkt/big")
    etag = s3.head_object(Bucket="bkt", Key="big/big.bin")["ETag"]
    assert "-" in etag  # a multipart upload's ETag ends in -<parts>
    assert resolve("s3://bkt/big", tmp_path / "cache").joinpath("big.bin").read_bytes() == big.read_bytes()


def test_unreachable_s3_falls_back_to_complete_cache(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import EndpointConnectionError

    files = _make_tree(tmp_path / "src")
    upload_dir(tmp_path / "src", "s3://bkt/m")
    local = resolve("s3://bkt/m", tmp_path / "cache")

    def down(*args: Any, **kwargs: Any) -> None:
        raise EndpointConnectionError(endpoint_url="http://s3")

    monkeypatch.setattr(storage, "_list_objects", down)
    assert _read_tree(resolve("s3://bkt/m", tmp_path / "cache")) == files
    with pytest.raises(ValueError, match="cannot reach S3"):
        resolve("s3://bkt/m", tmp_path / "other-cache")
    assert local.exists()


def test_hub_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve("some-org/some-model", tmp_path / "cache")


def test_upload_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        upload_dir(tmp_path / "missing", "s3://bkt/x")
    with pytest.raises(ValueError, match="s3://"):
        upload_dir(tmp_path, "bkt/x")


def _record_progress(monkeypatch: pytest.MonkeyPatch) -> list[Progress]:
    """Every Progress the storage module makes, to read its final count."""
    made: list[Progress] = []

    class Recorded(Progress):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(storage, "Progress", Recorded)
    return made


def _progress_lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "refine_core.progress" and
            r.getMessage().startswith(start)]


def test_transfers_report_their_bytes_up_to_the_total(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, plain_progress: None) -> None:
    made = _record_progress(monkeypatch)
    files = _make_tree(tmp_path / "src")
    size = sum(len(data) for data in files.values())  # 25,613 bytes: 25.0 KiB
    with caplog.at_level(logging.INFO):
        upload_dir(tmp_path / "src", "s3://bkt/models/tiny")
        resolve("s3://bkt/models/tiny", tmp_path / "cache")
    assert [(p.what, p.total, p.done) for p in made] == [
        ("upload to s3://bkt/models/tiny", size, size), ("download s3://bkt/models/tiny", size, size)]
    for start in ("upload to s3://bkt/models/tiny: ", "download s3://bkt/models/tiny: "):
        lines = _progress_lines(caplog, start)
        assert lines[-1].startswith(f"{start}done, 25.0 KiB in ") and lines[-1].endswith("/s)")
        assert all("/25.0 KiB (" in line and ", eta " in line for line in lines[:-1])
    assert "testing" not in caplog.text  # the moto credentials never reach the log


def test_multipart_transfer_progress_from_worker_threads(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         plain_progress: None) -> None:
    """Three 5 MiB parts move in parallel, each reporting from its own thread: the bytes add up exactly."""
    monkeypatch.setattr(storage, "_PART_BYTES", 5 * 1024 * 1024)
    made = _record_progress(monkeypatch)
    big = tmp_path / "src" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(bytes(range(256)) * (11 * 1024 * 4))  # 11 MiB
    with caplog.at_level(logging.INFO):
        upload_dir(tmp_path / "src", "s3://bkt/big")
        storage.publish_file(big, "s3://bkt/one/big.bin")
        resolve("s3://bkt/one/big.bin", tmp_path / "cache")  # a single object: its size comes from head_object
    assert [(p.what, p.done) for p in made] == [
        ("upload to s3://bkt/big", 11 * 2**20), ("upload to s3://bkt/one/big.bin", 11 * 2**20),
        ("download s3://bkt/one/big.bin", 11 * 2**20)]
    for start in ("upload to s3://bkt/big: ", "upload to s3://bkt/one/big.bin: ", "download s3://bkt/one/big.bin: "):
        assert _progress_lines(caplog, start)[-1].startswith(f"{start}done, 11.0 MiB in ")
