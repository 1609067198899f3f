"""The ``refine`` command line: config errors exit 2 with one line, --print-config, stage dispatch and tracking."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from refine_core import cli, tracking
from refine_core.config import RunConfig

REPO = Path(__file__).resolve().parent.parent


def test_unknown_key_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train-ntp", "ntp.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "ntp.stepz" in err and "steps" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_value_and_missing_file_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["prepare-data", "ntp.batch_size=3"]) == 2
    assert "ntp.batch_size=3" in capsys.readouterr().err
    assert cli.main(["train-ntp", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_print_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: tiny\nntp: {steps: 5}\n")
    assert cli.main(["train-ntp", "--config", str(path), "ntp.lr=3e-4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "tiny" and printed["ntp"]["steps"] == 5 and printed["ntp"]["lr"] == 3e-4


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-stage"])
    assert info.value.code == 2


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Stage modules that record their calls, and a recording tracker factory."""
    calls: dict[str, list] = {"prepare": [], "train": [], "trackers": []}
    module = types.ModuleType("fake_stage")
    module.prepare = lambda cfg: calls["prepare"].append(cfg)

    def train(cfg: RunConfig, tracker: tracking.Tracker) -> None:
        calls["train"].append((cfg, tracker))
        if cfg.ntp.steps == 13:
            raise RuntimeError("stage failed")

    module.train = train
    monkeypatch.setitem(sys.modules, "fake_stage", module)
    monkeypatch.setattr(cli, "STAGES", {
        "prepare-data": cli.Stage("fake_stage", "prepare", "prep", tracked=False),
        "train-ntp": cli.Stage("fake_stage", "train", "train"),
    })

    class Recorder(tracking.NullTracker):
        def __init__(self, cfg: RunConfig, stage: str) -> None:
            self.stage, self.configs, self.status = stage, [], None
            calls["trackers"].append(self)

        def log_config(self, cfg: RunConfig) -> None:
            self.configs.append(cfg)

        def close(self, status: str = "FINISHED") -> None:
            self.status = status

    monkeypatch.setattr(tracking, "make_tracker", lambda cfg, stage, extra_tags=None: Recorder(cfg, stage))
    return calls


def test_dispatch_untracked_and_tracked(fake_stages: dict[str, list]) -> None:
    assert cli.main(["prepare-data", "name=p"]) == 0
    assert [c.name for c in fake_stages["prepare"]] == ["p"]
    assert fake_stages["trackers"] == []

    assert cli.main(["train-ntp", "name=t", "ntp.steps=3"]) == 0
    (cfg, tracker), = fake_stages["train"]
    assert cfg.ntp.steps == 3 and tracker.stage == "train-ntp"
    # The stage logs its own config (so components and tests log the same); the CLI only opens and closes the run.
    assert tracker.configs == [] and tracker.status == "FINISHED"


def test_stage_error_propagates_and_marks_run_failed(fake_stages: dict[str, list]) -> None:
    with pytest.raises(RuntimeError, match="stage failed"):
        cli.main(["train-ntp", "ntp.steps=13"])
    assert fake_stages["trackers"][0].status == "FAILED"


def test_python_dash_m_print_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "refine_core", "train-ntp", "--print-config", "name=sub", "tracking.backend=none"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["name"] == "sub" and printed["tracking"]["backend"] == "none"


def test_warmup_is_an_untracked_stage() -> None:
    stage = cli.STAGES["warmup"]
    assert (stage.module, stage.function, stage.tracked) == ("refine_core.stages.warmup", "warmup", False)
    sub = cli.build_parser().parse_args(["warmup", "--config", "c.yaml", "data.max_tokens=256"])
    assert sub.command == "warmup" and sub.overrides == ["data.max_tokens=256"]


def test_triton_cache_dir_is_set_before_the_stage_runs(
    fake_stages: dict[str, list], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "from-env"))
    seen: list[str] = []
    monkeypatch.setattr(sys.modules["fake_stage"], "prepare", lambda cfg: seen.append(os.environ["TRITON_CACHE_DIR"]))
    assert cli.main(["prepare-data"]) == 0  # not configured: the environment's stays
    assert cli.main(["prepare-data", f"triton_cache_dir={tmp_path / 'vol' / 'triton'}"]) == 0
    assert seen == [str(tmp_path / "from-env"), str(tmp_path / "vol" / "triton")]
    assert (tmp_path / "vol" / "triton").is_dir()


def test_unusable_triton_cache_dir_exits_2(
    fake_stages: dict[str, list], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "from-env"))
    (tmp_path / "file").write_text("not a directory")
    assert cli.main(["prepare-data", f"triton_cache_dir={tmp_path / 'file' / 'triton'}"]) == 2
    # The last line: a root log handler from an earlier test may still point at that test's closed capture stream.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("refine prepare-data: error: triton_cache_dir=") and "writable directory" in err
    assert fake_stages["prepare"] == []
    assert cli.main(["prepare-data", "triton_cache_dir=s3://bkt/triton"]) == 2
    assert "is a URI" in capsys.readouterr().err
