"""Progress of a long phase with an ETA: a tqdm bar on a terminal, a plain log line now and then everywhere else.

Evaluation, test-time training and data preparation used to print nothing until they ended, so a long LongBench
run looked hung. Each wraps its loop in :class:`Progress`::

    with Progress("evaluate ruler_squadqa", total=len(prompts), unit="prompt") as progress:
        for batch in batches:
            ...
            progress.update(len(batch))

In a pod or CI (stderr not a terminal) it logs ``what: 40/200 prompts (20%), 3.1 prompts/s, eta 52s`` at most
every ``every_s`` seconds and once at the end, so the job log shows life without flooding.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """``52s``, ``3m07s``, ``1h02m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts units of work done out of ``total`` (see the module docstring)."""

    def __init__(self, what: str, total: int, unit: str = "item", every_s: float = LOG_EVERY_S,
                 bar: bool | None = None) -> None:
        self.what, self.total, self.unit, self.every_s = what, max(0, int(total)), unit, every_s
        self.done = 0
        self._start = self._last = time.monotonic()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=unit, leave=False, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            logger.info("%s", self.line())

    def line(self) -> str:
        """``what: done/total units (pct), rate, eta``."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = format_duration((self.total - self.done) / rate) if rate > 0 and self.total else "?"
        return (f"{self.what}: {self.done}/{self.total} {self.unit}s{pct}, {rate:.2f} {self.unit}s/s, "
                f"eta {eta}" if self.done < self.total else
                f"{self.what}: {self.done} {self.unit}s in {format_duration(elapsed)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.done and time.monotonic() - self._start >= self.every_s:
            logger.info("%s", self.line())  # long phases say when they ended; short ones stay quiet

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
