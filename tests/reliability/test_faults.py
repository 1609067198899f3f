"""Faults survived (issue 13): SIGKILL mid-step in every training stage and while a checkpoint is being written, and
a full disk while writing one. The last good checkpoint stays intact, resume goes on from it (past a half-written
newest one) and, on the CPU, the resumed run ends with exactly the weights of an uninterrupted run.

Every run is a real ``refine`` process (``tests/reliability/fault_runner.py`` arms the fault), killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from refine_core.training.checkpoint import CheckpointManager
from tests.reliability.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_RUN,
    "tracking.backend=none",
]
STAGES = {
    # stage directory, command, settings: 4 steps, a checkpoint every 2, one optimizer step per training step
    "ntp": ("train-ntp", "train-ntp", ["ntp.steps=4", "ntp.save_every=2", "ntp.eval_every=0", "ntp.batch_size=4",
                                       "ntp.micro_batch_size=2", "ntp.lr=1e-3"]),
    "refine": ("train-refine", "train-refine", [
        "refine.steps=4", "refine.save_every=2", "refine.eval_every=0", "refine.batch_size=2",
        "refine.mini_batch_size=2", "refine.micro_batch_size=1", "refine.num_chunks=2", "refine.margin=8",
        "refine.rollout_tokens=3", "refine.lr=1e-3"]),
    "post": ("post-train-nested_sft", "post-train", [
        "post.mode=nested_sft", "post.steps=4", "post.save_every=2", "post.batch_size=2", "post.micro_batch_size=1",
        "post.max_prompt_tokens=300", "post.max_answer_tokens=8", "refine.lr=1e-3",
        "post.train_files=[configs/data/ruler_squadqa_tiny_1024_train.parquet]"]),
}


def refine(out: Path, data: Path, stage: str, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    _, command, settings = STAGES[stage]
    args = [command, f"output_dir={out}", f"data.prepared_dir={data}", *TINY, *settings, *extra]
    runner = ["-m", "tests.reliability.fault_runner", fault, "--"] if fault else ["-m", "refine_core"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *runner, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def weights(out: Path, stage: str) -> dict:
    return load_file(str(out / STAGES[stage][0] / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def data(prepared) -> Path:
    return prepared


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> dict[str, dict]:
    """Each stage run once without a fault: the weights a resumed run must end with."""
    out = {}
    for stage in STAGES:
        root = tmp_path_factory.mktemp(f"straight-{stage}")
        proc = refine(root, data, stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[stage] = weights(root, stage)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert different == []


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigkill_mid_step_then_resume_ends_bitwise_like_an_uninterrupted_run(stage, tmp_path, data, straight):
    per_step = 2 if stage == "post" else 1  # Nested SFT: the inner NTP step, then the SFT step
    killed = refine(tmp_path, data, stage, fault=f"optimizer:{2 * per_step + 1}")  # in step 3, after step 2's save
    assert killed.returncode == -signal.SIGKILL
    checkpoints = CheckpointManager(tmp_path / STAGES[stage][0] / "checkpoints", keep=2)
    assert checkpoints.latest().name == "step_00000002"
    assert not (tmp_path / STAGES[stage][0] / "model").exists()
    section = {"ntp": "ntp", "refine": "refine", "post": "post"}[stage]
    resumed = refine(tmp_path, data, stage, f"{section}.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr
    assert_same(weights(tmp_path, stage), straight[stage])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint-tmp:2", "checkpoint-marker:2"])
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(point, tmp_path, data, straight):
    killed = refine(tmp_path, data, "ntp", fault=point)  # while writing the checkpoint of step 4
    assert killed.returncode == -signal.SIGKILL
    root = tmp_path / "train-ntp" / "checkpoints"
    assert CheckpointManager(root, keep=2).latest().name == "step_00000002"  # the half-written one does not count
    resumed = refine(tmp_path, data, "ntp", "ntp.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr
    assert_same(weights(tmp_path, "ntp"), straight["ntp"])
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]  # leftovers cleaned up


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, data, straight):
    failed = refine(tmp_path, data, "ntp", fault="enospc:2")  # the weights of the step-4 checkpoint
    assert failed.returncode == 1
    lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("refine train-ntp: failed:")]
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "No space left on device" in lines[0] and "step_00000002 is intact" in lines[0]
    root = tmp_path / "train-ntp" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    resumed = refine(tmp_path, data, "ntp", "ntp.resume=true")
    assert resumed.returncode == 0 and "at step 2" in resumed.stderr
    assert_same(weights(tmp_path, "ntp"), straight["ntp"])


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> Path:
    """A tiny model with the byte tokenizer: what test-time training starts from."""
    import torch

    from refine_core.models import DeltaNetConfig, build_model, save_pretrained
    from refine_core.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    config = DeltaNetConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=tok.vocab_size,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return save_pretrained(build_model(config), tmp_path_factory.mktemp("start") / "model", tokenizer=tok)


def ttt(out: Path, model: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    args = ["ttt", f"output_dir={out}", "device=cpu", "tracking.backend=none", f"model.source={model}",
            "model.tokenizer=null", "eval.task_files=[configs/data/ruler_squadqa_tiny_1024_test.parquet]",
            "eval.max_examples=4", "eval.max_seq_tokens=512", "ttt.batch_size=2", "refine.num_chunks=2",
            "refine.margin=8", "refine.rollout_tokens=3", "refine.mini_batch_size=2", "refine.micro_batch_size=1",
            "refine.lr=1e-2", "refine.reward=exact_match"]
    runner = ["-m", "tests.reliability.fault_runner", fault, "--"] if fault else ["-m", "refine_core"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *runner, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_sigkill_during_test_time_training_leaves_the_start_model_and_a_rerun_matches(tmp_path, start_model):
    """TTT keeps no checkpoints (it adapts a copy in memory and writes results at the end): a killed run leaves the
    model it started from byte for byte and no partial results, and running it again gives the uninterrupted
    run's answers."""
    before = {p.name: p.read_bytes() for p in start_model.iterdir()}
    straight = ttt(tmp_path / "straight", start_model)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = ttt(tmp_path / "again", start_model, fault="optimizer:2")  # the second batch's adaptation
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "again" / "ttt" / "predictions").exists()  # nothing that looks like a result
    assert {p.name: p.read_bytes() for p in start_model.iterdir()} == before
    rerun = ttt(tmp_path / "again", start_model)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in ("predictions/ruler_squadqa.jsonl",):
        assert (tmp_path / "again" / "ttt" / name).read_text() == (tmp_path / "straight" / "ttt" / name).read_text()
