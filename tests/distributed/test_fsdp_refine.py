"""REFINE mid-training (``train-refine``) under FSDP2 and real ``torchrun`` (gloo, CPU) equals DDP and one process.

Both rollout engines: ``branch`` (the default; its first mini-batch samples inside its own policy pass, the second
from a separate no-grad pass, so both paths run) on DeltaNet, and ``faithful`` on GatedDeltaNet with the KL option
and activation checkpointing, which the FSDP blocks must compose with. Two ranks split each mini-batch of 6
documents into micro-batches of 2 + 1 documents, three ranks into one of 2, one process into three of 2.

Tolerances: float32 on CPU. The runs add the same per-document gradients in another order (per rank, then across
ranks; FSDP's gradient norm is a sum of per-shard squares), so they agree to float32 rounding, not bitwise. Weights
after 2 steps of 2 AdamW updates at lr 1e-3: ``rtol=atol=1e-5`` (measured max |diff|: FSDP vs DDP 8e-8, 2-rank FSDP
vs one process 2.2e-6, 3-rank FSDP vs one process 7.7e-7, faithful FSDP vs one process 2.6e-6, i.e. at most 30% of
the allowance). Logged metrics (rank 0's exported history, full precision): see ``TOLERANCE``. The rollouts
themselves are the same tokens: sampling is seeded per document, wherever it lands. The resumed run's positions,
rollouts and losses are those of the uninterrupted run (its weights differ by rounding, as above).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from refine_core.config import load_config
from refine_core.stages.prepare_data import prepare_data
from refine_core.stages.train_refine import train_refine
from tests.distributed.test_torchrun import assert_same_weights, torchrun, weights

pytestmark = pytest.mark.slow

DATA = [
    "device=cpu",
    "model.config={hidden_size: 32, num_hidden_layers: 2, num_heads: 2}",  # two FSDP block units + the root
    "data.sources=[{path: synthetic, synthetic_docs: 40, synthetic_words: 60}]",
    "data.min_tokens=96",
    "data.max_tokens=128",
    "data.eval_docs=5",
]
REFINE = [
    *DATA,
    "refine.steps=2",
    "refine.batch_size=12",
    "refine.mini_batch_size=6",  # two optimizer steps per REFINE step; the second one is off-policy
    "refine.micro_batch_size=2",
    "refine.num_chunks=3",
    "refine.rollout_tokens=3",
    "refine.margin=10",
    "refine.lr=1e-3",
    "refine.eval_every=2",
    "refine.eval_max_docs=5",  # 3 eval batches: with 2 ranks one rank runs a lockstep-only forward
    "refine.save_every=1",
    "tracking.backend=none",
]
# GatedDeltaNet, the other fla mixer (gates with their own per-head parameters).
FAITHFUL = [
    "refine.engine=faithful",
    "refine.kl_coef=0.05",
    "model.gradient_checkpointing=true",
    "model.arch=gated_deltanet",
    "model.config={hidden_size: 32, num_hidden_layers: 2, num_heads: 2, head_dim: 16, expand_v: 1.0}",
]
# Measured (max over the runs below): relative 4e-8 for the NTP loss, 1e-7 for the gradient norm, 2e-6 for the KL;
# eval/loss equal. The PPO loss and the mean reward are means of signed terms of size about 1 (normalised
# advantages, cosines) that nearly cancel (the PPO loss is about 5e-4), so theirs is absolute: measured 1.4e-7 and
# 3e-8.
TOLERANCE = {
    "refine/ntp_loss": dict(rel=1e-6),
    "refine/nsp_loss": dict(rel=0, abs=1e-6),
    "refine/reward_mean": dict(rel=0, abs=1e-6),
    "refine/kl": dict(rel=1e-4),
    "refine/grad_norm": dict(rel=1e-6),
    "eval/loss": dict(rel=1e-6),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    prepare_data(load_config(None, [f"output_dir={root}", *DATA]))
    return root / "data"


def _history(export: Path) -> list[dict[str, float]]:
    """Rank 0's full-precision per-step metrics, from the result the stage exported (``export_uri``)."""
    return json.loads((export / "result.json").read_text())["history"]


