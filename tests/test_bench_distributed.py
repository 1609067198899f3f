"""bench/bench_distributed.py on CPU: its arithmetic against hand-computed values, and one real case end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.bench_distributed import PAPER_RUN, REPO, agreeing_digits, projection, scaling_rows


def test_efficiency_is_n_gpu_tokens_per_s_over_n_times_one_gpu():
    base = {"card": "H100", "part": "scale-340m-4k", "stage": "train-ntp", "global_batch": 16, "length": 4096}
    records = [
        {**base, "parallel": "ddp", "nproc": 1, "step_time_s": 2.0, "eval_loss": 5.0},
        {**base, "parallel": "ddp", "nproc": 2, "step_time_s": 1.25, "eval_loss": 5.00001},
        {**base, "parallel": "fsdp", "nproc": 2, "step_time_s": 1.6, "eval_loss": 5.0},
        {**base, "parallel": "ddp", "nproc": 2, "step_time_s": None},  # a failed case is no row
    ]
    rows = {row["parallel"]: row for row in scaling_rows(records)}
    tokens = 16 * 4096
    assert rows["ddp"]["tok_s_1"] == pytest.approx(tokens / 2.0)
    assert rows["ddp"]["efficiency"] == pytest.approx((tokens / 1.25) / (2 * tokens / 2.0))  # 0.8
    assert rows["fsdp"]["efficiency"] == pytest.approx(0.625)
    assert len(rows) == 2


def test_agreeing_digits_and_projection():
    assert agreeing_digits(5.0, 5.0) == 16
    assert agreeing_digits(5.0, 5.00001) == 5  # relative difference 2e-6
    assert agreeing_digits(None, 5.0) is None
    p = projection(tok_s_per_gpu=10_000, efficiency=0.5, gpus=8)
    tokens = PAPER_RUN["steps"] * PAPER_RUN["docs_per_step"] * PAPER_RUN["tokens_per_doc"]
    assert p["tokens"] == 100 * 128 * 16384 == tokens
    assert p["hours"] == pytest.approx(tokens / (8 * 10_000 * 0.5) / 3600)


@pytest.mark.slow
def test_a_scale_case_runs_the_real_stage_and_records_its_figures(tmp_path):
    """One process (the 1-GPU baseline case) through the same command the device runs, on CPU."""
    state = tmp_path / "state"
    cmd = [sys.executable, "bench/bench_distributed.py", "run", "--state", str(state), "--device", "cpu",
           "--gpus", "1", "--parts", "scale-tiny-256", "--stages", "train-ntp"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (state / "results.jsonl").read_text().splitlines()]
    assert [r["case"] for r in records] == ["train-ntp/ddp/1"]  # FSDP on one process has nothing to shard
    record = records[0]
    assert record["returncode"] == 0 and record["steps"] == 4 and record["global_batch"] == 8
    assert record["step_time_s"] > 0 and record["tokens_per_s"] > 0 and record["eval_loss"] > 0
    # done cases are skipped on the next slot
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len((state / "results.jsonl").read_text().splitlines()) == 1
