"""Progress of long phases: plain lines with an ETA where there is no terminal, quiet for short phases."""

from __future__ import annotations

import logging

from refine_core.progress import Progress, format_duration


def test_plain_progress_lines_with_rate_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 40.0, 40.0, 80.0, 80.0, 120.0, 120.0])  # start; two updates and their lines; the end
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
    assert len(lines) == 3  # and one when the long phase ends


def test_a_short_phase_prints_nothing(caplog):
    with (
        caplog.at_level(logging.INFO, logger="refine_core.progress"),
        Progress("ttt", total=4, unit="prompt", bar=False) as progress,
    ):
        progress.update(4)
    assert caplog.records == []


def test_durations_read_naturally():
    assert [format_duration(s) for s in (5, 187, 3720)] == ["5s", "3m07s", "1h02m"]