def _assert_same_metrics(got: list[dict[str, float]], want: list[dict[str, float]], label: str) -> None:
    """Same steps and metrics; each within its tolerance (``TOLERANCE``), the measured differences printed."""
    assert [row["step"] for row in got] == [row["step"] for row in want], label
    for name, tol in TOLERANCE.items():
        a = [row[name] for row in got if name in row]
        b = [row[name] for row in want if name in row]
        assert len(a) == len(b) > 0 or name == "refine/kl" and not a and not b, (label, name)  # kl: with kl_coef
        if not b:
            continue
        assert a == pytest.approx(b, **tol), (label, name)
        diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
        rel = max(d / abs(y) for d, y in zip(diffs, b, strict=True))
        print(f"  {label} {name}: max abs diff {max(diffs):.1e}, max rel {rel:.1e}")


def _weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """The largest |a - b| over all weights, and its share of ``assert_same_weights``' allowance (1e-5 + 1e-5 |b|)."""
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    used = max(float(((a[k] - b[k]).abs() / (1e-5 + 1e-5 * b[k].abs())).max()) for k in a)
    return f"max |diff| {worst:.1e} ({used:.0%} of the tolerance)"


def _run(tmp_path: Path, name: str, overrides: list[str], *, parallel: str | None = None, nproc: int = 2):
    """train-refine under torchrun (``parallel`` set) or in this process; returns (weights, history)."""
    out = tmp_path / name
    args = [f"output_dir={out}", f"export_uri={out / 'export'}", *overrides]
    if parallel is None:
        result = train_refine(load_config(None, args))
        return weights(result.model_dir), result.history
    proc = torchrun("train-refine", [*args, f"parallel={parallel}"], nproc=nproc)
    if parallel == "fsdp":
        assert f"FSDP2: 2 blocks + root sharded over {nproc} ranks" in proc.stdout
    return weights(out / "train-refine" / "model"), _history(out / "export")


def test_refine_branch_engine_fsdp_equals_ddp_and_one_process_and_resumes_in_one_process(tmp_path, prepared):
    common = [f"data.prepared_dir={prepared}", *REFINE]
    one_w, one_h = _run(tmp_path, "one", common)
    ddp_w, ddp_h = _run(tmp_path, "ddp", common, parallel="ddp")
    runs = {
        "ddp": (ddp_w, ddp_h),
        "fsdp": _run(tmp_path, "fsdp", common, parallel="fsdp"),
        # Three ranks: another split of every mini-batch (one micro-batch of 2 documents per rank).
        "fsdp3": _run(tmp_path, "fsdp3", common, parallel="fsdp", nproc=3),
    }
    assert [row["step"] for row in one_h] == [0.0, 1.0, 2.0]  # eval/loss at step 0, then the two steps
    # Every optimizer step was taken (the comparison is between trained models, not skipped updates).
    assert [row.get("refine/optimizer_steps") for row in one_h] == [None, 2.0, 2.0]
    assert sum(row.get("refine/skipped_steps", 0.0) for row in one_h) == 0
    for name, (w, h) in runs.items():
        assert_same_weights(one_w, w)
        print(f"branch {name}: weights vs one process {_weight_diff(w, one_w)}, vs ddp {_weight_diff(w, ddp_w)}")
        _assert_same_metrics(h, one_h, f"branch {name}")

    # The 2-rank FSDP run's step-1 checkpoint (both ranks wrote their shards) resumes in one process: what an
    # interruption after step 1 leaves, with the later checkpoint and the export removed.
    run = tmp_path / "fsdp" / "train-refine"
    state = run / "checkpoints" / "step_00000001" / "state"
    assert sorted(p.name for p in state.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    shutil.rmtree(run / "model")
    resumed = train_refine(load_config(None, [f"output_dir={tmp_path / 'fsdp'}", *common, "refine.resume=true"]))
    assert resumed.steps == 2 and [row["step"] for row in resumed.history] == [2.0]
    resumed_w = weights(resumed.model_dir)
    assert_same_weights(one_w, resumed_w)
    print(f"branch: 2-rank FSDP checkpoint resumed in one process vs one process: {_weight_diff(resumed_w, one_w)}")
    _assert_same_metrics(resumed.history, one_h[-1:], "resumed")  # same positions, rollouts and losses


def test_refine_faithful_engine_with_kl_and_checkpointing_fsdp_equals_one_process(tmp_path, prepared):
    common = [f"data.prepared_dir={prepared}", *REFINE, *FAITHFUL]
    one_w, one_h = _run(tmp_path, "one", common)
    fsdp_w, fsdp_h = _run(tmp_path, "fsdp", common, parallel="fsdp")
    assert "refine/kl" in one_h[-1]
    assert_same_weights(one_w, fsdp_w)
    print(f"faithful fsdp: weights vs one process {_weight_diff(fsdp_w, one_w)}")
    _assert_same_metrics(fsdp_h, one_h, "faithful fsdp")
