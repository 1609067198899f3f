"""The failures a run reports to its user, as opposed to bugs.

Bad input is a :class:`refine_core.config.ConfigError` (or another ``ValueError`` / ``OSError`` whose message names
the value or path and the fix): the CLI prints that one line and exits 2. :class:`RunFailed` is a run that started
and could not finish for a reason outside the code (its gradients diverged, the disk filled, a server or bucket
failed): the CLI prints its one line and exits 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run could not finish; the message says what happened, what was kept and what to do."""
