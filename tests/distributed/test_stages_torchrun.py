"""Post-training and test-time training under real ``torchrun`` (gloo, CPU) against one process.

Post-training: the same losses and weights on one, two and three ranks (three: uneven shares of 2 + 1 + 1 examples;
under FSDP a rank that never has an example), and checkpoints saved on two or three ranks resume in one process
and end where the uninterrupted run ends. TTT: ``reset`` mode shards the prompts over two and three ranks and writes
the very same predictions files as one process; ``cumulative`` mode runs on rank 0 alone and does too.

Tolerances: float32 on CPU. Different rank counts add the same per-example gradients in another order (per rank,
then across ranks; DDP also scales each rank's loss by ``W`` and averages, exact only for ``W`` a power of two; FSDP
sums the gradient norm per shard), so post-training agrees to float32 rounding, not bitwise: weights within
``assert_same_weights``' ``rtol=atol=1e-5`` (measured, the largest |diff| / (1e-5 + 1e-5 |w|) over all weights:
sft 3 ranks then resumed in one 0.25, sft FSDP 2 ranks 0.01, nested_refine 2 ranks then resumed 0.15, 3 ranks
0.27 — AdamW turns rounding-level differences of tiny gradients into ~1e-6 weight differences), the losses of
the in-process runs to ``rel=1e-6`` and the rank-0 log's four decimals to ``abs=1e-4``. TTT in ``reset`` mode is
exact: each batch runs the same arithmetic from the same weights whichever rank runs it, its sampling seeded by
(seed, batch index, prompt position) only (the one-process reference runs on one thread, as each torchrun rank does:
``OMP_NUM_THREADS=1``). The cosine reward makes the answers depend on those draws: a rank-dependent seed fails it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refine_core.config import load_config
from refine_core.models import DeltaNetConfig, build_model, save_pretrained
from refine_core.stages.post_train import post_train
from refine_core.stages.ttt import test_time_train as run_ttt
from refine_core.tokenizer import ByteTokenizer
from tests.distributed.test_torchrun import assert_same_weights, torchrun, weights

pytestmark = pytest.mark.slow

FILLER = "The river flows past the old mill and the baker sells bread. "
CITIES = ["Paris", "Oslo", "Lima", "Rome"]


def _write_tasks(path: Path, n: int, split: str) -> Path:
    prompts = [
        f"Document: {FILLER}The secret city of item {i} is {CITIES[i % 4]}. {FILLER}\n"
        f"Question: What is the secret city of item {i}?\nAnswer:"
        for i in range(n)
    ]
    table = pa.table({"index": list(range(n)), "prompt": prompts, "answer": [[f" {CITIES[i % 4]}"] for i in range(n)],
                      "task": ["ruler_squadqa"] * n})
    pq.write_table(table, path / f"ruler_squadqa_tiny_{split}.parquet")
    return path / f"ruler_squadqa_tiny_{split}.parquet"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return _write_tasks(root, 8, "train"), _write_tasks(root, 7, "test")


def _post(data: Path, mode: str, *extra: str) -> list[str]:
    return [
        "device=cpu",
        # Two blocks: under FSDP two units plus the root.
        "model.config={hidden_size: 32, num_hidden_layers: 2, num_heads: 2}",
        f"post.train_files=[{data}]",
        f"post.mode={mode}",
        "post.steps=4",
        "post.batch_size=4",
        "post.micro_batch_size=1",  # 3 ranks take 2 + 1 + 1 examples: ranks 1 and 2 add one stand-in pass
        "post.max_prompt_tokens=128",
        "post.max_answer_tokens=8",
        "post.save_every=2",
        "refine.num_chunks=2",
        "refine.margin=8",
        "refine.rollout_tokens=3",
        "refine.micro_batch_size=1",
        "refine.reward=hybrid",
        "refine.lr=1e-3",
        "tracking.backend=none",
        *extra,
    ]


def _sft_losses(stdout: str) -> list[float]:
    """The per-step SFT losses rank 0 logged (``... step 3/4 | sft 2.1234``, four decimals)."""
    return [float(line.split("| sft ")[1].split()[0]) for line in stdout.splitlines() if "| sft " in line]


def _history(result, key: str = "post/sft_loss") -> list[float]:
    return [h[key] for h in result.history if key in h]


def _fraction_of_tolerance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """How much of ``assert_same_weights``' tolerance the largest difference uses: max |a - b| / (1e-5 + 1e-5 |b|)."""
    return max(float(((a[k] - b[k]).abs() / (1e-5 + 1e-5 * b[k].abs())).max()) for k in a)


