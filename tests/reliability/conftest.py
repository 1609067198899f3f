"""The reliability cases run the ``refine`` CLI in-process, many times, each under pytest's captured stderr."""

from __future__ import annotations

import logging

import pytest

from refine_core.config import load_config
from refine_core.stages.prepare_data import prepare_data
from tests.reliability.tiny_run import TINY_RUN


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The tiny corpus, prepared once for every case (``data.prepared_dir``)."""
    root = tmp_path_factory.mktemp("prepared")
    prepare_data(load_config(None, [f"output_dir={root}", *TINY_RUN, "tracking.backend=none"]))
    return root / "data"


@pytest.fixture(autouse=True)
def fresh_cli_logging():
    """Drop the CLI's log handler after each case: it holds the stderr of the case that created it."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_refine_handler", False)]:
        root.removeHandler(handler)
