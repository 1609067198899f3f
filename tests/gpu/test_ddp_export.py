"""GPU: what a TrainJob's trainer pod runs, on two GPUs of one host — ``torchrun -m refine_core <stage>`` with NCCL,
the inputs made local on one rank per node behind a barrier, and rank 0 publishing the result to ``export_uri``
(the launcher's hand-over, refine_core.distributed.handover) after the last barrier.

NTP on 2 GPUs is compared with the single-process CPU run of the same global batch (fp32 on both; cuDNN's TF32
convolutions and reduction order are the only differences). REFINE samples its rollouts from the device's random
stream, so its 2-GPU run is checked to complete and export, not compared.

Run on the GPU device: ``pytest -m gpu tests/gpu/test_ddp_export.py -s`` (needs 2 GPUs; fla is not needed: fp32
runs on the PyTorch ops).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from refine_core.config import load_config  # noqa: E402
from refine_core.stages.prepare_data import prepare_data  # noqa: E402
from refine_core.stages.train_ntp import train_ntp  # noqa: E402
from refine_core.training.result import load_exported_result  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "precision=fp32",
    "model.config={hidden_size: 64, num_hidden_layers: 2, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 40, synthetic_words: 80}]",
    "data.min_tokens=128",
    "data.max_tokens=192",
    "data.eval_docs=4",
    "ntp.steps=6",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=1",
    "ntp.lr=2e-3",
    "ntp.eval_every=3",
    "ntp.eval_max_docs=4",
    "ntp.save_every=3",
    "refine.steps=2",
    "refine.batch_size=4",
    "refine.mini_batch_size=2",
    "refine.micro_batch_size=1",
    "refine.num_chunks=3",
    "refine.margin=10",
    "refine.eval_every=2",
    "refine.eval_max_docs=4",
    "tracking.backend=none",
]


def _torchrun(stage: str, args: list[str], log: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               "--master_port=29531", "-m", "refine_core", stage, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_ntp_on_two_gpus_exports_what_one_cpu_process_trains(tmp_path):
    data = tmp_path / "data"
    prepare_data(load_config(None, [*COMMON, f"output_dir={tmp_path}", f"data.prepared_dir={data}"]))
    export = tmp_path / "export-ntp"
    logs = _torchrun("train-ntp", [*COMMON, "device=cuda", f"data.prepared_dir={data}",
                                   f"output_dir={tmp_path / 'gpu'}", f"export_uri={export}"], tmp_path / "ntp.log")
    assert "rank 0/2 (local 0) on cuda:0 with nccl" in logs
    gpu = load_exported_result(str(export), tmp_path / "cache")
    cpu = train_ntp(load_config(None, [*COMMON, "device=cpu", f"data.prepared_dir={data}",
                                       f"output_dir={tmp_path / 'cpu'}"]))
    gpu_losses = [h["eval/loss"] for h in gpu.history if "eval/loss" in h]
    cpu_losses = [h["eval/loss"] for h in cpu.history if "eval/loss" in h]
    print(f"\nheld-out loss, 2 GPUs (NCCL): {gpu_losses}\nheld-out loss, 1 CPU process: {cpu_losses}")
    assert gpu.steps == cpu.steps == 6 and len(gpu_losses) == len(cpu_losses) == 3
    assert all(abs(g - c) < 2e-3 * abs(c) for g, c in zip(gpu_losses, cpu_losses, strict=True))
    ours, theirs = load_file(cpu.model_dir / "model.safetensors"), load_file(gpu.model_dir / "model.safetensors")
    worst = max(float((ours[k] - theirs[k]).abs().max() / ours[k].abs().max().clamp_min(1e-6)) for k in ours)
    print(f"max relative weight difference after 6 steps: {worst:.2e}")
    assert worst < 1e-2


def test_refine_on_two_gpus_completes_and_exports(tmp_path):
    data = tmp_path / "data"
    prepare_data(load_config(None, [*COMMON, f"output_dir={tmp_path}", f"data.prepared_dir={data}"]))
    export = tmp_path / "export-refine"
    _torchrun("train-refine", [*COMMON, "device=cuda", f"data.prepared_dir={data}",
                               f"output_dir={tmp_path / 'gpu'}", f"export_uri={export}"], tmp_path / "refine.log")
    result = load_exported_result(str(export), tmp_path / "cache")
    assert result.steps == 2 and result.final_eval_loss is not None and math.isfinite(result.final_eval_loss)
    rewards = [h["refine/reward_mean"] for h in result.history if "refine/reward_mean" in h]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert (result.model_dir / "model.safetensors").is_file()
