"""A diverged run fails in one clear line, exports nothing and keeps its checkpoints (issue 13).

Before: ``ntp.lr=1e6`` skipped a NaN gradient in every step after the first, kept the loss at ln(vocab) and exited
0 with a model exported.
"""

from __future__ import annotations

import math

import pytest

from refine_core.cli import main
from refine_core.config import ConfigError, load_config
from refine_core.training.divergence import DivergenceGuard, TrainingDiverged
from tests.reliability.tiny_run import TINY_RUN

TINY = [
    *TINY_RUN,
    "tracking.backend=none",
]



def run(tmp_path, prepared, command, *extra) -> int:
    return main([command, f"output_dir={tmp_path}", f"data.prepared_dir={prepared}", *TINY, *extra])


def test_a_diverged_ntp_run_fails_names_the_steps_and_exports_nothing(tmp_path, prepared, capsys):
    code = run(tmp_path, prepared, "train-ntp", "ntp.lr=1e6", "ntp.steps=20", "ntp.save_every=2",
               "ntp.eval_every=0", "ntp.batch_size=4", "ntp.micro_batch_size=2")
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("refine train-ntp: failed:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "not finite in 3 steps in a row" in lines[0] and "ntp.lr=1e+06" in lines[0]
    assert "documents of the last:" in lines[0] and "ntp.max_skipped_steps" in lines[0]
    stage = tmp_path / "train-ntp"
    assert not (stage / "model").exists()  # nothing exported
    newest = sorted((stage / "checkpoints").glob("step_*"))[-1]
    assert str(newest) in lines[0]  # the message names the checkpoint to go back to


def test_a_diverged_refine_run_fails_the_same_way(tmp_path, prepared, capsys):
    code = run(tmp_path, prepared, "train-refine", "refine.lr=1e6", "refine.steps=10", "refine.batch_size=2",
               "refine.mini_batch_size=2", "refine.micro_batch_size=1", "refine.num_chunks=2", "refine.margin=8",
               "refine.rollout_tokens=3", "refine.eval_every=0", "refine.save_every=0", "refine.max_skipped_steps=2")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "refine train-refine: failed: train-refine: the gradient was not finite in 2 steps in a row" in err
    assert "no checkpoint was written yet" in err and "refine.lr=1e+06" in err
    assert not (tmp_path / "train-refine" / "model").exists()


def test_zero_disables_the_guard_and_the_skips_are_a_logged_metric(tmp_path, prepared):
    from refine_core.stages.train_ntp import train_ntp

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.prepared_dir={prepared}", *TINY, "ntp.lr=1e6",
                             "ntp.steps=5", "ntp.eval_every=0", "ntp.save_every=0", "ntp.batch_size=4",
                             "ntp.micro_batch_size=2", "ntp.max_skipped_steps=0"])
    result = train_ntp(cfg)
    totals = [h["train/skipped_steps_total"] for h in result.history if "train/skipped_steps_total" in h]
    assert len(totals) == 5 and totals[-1] >= 3 and totals == sorted(totals)
    assert all(math.isfinite(h["ntp/loss"]) or math.isnan(h["ntp/loss"]) for h in result.history if "ntp/loss" in h)


def test_the_guard_counts_only_fully_skipped_steps_in_a_row():
    guard = DivergenceGuard("train-refine", "refine", limit=2)
    guard.update(1, skipped=4, optimizer_steps=4, doc_ids=[1], last_good=None)
    guard.update(2, skipped=3, optimizer_steps=4, doc_ids=[2], last_good=None)  # one step took: the streak ends
    guard.update(3, skipped=4, optimizer_steps=4, doc_ids=[3], last_good=None)
    assert guard.streak == 1 and guard.skipped_total == 11
    with pytest.raises(TrainingDiverged, match=r"steps 3-4; documents of the last: 4\)"):
        guard.update(4, skipped=4, optimizer_steps=4, doc_ids=[4], last_good=None)


def test_a_negative_limit_is_refused():
    with pytest.raises(ConfigError, match="ntp.max_skipped_steps=-1 must be >= 0"):
        load_config(None, ["ntp.max_skipped_steps=-1"])
