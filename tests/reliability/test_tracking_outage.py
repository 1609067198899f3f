"""Tracking never takes a stage down (issue 13): an unreachable MLflow server is noticed in seconds, the stage
trains and exports as usual, its tracking goes to a local journal, and ``refine tracking sync`` uploads it later.

Before: an unreachable server held a stage for 4 minutes, then printed a 122-line traceback.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from mlflow import MlflowClient

from refine_core.cli import main
from tests.reliability.tiny_run import TINY_RUN

TINY = [
    *TINY_RUN,
    "ntp.steps=3",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=2",
    "ntp.eval_every=0",
    "ntp.save_every=0",
    "tracking.experiment=outage",
]


def closed_port() -> int:
    """A local port nothing listens on: connections are refused at once, as with a server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def bounded_http_env(monkeypatch):
    """What ``tracking.request_timeout_s=2`` / ``max_retries=0`` set, undone after the case (they are process-wide)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def test_an_unreachable_server_does_not_stop_training_and_the_journal_syncs_later(tmp_path, capsys):
    assert main(["prepare-data", f"output_dir={tmp_path}", *TINY, "tracking.backend=none"]) == 0
    down = f"http://127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    code = main(["train-ntp", f"output_dir={tmp_path}", *TINY, f"tracking.tracking_uri={down}",
                 "tracking.max_retries=0", "tracking.request_timeout_s=2"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert elapsed < 60  # MLflow's defaults retried for minutes
    assert (tmp_path / "train-ntp" / "model" / "model.safetensors").is_file()  # training went on and exported
    journals = sorted((tmp_path / "tracking-offline").glob("*.jsonl"))
    assert len(journals) == 1 and f"refine tracking sync {journals[0]}" in err
    events = [json.loads(line) for line in journals[0].read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 2, 3]
    assert events[-1] == {**events[-1], "event": "end", "status": "FINISHED"}

    # the server is still down: sync fails in one line and keeps the journal
    assert main(["tracking", "sync", str(journals[0])]) == 1
    assert "was not uploaded" in capsys.readouterr().err and journals[0].exists()
    # the server is back (here: a local store): the journal becomes a run with the same steps, then is retired
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["tracking", "sync", str(journals[0]), "--tracking-uri", store]) == 0
    run_id = capsys.readouterr().out.split("uploaded as run ")[1].strip()
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name.endswith("-train-ntp")
    assert [m.step for m in MlflowClient(store).get_metric_history(run_id, "ntp/loss")] == [1, 2, 3]
    assert run.data.params["ntp.steps"] == "3" and run.data.tags["refine.stage"] == "train-ntp"
    assert not journals[0].exists() and journals[0].with_name(journals[0].name + ".synced").exists()


def test_with_offline_false_an_unreachable_server_stops_the_stage_in_one_line(tmp_path, capsys):
    down = f"http://127.0.0.1:{closed_port()}"
    code = main(["train-ntp", f"output_dir={tmp_path}", *TINY, f"tracking.tracking_uri={down}",
                 "tracking.offline=false", "tracking.max_retries=0", "tracking.request_timeout_s=2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("refine train-ntp: failed:")]
    assert len(lines) == 1 and down in lines[0] and "tracking.offline=true" in lines[0]
