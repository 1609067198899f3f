"""The reliability cases run the ``refine`` CLI in-process, many times, each under pytest's captured stderr."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def fresh_cli_logging():
    """Drop the CLI's log handler after each case: it holds the stderr of the case that created it."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_refine_handler", False)]:
        root.removeHandler(handler)
