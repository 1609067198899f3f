"""The quiet console of local pipeline runs: the terminal gets one line per task, the log file everything."""

from __future__ import annotations

import io
import logging
import sys

from pipelines._console import QuietConsole


def test_one_line_per_task_on_the_terminal_and_every_byte_in_the_log(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "run.log"
    with QuietConsole(log, terminal) as console:
        print("14:00:00.000 - INFO - Executing task \x1b[96m'train-ntp'\x1b[0m")
        for i in range(500):  # a task's own stream
            print(f'    {{"executor": "json line {i}"}}')
        print("14:00:09.000 - INFO - Task \x1b[96m'train-ntp'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
        logging.getLogger().info("Cleaned up workspace: /tmp/x")  # kfp logs through the root logger too
    assert sys.stdout is not console  # restored
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].split()[:2] == ["train-ntp", "success"]
    text = log.read_text()
    assert "json line 499" in text and "Executing task" in text
    assert [t for t, status, _ in console.tasks] == ["train-ntp"]


def test_a_finished_task_line_carries_its_key_figure(tmp_path):
    """The figure comes from the task's executor_output.json under the pipeline root (the newest run's)."""
    import json

    from pipelines._console import key_figure

    task_dir = tmp_path / "refine-full-2026" / "train-refine"
    task_dir.mkdir(parents=True)
    model = {"final_eval_loss": 4.4927, "final_recall_acc": 0.2766, "arm": "refine"}
    (task_dir / "executor_output.json").write_text(json.dumps({"artifacts": {
        "metrics": {"artifacts": [{"metadata": {"train/steps": 6.0, "train/final_eval_loss": 4.4927}}]},
        "model": {"artifacts": [{"metadata": model}]},
    }}))
    terminal = io.StringIO()
    with QuietConsole(tmp_path / "run.log", terminal, pipeline_root=tmp_path):
        print("Executing task 'train-refine'")
        print("Task 'train-refine' finished with status SUCCESS")
        print("Executing task 'finish-run'")  # no executor output: no figure, no error
        print("Task 'finish-run' finished with status SUCCESS")
    first, second = terminal.getvalue().splitlines()
    assert first.endswith("refine: held-out loss 4.493, recall 27.7%") and second.split()[-1] == "s"
    counts = {"data/docs_kept": 48.0, "data/tokens_kept": 12288.0}
    data = {"artifacts": {"metrics": {"artifacts": [{"metadata": counts}]}}}
    assert key_figure(data) == "48 docs, 12,288 tokens"
    assert key_figure({"artifacts": {"metrics": {"artifacts": [{"metadata": {"eval/ruler_squadqa": 12.5}}]}}}) == (
        "ruler_squadqa 12.5"
    )
    assert key_figure({"parameterValues": {"Output": "models:/refine-deltanet/5"}}) == "models:/refine-deltanet/5"
    # post-training has no held-out loss: its last answer loss, else its steps, after the arm
    post = {"metrics": {"artifacts": [{"metadata": {"train/steps": 2.0}}]}}
    assert key_figure({"artifacts": {**post, "model": {"artifacts": [{"metadata": {"arm": "refine"}}]}}}) == (
        "refine: 2 steps"
    )
    model = {"model": {"artifacts": [{"metadata": {"arm": "refine", "final_sft_loss": 5.0946}}]}}
    assert key_figure({"artifacts": {**post, **model}}) == "refine: answer loss 5.095"