def _model(run: Path, mode: str) -> dict[str, torch.Tensor]:
    return weights(run / f"post-train-{mode}" / "model")


def test_post_train_sft_uneven_on_three_ranks_and_fsdp_with_an_idle_rank_equal_one_process(tmp_path, task_files):
    data = task_files[0]
    common = _post(data, "sft")
    single = post_train(load_config(None, [f"output_dir={tmp_path / 'single'}", *common]))
    single_losses = _history(single)

    # Three ranks (DDP) take the 4 examples of each batch as 2 + 1 + 1 and stop after step 2; the checkpoint
    # resumes in one process and ends as the uninterrupted run does.
    three = torchrun("post-train", [f"output_dir={tmp_path / 'three'}", *common, "post.stop_after=2"], nproc=3)
    assert _sft_losses(three.stdout) == pytest.approx(single_losses[:2], abs=1e-4)
    resumed = post_train(load_config(None, [f"output_dir={tmp_path / 'three'}", *common, "post.resume=true"]))
    assert _history(resumed) == pytest.approx(single_losses[2:], rel=1e-6)
    assert_same_weights(weights(single.model_dir), weights(resumed.model_dir))

    # FSDP on two ranks with one example per batch: rank 1 never has one and runs only stand-in passes.
    one_each = [*common, "post.batch_size=1"]
    single_one = post_train(load_config(None, [f"output_dir={tmp_path / 'single-one'}", *one_each]))
    fsdp = torchrun("post-train", [f"output_dir={tmp_path / 'fsdp'}", "parallel=fsdp", *one_each])
    assert "FSDP2: 2 blocks + root sharded over 2 ranks" in fsdp.stdout
    assert _sft_losses(fsdp.stdout) == pytest.approx(_history(single_one), abs=1e-4)
    assert_same_weights(weights(single_one.model_dir), _model(tmp_path / "fsdp", "sft"))
    for name, got, want in (("3 ranks + resumed", weights(resumed.model_dir), weights(single.model_dir)),
                            ("fsdp 2 ranks", _model(tmp_path / "fsdp", "sft"), weights(single_one.model_dir))):
        print(f"sft, {name}: {_fraction_of_tolerance(got, want):.3f} of the weight tolerance used")


