"""Post-training end to end on a tiny model and a small RULER-QA-style file the test writes."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refine_core.config import load_config
from refine_core.stages.post_train import TaskSample, post_train, sft_batch
from refine_core.training.losses import IGNORE_INDEX

FILLER = "The river flows past the old mill and the baker sells bread every morning in the square. "


def write_task_file(path, n=12):
    prompts, answers = [], []
    for i in range(n):
        city = ["Paris", "Oslo", "Lima", "Rome"][i % 4]
        prompts.append(
            "Answer the question based on the given passages.\n\nDocument 1:\n"
            + FILLER * 3
            + f"The secret city of item {i} is {city}. "
            + FILLER * 2
            + f"\n\nQuestion: What is the secret city of item {i}?\nAnswer:"
        )
        answers.append([f" {city}"])
    table = pa.table(
        {
            "index": list(range(n)),
            "prompt": prompts,
            "answer": answers,
            "task": ["ruler_squadqa"] * n,
        }
    )
    pq.write_table(table, path)
    return path


def cfg_for(tmp_path, data, *extra):
    return load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "device=cpu",
            "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
            f"post.train_files=[{data}]",
            "post.steps=2",
            "post.batch_size=4",
            "post.micro_batch_size=2",
            "post.max_prompt_tokens=600",
            "post.max_answer_tokens=8",
            "refine.mini_batch_size=2",
            "refine.micro_batch_size=1",
            "refine.num_chunks=4",
            "refine.reward=hybrid",
            "refine.lr=1e-3",
            "tracking.backend=none",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_file(tmp_path_factory.mktemp("task") / "ruler_squadqa_tiny_train.parquet")


@pytest.mark.parametrize("mode", ["sft", "nested_sft", "nested_refine"])
def test_each_mode_runs_and_exports_a_model(tmp_path, data, mode):
    result = post_train(cfg_for(tmp_path, data, f"post.mode={mode}"))
    assert result.model_dir == tmp_path / f"post-train-{mode}" / "model"
    assert (result.model_dir / "model.safetensors").is_file()
    losses = [h["post/sft_loss"] for h in result.history]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    has_refine = all("refine/reward_mean" in h for h in result.history)
    assert has_refine == (mode == "nested_refine")
    if mode == "nested_sft":
        # spec §4: Nested SFT = one NTP optimizer step on the prompts per batch, then the SFT step.
        assert all(h["refine/optimizer_steps"] == 1 for h in result.history)
    if mode == "nested_refine":
        assert all(h["refine/optimizer_steps"] == 2 for h in result.history)


def test_sft_learns_the_answers(tmp_path, data):
    result = post_train(cfg_for(tmp_path, data, "post.mode=sft", "post.steps=15", "refine.lr=3e-3"))
    losses = [h["post/sft_loss"] for h in result.history]
    assert losses[-1] < 0.75 * losses[0]


def test_sft_labels_cover_only_the_answer_and_eos():
    samples = [
        TaskSample(prompt=torch.tensor([5, 6, 7]), answer=torch.tensor([8, 9, 2])),
        TaskSample(prompt=torch.tensor([5]), answer=torch.tensor([4, 2])),
    ]
    ids, mask, labels = sft_batch(samples, pad_id=0)
    # Row 1 is left-padded by 3: [0, 0, 0, 5, 4, 2]; targets are the tokens after each position.
    assert ids.tolist() == [[5, 6, 7, 8, 9, 2], [0, 0, 0, 5, 4, 2]]
    assert labels.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 2],
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 2],
    ]


def test_missing_train_files_say_what_to_set(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.backend=none"])
    with pytest.raises(ValueError, match="post.train_files"):
        post_train(cfg)
    cfg = load_config(None, [f"output_dir={tmp_path}", "post.train_files=[nowhere/*.parquet]"])
    with pytest.raises(FileNotFoundError, match="matches no parquet"):
        post_train(cfg)
