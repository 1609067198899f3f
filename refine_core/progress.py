"""Progress of a long phase with an ETA: a tqdm bar on a terminal, a plain log line now and then everywhere else.

Evaluation, test-time training, data preparation and S3 transfers used to print nothing until they ended, so a
long LongBench run or a multi-GB download looked hung. Each wraps its loop in :class:`Progress`::

    with Progress("evaluate ruler_squadqa", total=len(prompts), unit="prompt") as progress:
        for batch in batches:
            ...
            progress.update(len(batch))

In a pod or CI (stderr not a terminal) it logs ``what: 40/200 prompts (20%), 3.10 prompts/s, eta 52s`` at most
every ``every_s`` seconds, and ``what: done, 200 prompts in 1m04s (3.12 prompts/s)`` at the end of a phase that
lasted that long, so the job log shows life without flooding. With ``total=None`` (a stream of unknown length)
the lines carry the count and the rate only. ``unit="B"`` counts bytes and shows them as KiB / MiB / GiB.

:meth:`Progress.update` may be called from several threads at once (boto3 calls a transfer's callback from its
worker threads).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType

from refine_core.redaction import redact_text

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0
# The unit that makes a Progress count bytes, shown with binary prefixes (tqdm's ``unit="B"`` convention).
BYTES = "B"


def format_duration(seconds: float) -> str:
    """``52s``, ``3m07s``, ``1h02m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.3 MiB``, ``4.0 GiB``."""
    value = float(n)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for prefix in ("Ki", "Mi", "Gi", "Ti"):
        value /= 1024
        if abs(value) < 1024 or prefix == "Ti":
            break
    return f"{value:.1f} {prefix}B"


def _stderr_is_terminal() -> bool:
    """Whether a bar can be drawn (a function, so that tests can pretend a pod's log)."""
    return sys.stderr.isatty()


class Progress:
    """Counts units of work done out of ``total`` (see the module docstring).

    Args:
        what: the phase, first on every line (URLs in it lose their user info: the line goes to shared logs).
        total: units to do, or ``None`` when unknown (no percentage, no ETA).
        unit: singular name of a unit (lines add an ``s``); ``"B"`` for bytes.
        every_s: at most one plain line per this many seconds; ``None``: :data:`LOG_EVERY_S` at construction.
        bar: a tqdm bar instead of lines; ``None``: when stderr is a terminal.
    """

    def __init__(self, what: str, total: int | None, unit: str = "item", every_s: float | None = None,
                 bar: bool | None = None) -> None:
        self.what, self.unit = redact_text(what), unit
        self.total = None if total is None else max(0, int(total))
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.done = 0
        self._postfix = ""
        self._said_done = False  # the last line logged was the "done" one (close() need not repeat it)
        # boto3 reports bytes from its worker threads: the count, the clock check and the line go together.
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()
        use_bar = _stderr_is_terminal() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            scale = {"unit_scale": True, "unit_divisor": 1024} if unit == BYTES else {}
            self._bar = tqdm(total=self.total, desc=self.what, unit=unit, leave=False, file=sys.stderr, **scale)

    def update(self, n: int = 1) -> None:
        """Add ``n`` units done (negative when a transfer rewinds to retry a part)."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
                return
            now = time.monotonic()
            if now - self._last >= self.every_s:
                self._last = now
                self._said_done = self.total is not None and self.done >= self.total
                logger.info("%s", self._line(now))

    def set_postfix(self, text: str) -> None:
        """Extra state appended to every line from now on (``kept 812 (13002240 tokens)``), like tqdm's."""
        with self._lock:
            self._postfix = text
            if self._bar is not None:
                self._bar.set_postfix_str(text, refresh=False)

    def _amount(self, n: float) -> str:
        return format_bytes(n) if self.unit == BYTES else f"{n:.0f} {self.unit}s"

    def _rate(self, rate: float) -> str:
        return f"{format_bytes(rate)}/s" if self.unit == BYTES else f"{rate:.2f} {self.unit}s/s"

    def line(self) -> str:
        """``what: done/total units (pct), rate, eta`` (``what: done, N units in T (rate)`` once all is done)."""
        return self._line(time.monotonic())

    def _line(self, now: float, stopped: bool = False) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        postfix = f", {self._postfix}" if self._postfix else ""
        if stopped:
            return f"{self.what}: stopped after {self._amount(self.done)} in {format_duration(elapsed)}{postfix}"
        if self.total is None:
            return f"{self.what}: {self._amount(self.done)}, {self._rate(rate)}{postfix}"
        if self.done >= self.total:
            return (f"{self.what}: done, {self._amount(self.done)} in {format_duration(elapsed)} "
                    f"({self._rate(rate)}){postfix}")
        if self.unit == BYTES:
            count = f"{format_bytes(self.done)}/{format_bytes(self.total)}"
        else:
            count = f"{self.done}/{self.total} {self.unit}s"
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{self.what}: {count}{pct}, {self._rate(rate)}, eta {eta}{postfix}"

    def close(self, failed: bool = False) -> None:
        """End the phase: one last line when it lasted ``every_s`` or more (short phases stay quiet).

        A phase of unknown length that ends without ``failed`` is done: its last line says so.
        """
        with self._lock:
            if self._bar is not None:
                self._bar.close()
            now = time.monotonic()
            if self.done and now - self._start >= self.every_s and not (self._said_done and not failed):
                if self.total is None and not failed:
                    self.total = self.done
                logger.info("%s", self._line(now, stopped=failed))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)