@pytest.mark.parametrize("nproc", [2, 3])
def test_post_train_nested_refine_on_two_and_three_ranks_equals_one_process(tmp_path, task_files, nproc):
    # 2 ranks: 4 examples per batch in inner mini-batches of 2; 3 ranks: 6 in mini-batches of 3. Either way two
    # inner optimizer steps (one example per rank each), then the SFT step.
    size = 2 * nproc
    common = _post(task_files[0], "nested_refine", f"post.batch_size={size}", f"refine.batch_size={size}",
                   f"refine.mini_batch_size={nproc}", "post.steps=2", "post.save_every=1")
    single = post_train(load_config(None, [f"output_dir={tmp_path / 'single'}", *common]))
    assert all(h["refine/optimizer_steps"] == 2 for h in single.history)
    if nproc == 3:  # FSDP: uneven parameter shards, the inner step's replica and the SFT step's collectives
        run = torchrun("post-train", [f"output_dir={tmp_path / 'ddp'}", *common, "parallel=fsdp"], nproc=3)
        assert "root sharded over 3 ranks" in run.stdout
        assert _sft_losses(run.stdout) == pytest.approx(_history(single), abs=1e-4)
        assert "| reward " in run.stdout
        final = _model(tmp_path / "ddp", "nested_refine")
    else:
        # Two ranks stop after the first step; its checkpoint resumes in one process and ends as the uninterrupted
        # run does.
        run = torchrun("post-train", [f"output_dir={tmp_path / 'ddp'}", *common, "post.stop_after=1"])
        assert _sft_losses(run.stdout) == pytest.approx(_history(single)[:1], abs=1e-4)
        resumed = post_train(load_config(None, [f"output_dir={tmp_path / 'ddp'}", *common, "post.resume=true"]))
        for key in ("post/sft_loss", "refine/ntp_loss", "refine/reward_mean"):
            assert _history(resumed, key) == pytest.approx(_history(single, key)[1:], rel=1e-6), key
        final = weights(resumed.model_dir)
    assert_same_weights(weights(single.model_dir), final)
    print(f"nested_refine, {nproc} ranks: {_fraction_of_tolerance(final, weights(single.model_dir)):.3f} of the "
          "weight tolerance used")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    config = DeltaNetConfig(
        hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    return save_pretrained(build_model(config), tmp_path_factory.mktemp("model") / "tiny", tokenizer=tok)


def _ttt(model: Path, tasks: Path, *extra: str) -> list[str]:
    return [
        "device=cpu", f"model.source={model}", "model.tokenizer=null", f"eval.task_files=[{tasks}]",
        "eval.max_seq_tokens=512", "ttt.method=refine", "ttt.batch_size=2", "refine.num_chunks=2", "refine.margin=8",
        "refine.rollout_tokens=3", "refine.mini_batch_size=2", "refine.micro_batch_size=1", "refine.lr=1e-2",
        "refine.reward=cosine", "refine.nsp_loss_coef=1.0", "tracking.backend=none", *extra,
    ]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread, as every torchrun rank has: the same float summation order, hence the same greedy
    answers bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _outputs(stage_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in [*(stage_dir / "predictions").iterdir(), stage_dir / "summary.json"]}


def test_ttt_reset_shards_prompts_and_cumulative_runs_on_rank_zero(tmp_path, model_dir, task_files):
    tasks = task_files[1]  # 7 prompts in batches of 2: batches 0-3, the last one of a single prompt
    with _one_thread():
        plain = _outputs(run_ttt(load_config(None, [f"output_dir={tmp_path / 'plain'}",
                                                    *_ttt(model_dir, tasks, "ttt.method=none")])).output_dir)
    for mode in ("reset", "cumulative"):
        with _one_thread():
            single = run_ttt(load_config(None, [f"output_dir={tmp_path / f'single-{mode}'}",
                                                *_ttt(model_dir, tasks, f"ttt.mode={mode}")]))
        expected = _outputs(single.output_dir)
        assert len(single.per_task["ruler_squadqa"]) == 7
        # The adaptation changes the answers (so the sharded runs below adapt as one process does, not merely agree).
        assert expected["ruler_squadqa.jsonl"] != plain["ruler_squadqa.jsonl"]
        ranks = (2, 3) if mode == "reset" else (2,)
        for nproc in ranks:  # reset: 2 ranks take batches (0, 2) and (1, 3); 3 ranks (0, 3), (1,) and (2,)
            out = tmp_path / f"{mode}-{nproc}"
            run = torchrun("ttt", [f"output_dir={out}", *_ttt(model_dir, tasks, f"ttt.mode={mode}")], nproc=nproc)
            assert _outputs(out / "ttt") == expected, f"{mode} on {nproc} ranks"
            if mode == "reset":
                assert f"ruler_squadqa: 4 batches of prompts shared by {nproc} ranks" in run.stdout
            else:
                assert "rank 0 runs them all alone" in run.stdout and "[rank 1]" in run.stdout
