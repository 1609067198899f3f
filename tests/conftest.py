"""Fixtures shared across the test folders."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's in-process S3 with an empty bucket ``bkt``; yields a boto3 client. No real endpoint, profile or
    credentials of this machine leak in (skips when moto is not installed)."""
    moto = pytest.importorskip("moto")
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="bkt")
        yield client


@pytest.fixture
def plain_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress as a pod's log shows it, a line on every update: no tqdm bar even under ``pytest -s`` on a
    terminal, and no 30 s wait between lines."""
    monkeypatch.setattr("refine_core.progress._stderr_is_terminal", lambda: False)
    monkeypatch.setattr("refine_core.progress.LOG_EVERY_S", 0.0)
