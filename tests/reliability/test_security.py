"""Security promises kept and tested (issue 13): no pickle runs, no credential leaves the environment, no downloaded
key escapes its folder. (Non-root images and the launcher's minimal Role are held by tests/images and
tests/manifests; the compiled pipelines' freedom from credentials by tests/pipelines/test_compile.py.)
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refine_core.cli import main
from refine_core.training.checkpoint import CheckpointManager
from tests.reliability.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_RUN,
    "ntp.steps=2",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=2",
    "ntp.eval_every=0",
    "ntp.save_every=1",
]
FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEACCESSKEY0001",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-access-key-for-the-leak-scan",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-for-the-leak-scan",
    "HF_TOKEN": "hf_fakeTokenForTheLeakScan0123456789",
}


class Payload:
    """Unpickling this would create ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_trainer_state_is_refused_and_never_runs(tmp_path, capsys):
    assert main(["prepare-data", f"output_dir={tmp_path}", *TINY, "tracking.backend=none"]) == 0
    assert main(["train-ntp", f"output_dir={tmp_path}", *TINY, "tracking.backend=none"]) == 0
    marker = tmp_path / "pwned"
    for path in CheckpointManager(tmp_path / "train-ntp" / "checkpoints", keep=2).list_complete():
        torch.save({"step": 2, "evil": Payload(marker)}, path / "trainer_state.pt")  # a pickle that runs a command
    capsys.readouterr()
    code = main(["train-ntp", f"output_dir={tmp_path}", *TINY, "tracking.backend=none", "ntp.steps=3",
                 "ntp.resume=true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no checkpoint of" in err and "UnpicklingError" in err  # torch.load(weights_only=True) refused it
    assert not marker.exists()


def test_no_credential_reaches_logs_configs_tracking_or_checkpoints(tmp_path):
    """A tracked stage run with credentials in its environment and secret-looking config values: afterwards no
    credential value appears in its output, its files, the MLflow store or an offline journal."""
    env = {**os.environ, **FAKE, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    store = tmp_path / "mlflow.db"
    args = [f"output_dir={tmp_path / 'run'}", *TINY, f"tracking.tracking_uri=sqlite:///{store}",
            f"tracking.tags={{api_token: {FAKE['HF_TOKEN']}, endpoint: 'https://user:{FAKE['MLFLOW_TRACKING_PASSWORD']}"
            "@mlflow.example'}"]
    outputs = []
    for command in ("prepare-data", "train-ntp"):
        argv = [sys.executable, "-m", "refine_core", "--log-level", "DEBUG", command, *args]  # the chattiest logs
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    haystacks = {"process output": "\n".join(outputs)}
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".bin"):
            haystacks[str(path)] = path.read_bytes().decode("latin-1")
    with sqlite3.connect(store) as db:
        rows = [*db.execute("select key, value from params"), *db.execute("select key, value from tags")]
    haystacks["mlflow params and tags"] = "\n".join(f"{k}={v}" for k, v in rows)
    assert any("api_token" in k for k, _ in rows)  # the secret-looking tag was logged, with its value redacted
    leaks = [(where, name) for where, text in haystacks.items() for name, value in FAKE.items() if value in text]
    assert leaks == []


def test_downloaded_keys_never_escape_their_folder(s3, tmp_path):
    from refine_core.storage import resolve

    s3.put_object(Bucket="bkt", Key="models/tiny/config.json", Body=b"{}")
    s3.put_object(Bucket="bkt", Key="models/tiny/../../escape.txt", Body=b"x")
    with pytest.raises(ValueError, match="does not map to a safe relative path"):
        resolve("s3://bkt/models/tiny", tmp_path / "cache")
    assert not list(tmp_path.rglob("escape.txt"))


def test_an_upload_to_a_missing_bucket_fails_in_one_line_naming_the_object(s3, tmp_path):
    from refine_core.errors import RunFailed
    from refine_core.storage import publish_dir

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(RunFailed) as info:
        publish_dir(tmp_path / "model", "s3://no-such-bucket/runs/model")
    message = str(info.value)
    assert "s3://no-such-bucket/runs/model/config.json" in message and "NoSuchBucket" in message
    assert "local copy" in message and "\n" not in message
    assert (tmp_path / "model" / "config.json").is_file()  # nothing local was removed


@pytest.mark.parametrize("bad", ["../other-run/model", "/etc", "a/../../b", "C:/x"])
def test_artifact_paths_cannot_leave_the_runs_folder(bad):
    from refine_core.tracking import safe_artifact_path

    with pytest.raises(ValueError, match="would leave the run's artifact folder"):
        safe_artifact_path(bad)
    assert safe_artifact_path("checkpoints/step_00000010") == "checkpoints/step_00000010"
