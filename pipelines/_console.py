"""A quiet console for local pipeline runs: one line per task on the terminal, everything else in a log file.

``kfp.local`` prints each task's whole stream (its executor JSON, every log line) to ``sys.stdout``, well over a
thousand lines for the tiny demo. :class:`QuietConsole` stands in for ``sys.stdout`` while the pipeline runs: every
byte goes to the log file, and the terminal gets one line when a task starts (on a terminal only) and one when it
ends, with its status and duration. ``refine pipeline run -v`` keeps kfp's full stream instead.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")


class QuietConsole:
    """A ``sys.stdout`` replacement that logs everything to ``log_path`` and reports task boundaries to ``terminal``.

    Use as a context manager; it restores ``sys.stdout`` on exit.
    """

    def __init__(self, log_path: Path, terminal: TextIO | None = None) -> None:
        self.log_path = log_path
        self.terminal = terminal or sys.stdout
        self.tasks: list[tuple[str, str, float]] = []  # (task, status, seconds)
        self._started: dict[str, float] = {}
        self._pending = ""
        self._log: TextIO | None = None
        self._saved: TextIO | None = None

    def __enter__(self) -> QuietConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")  # noqa: SIM115  (closed in __exit__)
        self._saved, sys.stdout = sys.stdout, self
        # kfp.local also logs through the root logger itself ("Cleaned up workspace", ...): into the file with the rest
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self._to_log)
        return self

    def __exit__(self, *exc: object) -> None:
        for handler in self._handlers:
            handler.removeFilter(self._to_log)
        sys.stdout = self._saved
        if self._log is not None:
            self._log.close()

    def _to_log(self, record: logging.LogRecord) -> bool:
        if record.name != "root":
            return True
        if self._log is not None and not self._log.closed:
            self._log.write(record.getMessage() + "\n")
        return False

    # the file-like surface kfp's prints and logging handlers use
    def write(self, text: str) -> int:
        assert self._log is not None
        self._log.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._scan(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def _scan(self, line: str) -> None:
        if match := _START.search(line):
            self._started[match.group(1)] = time.perf_counter()
            if self.terminal.isatty():
                self._say(f"  {match.group(1)} ...")
        elif match := _END.search(line):
            task, status = match.group(1), match.group(2)
            seconds = time.perf_counter() - self._started.pop(task, time.perf_counter())
            self.tasks.append((task, status, seconds))
            self._say(f"  {task:<28} {status.lower():<8} {seconds:6.1f} s")

    def _say(self, line: str) -> None:
        self.terminal.write(line + "\n")
        self.terminal.flush()
