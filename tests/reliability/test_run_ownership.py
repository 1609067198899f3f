"""A run owns its output: it never resumes, prunes or exports another run's work (issue 13).

Before: ``ntp.resume=true`` in a directory holding another run's checkpoints "resumed at step 60" of that run,
trained nothing and exported the old model; a fresh run over old checkpoints pruned its own newest checkpoint and
kept the old run's; a run killed early left the previous run's ``model/`` beside its own ``config.yaml``.
"""

from __future__ import annotations

import pytest
import torch

from refine_core.cli import main
from refine_core.training.checkpoint import CheckpointManager, write_directory_atomically
from tests.reliability.tiny_run import TINY_RUN

TINY = [
    *TINY_RUN,
    "tracking.backend=none",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=2",
    "ntp.eval_every=0",
    "ntp.save_every=2",
    "ntp.lr=1e-3",
]



def ntp(tmp_path, prepared, *extra) -> int:
    return main(["train-ntp", f"output_dir={tmp_path}", f"data.prepared_dir={prepared}", *TINY, *extra])


def one_error_line(err: str, command: str = "train-ntp") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"refine {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resuming_another_runs_checkpoint_is_refused_unless_forced(tmp_path, prepared, capsys):
    assert ntp(tmp_path, prepared, "ntp.steps=4") == 0
    capsys.readouterr()
    # the same output_dir, another run: a different learning rate
    assert ntp(tmp_path, prepared, "ntp.steps=6", "ntp.lr=5e-3", "ntp.resume=true") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "step_00000004 belongs to another run" in line and "ntp.resume=force" in line
    assert line.count("config ") == 2  # both identities are named
    # the same run extended to more steps resumes (steps, cadence and resume do not change what is trained)
    assert ntp(tmp_path, prepared, "ntp.steps=6", "ntp.resume=true") == 0
    assert "resumed train-ntp" in capsys.readouterr().err
    assert ntp(tmp_path, prepared, "ntp.steps=8", "ntp.lr=5e-3", "ntp.resume=force") == 0
    assert CheckpointManager(tmp_path / "train-ntp" / "checkpoints", keep=2).latest().name == "step_00000008"


def test_a_fresh_run_refuses_an_earlier_runs_output_unless_overwrite(tmp_path, prepared, capsys):
    assert ntp(tmp_path, prepared, "ntp.steps=6") == 0
    stage = tmp_path / "train-ntp"
    before = sorted(p.name for p in (stage / "checkpoints").iterdir())
    capsys.readouterr()
    assert ntp(tmp_path, prepared, "ntp.steps=2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(stage / "checkpoints") in line and "overwrite=true" in line and "ntp.resume=true" in line
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == before  # nothing pruned, nothing written
    assert ntp(tmp_path, prepared, "ntp.steps=2", "overwrite=true") == 0
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["step_00000002"]


def test_a_checkpoint_without_an_identity_is_another_run(tmp_path, prepared, capsys):
    assert ntp(tmp_path, prepared, "ntp.steps=2") == 0
    newest = CheckpointManager(tmp_path / "train-ntp" / "checkpoints", keep=2).latest()
    state = torch.load(newest / "trainer_state.pt", weights_only=True)
    del state["run_identity"]  # as written before checkpoints carried one
    torch.save(state, newest / "trainer_state.pt")
    capsys.readouterr()
    assert ntp(tmp_path, prepared, "ntp.steps=4", "ntp.resume=true") == 2
    assert "no run identity" in one_error_line(capsys.readouterr().err)


def test_a_bad_resume_value_is_refused(tmp_path, prepared, capsys):
    assert ntp(tmp_path, prepared, "ntp.resume=always") == 2
    assert "ntp.resume='always'; use true, false or force" in one_error_line(capsys.readouterr().err)


def test_the_exported_model_is_swapped_in_whole(tmp_path):
    target = tmp_path / "model"
    write_directory_atomically(target, lambda d: (d / "weights").write_text("old"))

    def crash(d):
        (d / "weights").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_directory_atomically(target, crash)
    assert (target / "weights").read_text() == "old"  # the previous model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left
    write_directory_atomically(target, lambda d: (d / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, prepared, capsys):
    assert ntp(tmp_path, prepared, "ntp.steps=4", "ntp.stop_after=4") == 0  # checkpoints at steps 2 and 4
    checkpoints = CheckpointManager(tmp_path / "train-ntp" / "checkpoints", keep=2)
    newest = checkpoints.latest()
    weights = newest / "state" / "__0_0.distcp"  # the model and optimizer tensors (torch.distributed.checkpoint)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated after it was marked complete
    capsys.readouterr()
    assert ntp(tmp_path, prepared, "ntp.steps=4", "ntp.resume=true") == 0
    err = capsys.readouterr().err
    assert "step_00000004 cannot be read" in err and "resumed train-ntp from" in err and "at step 2" in err


def test_no_readable_checkpoint_stops_with_their_names(tmp_path, prepared, capsys):
    assert ntp(tmp_path, prepared, "ntp.steps=4", "ntp.stop_after=4") == 0
    for path in CheckpointManager(tmp_path / "train-ntp" / "checkpoints", keep=2).list_complete():
        (path / "trainer_state.pt").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert ntp(tmp_path, prepared, "ntp.steps=4", "ntp.resume=true") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no checkpoint of" in line and "step_00000002" in line and "step_00000004" in line
