"""FSDP2 under real ``torchrun`` (gloo on CPU) equals DDP and one process, and checkpoints reshard across rank counts.

Tolerances: every run is float32 on CPU. Runs with a different number of ranks (or DDP vs FSDP) add the same
per-document gradients in a different order (per rank, then across ranks; FSDP's gradient norm is a sum of per-shard
squares), so they agree to float32 rounding, not bitwise: weights to ``rtol=atol=1e-5`` (measured after 4 AdamW
steps, max over tensors of max|diff| / max|w|: FSDP vs DDP 1.2e-7, FSDP vs one process 6.3e-6) and losses to
``rel=1e-6`` (the rank-0 log prints four decimals, so logged torchrun losses are compared to ``abs=1e-4``). The
resharding itself is exact: DCP copies the saved tensors' bytes into the new shards (checked bitwise below).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from refine_core.config import load_config
from refine_core.stages.prepare_data import prepare_data
from refine_core.stages.train_ntp import train_ntp
from tests.distributed.test_torchrun import assert_same_weights, torchrun, weights

pytestmark = pytest.mark.slow

# Two blocks (two FSDP units plus the root); six documents per step: two or three ranks take 3 or 2 each.
DATA = [
    "device=cpu",
    "model.config={hidden_size: 32, num_hidden_layers: 2, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 40, synthetic_words: 60}]",
    "data.min_tokens=96",
    "data.max_tokens=128",
    "data.eval_docs=5",
]
NTP = [
    *DATA,
    "ntp.steps=4",
    "ntp.batch_size=6",
    "ntp.micro_batch_size=2",  # 2 ranks: micro-batches of 2 + 1 (no_sync on the first); 3 ranks: one of 2
    "ntp.lr=1e-3",
    "ntp.eval_every=2",
    "ntp.eval_max_docs=5",  # 3 eval batches: with 2 ranks one rank runs a lockstep-only forward
    "ntp.save_every=2",
    "tracking.backend=none",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    prepare_data(load_config(None, [f"output_dir={root}", *DATA]))
    return root / "data"


def _losses(stdout: str) -> list[float]:
    """The per-step NTP losses rank 0 logged (``step 3/4 | loss 5.4932 | ...``, four decimals)."""
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ``max|a - b| / max|b|`` over the tensors (a difference relative to the tensor's scale)."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)


def test_fsdp_equals_ddp_and_one_process(tmp_path, prepared):
    common = [f"data.prepared_dir={prepared}", *NTP]
    single = train_ntp(load_config(None, [f"output_dir={tmp_path / 'single'}", *common]))
    ddp = torchrun("train-ntp", [f"output_dir={tmp_path / 'ddp'}", "parallel=ddp", *common])
    fsdp = torchrun("train-ntp", [f"output_dir={tmp_path / 'fsdp'}", "parallel=fsdp", *common])
    assert "FSDP2: 2 blocks + root sharded over 2 ranks" in fsdp.stdout

    single_w = weights(single.model_dir)
    ddp_w = weights(tmp_path / "ddp" / "train-ntp" / "model")
    fsdp_w = weights(tmp_path / "fsdp" / "train-ntp" / "model")
    # The exported model is one whole HF-layout file gathered from the shards, with the same keys as one process.
    assert_same_weights(single_w, fsdp_w)
    assert_same_weights(ddp_w, fsdp_w)
    print(f"max relative weight difference: fsdp-single {_max_rel(fsdp_w, single_w):.2e}, "
          f"fsdp-ddp {_max_rel(fsdp_w, ddp_w):.2e}")
    single_losses = [h["ntp/loss"] for h in single.history if "ntp/loss" in h]
    assert _losses(fsdp.stdout) == pytest.approx(_losses(ddp.stdout), abs=1e-4)  # logged with four decimals
    assert _losses(fsdp.stdout) == pytest.approx(single_losses, abs=1e-4)
    assert len(single_losses) == 4

    # One process under torchrun still takes the FSDP path (what the one-GPU device run checks), to the same result.
    one = torchrun("train-ntp", [f"output_dir={tmp_path / 'fsdp1'}", "parallel=fsdp", *common], nproc=1)
    assert "FSDP2: 2 blocks + root sharded over 1 ranks" in one.stdout
    assert_same_weights(single_w, weights(tmp_path / "fsdp1" / "train-ntp" / "model"))


def test_checkpoint_of_two_ranks_resumes_with_one_and_three(tmp_path, prepared):
    common = [f"data.prepared_dir={prepared}", *NTP]
    # The reference: the uninterrupted run in one process.
    straight = train_ntp(load_config(None, [f"output_dir={tmp_path / 'straight'}", *common]))

    for parallel in ("fsdp", "ddp"):
        run = tmp_path / f"{parallel}2"
        torchrun("train-ntp", [f"output_dir={run}", f"parallel={parallel}", *common, "ntp.stop_after=2"])
        state_files = sorted(p.name for p in (run / "train-ntp" / "checkpoints" / "step_00000002" / "state").iterdir())
        # FSDP: one file per rank (each writes its shards); DDP: rank 0's complete copy, written by rank 0 alone.
        assert state_files == [".metadata", "__0_0.distcp", *(["__1_0.distcp"] if parallel == "fsdp" else [])]
        shutil.copytree(run, tmp_path / f"{parallel}2-copy")

    # FSDP's checkpoint (2 ranks) resumes in one process; DDP's (2 ranks) with FSDP on 3 ranks.
    one = train_ntp(load_config(None, [f"output_dir={tmp_path / 'fsdp2'}", *common, "ntp.resume=true"]))
    three = torchrun("train-ntp", [f"output_dir={tmp_path / 'ddp2'}", "parallel=fsdp", *common, "ntp.resume=true"],
                     nproc=3)
    assert "resumed train-ntp from" in three.stdout and "sharded over 3 ranks" in three.stdout
    straight_w = weights(straight.model_dir)
    one_w, three_w = weights(one.model_dir), weights(tmp_path / "ddp2" / "train-ntp" / "model")
    assert_same_weights(straight_w, one_w)
    assert_same_weights(straight_w, three_w)
    print(f"max relative weight difference to the uninterrupted run: 2->1 {_max_rel(one_w, straight_w):.2e}, "
          f"2->3 {_max_rel(three_w, straight_w):.2e}")
    # The continued losses (steps 3-4) are those of the uninterrupted run.
    straight_losses = [h["ntp/loss"] for h in straight.history if "ntp/loss" in h]
    assert [h["ntp/loss"] for h in one.history if "ntp/loss" in h] == pytest.approx(straight_losses[2:], rel=1e-6)
    assert _losses(three.stdout) == pytest.approx(straight_losses[2:], abs=1e-4)

    # The resharding is exact: resumed in one process and saved again at once (no further step), the 2-rank FSDP
    # checkpoint's tensors come back bitwise, now in one file.
    again = train_ntp(load_config(None, [f"output_dir={tmp_path / 'fsdp2-copy'}", *common, "ntp.resume=true",
                                         "ntp.stop_after=0"]))
    assert again.steps == 2
    original = _dcp_tensors(tmp_path / "fsdp2" / "train-ntp" / "checkpoints" / "step_00000002")
    resaved = _dcp_tensors(tmp_path / "fsdp2-copy" / "train-ntp" / "checkpoints" / "step_00000002")
    assert sorted(p.name for p in (tmp_path / "fsdp2-copy" / "train-ntp" / "checkpoints" / "step_00000002" / "state")
                  .iterdir()) == [".metadata", "__0_0.distcp"]
    assert original.keys() == resaved.keys() and any(k.startswith("optim.") for k in original)
    for key in original:
        assert torch.equal(original[key], resaved[key]), key


def _dcp_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DCP state, whole, by flattened key (``model.lm_head.weight``, ``optim...``)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from refine_core.training.sharded_state import SafeFileSystemReader

    loaded = _load_state_dict_from_keys(storage_reader=SafeFileSystemReader(checkpoint / "state"))
    flat: dict[str, torch.Tensor] = {}

    def walk(tree: object, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = tree

    walk(loaded, "")
    return flat
