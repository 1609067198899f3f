"""Evaluation and test-time training end to end with a tiny model: outputs, scores, modes, the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refine_core.config import load_config
from refine_core.models import DeltaNetConfig, build_model, save_pretrained
from refine_core.stages.evaluate import evaluate
from refine_core.stages.ttt import test_time_train as run_ttt
from refine_core.tokenizer import ByteTokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FILLER = "The lamp is on the table and the cat sleeps by the window while the rain falls outside. "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    config = DeltaNetConfig(
        hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    return save_pretrained(build_model(config), tmp_path_factory.mktemp("model") / "tiny", tokenizer=tok)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    prompts = [FILLER * 2 + f"Question: what is item {i}?\nAnswer:" for i in range(5)]
    table = pa.table({"index": list(range(5)), "prompt": prompts, "answer": [[f"item{i}"] for i in range(5)],
                      "task": ["ruler_squadqa"] * 5})
    path = tmp_path_factory.mktemp("tasks") / "ruler_squadqa_tiny_5_test.parquet"
    pq.write_table(table, path)
    return path


def cfg_for(tmp_path, model_dir, task_file, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", "device=cpu", f"model.source={model_dir}", "model.tokenizer=null",
        f"eval.task_files=[{task_file}]", "eval.batch_size=2", "eval.max_seq_tokens=1024",
        "refine.num_chunks=2", "refine.margin=8", "refine.rollout_tokens=3", "refine.mini_batch_size=2",
        "refine.micro_batch_size=1", "refine.lr=1e-2", "refine.reward=exact_match", "refine.nsp_loss_coef=0.4",
        "tracking.backend=none", *extra,
    ])


def test_evaluate_writes_predictions_summary_and_heatmap(tmp_path, model_dir, task_file):
    cfg = cfg_for(tmp_path, model_dir, task_file, "eval.niah_tasks=[niah_single_1]", "eval.niah_lengths=[700]",
                  "eval.niah_depths=[0.0, 1.0]")
    result = evaluate(cfg)
    out = tmp_path / "evaluate"
    assert result.output_dir == out
    rows = [json.loads(line) for line in (out / "predictions" / "ruler_squadqa.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"id", "prompt_sha256", "prediction", "answers", "score"} <= set(rows[0])
    assert "prompt" not in rows[0]
    assert set(result.summary["scores"]) == {"ruler_squadqa", "niah_single_1"}
    assert all(0.0 <= s <= 100.0 for s in result.summary["scores"].values())
    assert (out / "summary.md").read_text().strip() == result.table.strip()
    assert (out / "niah_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ttt_modes(tmp_path, model_dir, task_file):
    base = evaluate(cfg_for(tmp_path / "eval", model_dir, task_file))
    none = run_ttt(cfg_for(tmp_path / "none", model_dir, task_file, "ttt.method=none", "ttt.batch_size=2"))
    # Without adaptation, TTT answers exactly what evaluation answers.
    assert none.per_task == base.per_task
    for mode in ("cumulative", "reset"):
        result = run_ttt(cfg_for(tmp_path / mode, model_dir, task_file, f"ttt.mode={mode}", "ttt.batch_size=2"))
        assert len(result.per_task["ruler_squadqa"]) == 5
    dropped = run_ttt(cfg_for(tmp_path / "drop", model_dir, task_file, "ttt.batch_size=2", "ttt.drop_last=true"))
    assert len(dropped.per_task["ruler_squadqa"]) == 4  # spec §10.13: the incomplete last batch is dropped


def test_reset_mode_does_not_depend_on_the_file_order(tmp_path, model_dir, task_file):
    table = pq.read_table(task_file)
    reversed_file = tmp_path / "ruler_squadqa_reversed_5_test.parquet"
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), reversed_file)
    extra = ("ttt.mode=reset", "ttt.batch_size=1", "ttt.method=refine")
    a = run_ttt(cfg_for(tmp_path / "a", model_dir, task_file, *extra))
    b = run_ttt(cfg_for(tmp_path / "b", model_dir, reversed_file, *extra))

    def by_id(result):
        path = result.output_dir / "predictions" / "ruler_squadqa.jsonl"
        return {row["id"]: row["prediction"] for row in map(json.loads, path.read_text().splitlines())}

    assert by_id(a) == by_id(b)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (a clone elsewhere has none)")
def test_evaluate_reads_the_real_ruler_and_longbench_files(tmp_path, model_dir):
    cfg = load_config(None, [
        f"output_dir={tmp_path}", "device=cpu", f"model.source={model_dir}", "model.tokenizer=null",
        f"eval.task_files=[{SHARED}/ruler/ruler_squadqa_delta_net_4096_200_test.parquet, "
        f"{SHARED}/longbench/trec_16384.parquet, {SHARED}/longbench/lcc_16384.parquet]",
        "eval.max_examples=1", "eval.max_seq_tokens=2048", "tracking.backend=none",
    ])
    result = evaluate(cfg)
    assert set(result.summary["scores"]) == {"ruler_squadqa", "trec", "lcc"}
    assert result.summary["counts"] == {"ruler_squadqa": 1, "trec": 1, "lcc": 1}
