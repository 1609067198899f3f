"""Every stage with ``model.arch=lact`` on a tiny LaCT, end to end on CPU: NTP, REFINE mid-training with both
rollout engines (from the NTP model), post-training, evaluation and test-time training on the exported model."""

from __future__ import annotations

import json
import math

import pytest

from refine_core.config import load_config
from refine_core.models import load_model_dir
from refine_core.stages.evaluate import evaluate
from refine_core.stages.post_train import post_train
from refine_core.stages.prepare_data import prepare_data
from refine_core.stages.train_ntp import train_ntp
from refine_core.stages.train_refine import train_refine
from refine_core.stages.ttt import test_time_train as run_ttt
from tests.stages.test_evaluate_ttt import task_file  # noqa: F401  (a module fixture: a small RULER-style file)
from tests.stages.test_post_train import write_task_file

LACT = [
    "device=cpu",
    "model.arch=lact",
    # chunk 32 / window 16 on 128-token documents: several fast-weight updates per document
    "model.config={hidden_size: 32, num_hidden_layers: 1, num_attn_heads: 2, num_lact_heads: 2, "
    "lact_chunk_size: 32, window_size: 16, w0_w2_low_rank: 4}",
    "data.sources=[{path: synthetic, synthetic_docs: 40, synthetic_words: 60}]",
    "data.min_tokens=96",
    "data.max_tokens=128",
    "data.eval_docs=4",
    "ntp.steps=4",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=2",
    "ntp.lr=3e-3",
    "ntp.eval_every=2",
    "ntp.save_every=0",
    "refine.steps=2",
    "refine.batch_size=2",
    "refine.mini_batch_size=2",
    "refine.micro_batch_size=1",
    "refine.num_chunks=3",
    "refine.rollout_tokens=3",
    "refine.margin=8",
    "refine.lr=1e-3",
    "refine.eval_every=0",
    "refine.save_every=0",
    "tracking.backend=none",
]


def cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", *LACT, *extra])


@pytest.fixture(scope="module")
def ntp_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lact")
    prepare_data(cfg(root))
    result = train_ntp(cfg(root, f"data.prepared_dir={root / 'data'}"))
    evals = [h["eval/loss"] for h in result.history if "eval/loss" in h]
    assert len(evals) == 3 and all(math.isfinite(x) for x in evals)
    return root, result.model_dir


def test_ntp_exports_an_upstream_layout_lact(ntp_model):
    _, model_dir = ntp_model
    written = json.loads((model_dir / "config.json").read_text())
    assert written["model_type"] == "lact_swiglu" and written["lact_chunk_size"] == 32
    assert load_model_dir(model_dir).config.window_size == 16


@pytest.mark.parametrize("engine", ["branch", "faithful"])
def test_refine_mid_training_runs_with_both_engines(tmp_path, ntp_model, engine):
    root, model_dir = ntp_model
    result = train_refine(cfg(tmp_path, f"data.prepared_dir={root / 'data'}", f"model.source={model_dir}",
                              "model.tokenizer=null", f"refine.engine={engine}"))
    rewards = [h["refine/reward_mean"] for h in result.history if "refine/reward_mean" in h]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert (result.model_dir / "model.safetensors").is_file()


def test_post_training_evaluation_and_test_time_training(tmp_path, ntp_model, task_file):  # noqa: F811
    _, model_dir = ntp_model
    common = [f"model.source={model_dir}", "model.tokenizer=null", f"eval.task_files=[{task_file}]",
              "eval.batch_size=2", "eval.max_seq_tokens=1024"]
    data = write_task_file(tmp_path / "ruler_squadqa_tiny_train.parquet", n=4)
    post = post_train(cfg(tmp_path, *common, f"post.train_files=[{data}]", "post.mode=nested_refine", "post.steps=1",
                          "post.batch_size=2", "post.micro_batch_size=1", "post.max_prompt_tokens=600",
                          "post.max_answer_tokens=8"))
    assert all(math.isfinite(h["post/sft_loss"]) for h in post.history)
    scored = evaluate(cfg(tmp_path, *common))
    assert 0.0 <= scored.summary["scores"]["ruler_squadqa"] <= 100.0 and len(scored.per_task["ruler_squadqa"]) == 5
    adapted = run_ttt(cfg(tmp_path / "ttt", *common, "ttt.batch_size=2", "refine.reward=exact_match",
                          "refine.num_chunks=2", "refine.mini_batch_size=2", "refine.micro_batch_size=1"))
    assert 0.0 <= adapted.summary["scores"]["ruler_squadqa"] <= 100.0 and len(adapted.per_task["ruler_squadqa"]) == 5
