"""A quiet console for local pipeline runs: one line per task on the terminal, everything else in a log file.

``kfp.local`` prints each task's whole stream (its executor JSON, every log line) to ``sys.stdout``, well over a
thousand lines for the tiny demo. :class:`QuietConsole` stands in for ``sys.stdout`` while the pipeline runs: every
byte goes to the log file, and the terminal gets one line when a task starts (on a terminal only) and one when it
ends, with its status, duration and key figure (read from the task's ``executor_output.json`` under the pipeline
root: a held-out loss, a score, what was registered). ``refine pipeline run -v`` keeps kfp's full stream instead.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")


class QuietConsole:
    """A ``sys.stdout`` replacement that logs everything to ``log_path`` and reports task boundaries to ``terminal``.

    Use as a context manager; it restores ``sys.stdout`` on exit.
    """

    def __init__(self, log_path: Path, terminal: TextIO | None = None, pipeline_root: Path | None = None) -> None:
        self.log_path = log_path
        self.terminal = terminal or sys.stdout
        self.pipeline_root = pipeline_root
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
            figure = self._key_figure(task) if status == "SUCCESS" else ""
            self._say(f"  {task:<28} {status.lower():<8} {seconds:6.1f} s" + (f"   {figure}" if figure else ""))

    def _key_figure(self, task: str) -> str:
        """The key figure of ``task``'s newest ``executor_output.json`` under the pipeline root ("" when none)."""
        if self.pipeline_root is None:
            return ""
        outputs = sorted(self.pipeline_root.glob(f"*/{task}/executor_output.json"), key=lambda p: p.stat().st_mtime)
        try:
            return key_figure(json.loads(outputs[-1].read_text())) if outputs else ""
        except (OSError, ValueError):
            return ""  # a half-written or unreadable file costs the figure, never the run

    def _say(self, line: str) -> None:
        self.terminal.write(line + "\n")
        self.terminal.flush()


def key_figure(executor_output: dict[str, Any]) -> str:
    """One short phrase for a task's result: the figures a person checks first, from its outputs' metadata."""
    metadata: dict[str, Any] = {}
    for name, output in executor_output.get("artifacts", {}).items():
        for artifact in output.get("artifacts", []):
            if name in ("metrics", "model"):
                metadata.update(artifact.get("metadata") or {})
    parts = []
    if metadata.get("arm"):  # which arm a training task belongs to (kfp names the second one "...-2")
        parts.append(f"{metadata['arm']}:")
    if "data/docs_kept" in metadata:
        parts.append(f"{metadata['data/docs_kept']:,.0f} docs, {metadata.get('data/tokens_kept', 0):,.0f} tokens")
    if metadata.get("final_eval_loss") is not None:
        parts.append(f"held-out loss {metadata['final_eval_loss']:.3f}")
    if metadata.get("final_sft_loss") is not None:
        parts.append(f"answer loss {metadata['final_sft_loss']:.3f}")
    if metadata.get("final_recall_acc") is not None:
        parts.append(f"recall {100 * metadata['final_recall_acc']:.1f}%")
    scores = [f"{key[len('eval/'):]} {value:.1f}" for key, value in metadata.items()
              if key.startswith("eval/") and isinstance(value, (int, float))]
    parts.extend(scores[:3])
    if not [p for p in parts if not p.endswith(":")] and metadata.get("train/steps") is not None:
        parts.append(f"{metadata['train/steps']:.0f} steps")
    output = executor_output.get("parameterValues", {}).get("Output")
    if isinstance(output, str) and output.startswith("models:/"):
        parts.append(output)
    if parts[:1] and parts[0].endswith(":"):
        return parts[0] + (" " + ", ".join(parts[1:]) if parts[1:] else "")
    return ", ".join(parts)
