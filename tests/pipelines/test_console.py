"""The quiet console of local pipeline runs: the terminal gets one line per task, the log file everything."""

from __future__ import annotations

import io
import logging
import sys

from pipelines._console import QuietConsole


def test_one_line_per_task_on_the_terminal_and_every_byte_in_the_log(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "run.log"
    with QuietConsole(log, terminal) as console:
        print("14:00:00.000 - INFO - Executing task \x1b[96m'train-ntp'\x1b[0m")
        for i in range(500):  # a task's own stream
            print(f'    {{"executor": "json line {i}"}}')
        print("14:00:09.000 - INFO - Task \x1b[96m'train-ntp'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
        logging.getLogger().info("Cleaned up workspace: /tmp/x")  # kfp logs through the root logger too
    assert sys.stdout is not console  # restored
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].split()[:2] == ["train-ntp", "success"]
    text = log.read_text()
    assert "json line 499" in text and "Executing task" in text
    assert [t for t, status, _ in console.tasks] == ["train-ntp"]
