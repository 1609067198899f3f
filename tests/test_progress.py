"""Progress of long phases: plain lines with an ETA where there is no terminal, quiet for short phases."""

from __future__ import annotations

import logging
import threading

import pytest

from refine_core.progress import Progress, format_bytes, format_duration


def test_plain_progress_lines_with_rate_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 40.0, 80.0, 120.0])  # start; two updates (each line uses its update's time); the end
    monkeypatch.setattr("refine_core.progress.time.monotonic", lambda: next(clock))
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("evaluate squad", total=200, unit="prompt", every_s=30, bar=False) as progress,
    ):
        progress.update(50)  # t = 40 s: a line
        progress.update(50)  # t = 80 s: a line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "evaluate squad: 50/200 prompts (25%), 1.25 prompts/s, eta 2m00s"
    assert lines[1] == "evaluate squad: 100/200 prompts (50%), 1.25 prompts/s, eta 1m20s"
    assert lines[2] == "evaluate squad: 100/200 prompts (50%), 0.83 prompts/s, eta 2m00s"  # ended early
    assert len(lines) == 3  # one when the long phase ends


def test_a_short_phase_prints_nothing(caplog):
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("ttt", total=4, unit="prompt", bar=False) as progress,
    ):
        progress.update(4)
    assert caplog.records == []


def test_durations_read_naturally():
    assert [format_duration(s) for s in (5, 187, 3720)] == ["5s", "3m07s", "1h02m"]


def _clock(monkeypatch, *times: float) -> None:
    ticks = iter(times)
    monkeypatch.setattr("refine_core.progress.time.monotonic", lambda: next(ticks))


def test_the_last_line_of_a_long_phase_says_done(caplog, monkeypatch):
    _clock(monkeypatch, 0.0, 40.0, 100.0)  # start, the update, the end
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("evaluate squad", total=200, unit="prompt", every_s=30, bar=False) as progress,
    ):
        progress.update(200)
    # said once, when the count reached the total, not again on close
    assert [r.getMessage() for r in caplog.records] == ["evaluate squad: done, 200 prompts in 40s (5.00 prompts/s)"]


def test_unknown_total_counts_and_rates_then_done(caplog, monkeypatch):
    _clock(monkeypatch, 0.0, 10.0, 20.0, 30.0)
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("read hf://org/corpus", total=None, unit="document", every_s=5, bar=False) as progress,
    ):
        progress.set_postfix("kept 9")
        progress.update(10)
        progress.update(30)
    assert [r.getMessage() for r in caplog.records] == [
        "read hf://org/corpus: 10 documents, 1.00 documents/s, kept 9",
        "read hf://org/corpus: 40 documents, 2.00 documents/s, kept 9",
        "read hf://org/corpus: done, 40 documents in 30s (1.33 documents/s), kept 9",
    ]


def test_bytes_in_binary_units(caplog, monkeypatch):
    _clock(monkeypatch, 0.0, 10.0, 20.0)
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("download s3://bkt/model", total=3 * 2**30, unit="B", every_s=5, bar=False) as progress,
    ):
        progress.update(2**30)
    assert [r.getMessage() for r in caplog.records] == [
        "download s3://bkt/model: 1.0 GiB/3.0 GiB (33%), 102.4 MiB/s, eta 20s",
        "download s3://bkt/model: 1.0 GiB/3.0 GiB (33%), 51.2 MiB/s, eta 40s",
    ]
    assert [format_bytes(n) for n in (512, 1536, 5 * 2**20, 2**42)] == ["512 B", "1.5 KiB", "5.0 MiB", "4.0 TiB"]


def test_a_failed_phase_says_where_it_stopped(caplog, monkeypatch):
    _clock(monkeypatch, 0.0, 1.0, 60.0)
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        pytest.raises(RuntimeError),
        Progress("prepare data", total=None, unit="document", bar=False) as progress,
    ):
        progress.update(7)
        raise RuntimeError("bad file")
    assert [r.getMessage() for r in caplog.records] == ["prepare data: stopped after 7 documents in 1m00s"]


def test_updates_from_many_threads_add_up(caplog):
    """boto3 reports a transfer's bytes from its worker threads: no update may be lost."""
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("upload", total=8 * 5000 * 3, unit="B", every_s=0, bar=False) as progress,
    ):
        threads = [threading.Thread(target=lambda: [progress.update(3) for _ in range(5000)]) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert progress.done == 8 * 5000 * 3
    assert caplog.records[-1].getMessage().startswith("upload: done, 117.2 KiB in ")


def test_credentials_in_a_url_never_reach_the_line(caplog):
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("download https://user:hunter2@minio.example/bkt", total=10, every_s=0, bar=False) as progress,
    ):
        progress.update(4)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in text and "user:" not in text and "minio.example/bkt" in text
