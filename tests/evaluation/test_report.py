"""Reports: the Markdown results table, the NIAH heatmap PNG and the predictions JSONL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from refine_core.evaluation.report import niah_heatmap, results_table, write_predictions_jsonl
from refine_core.evaluation.tasks import PAPER_LONGBENCH_TASKS, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_results_table_partial() -> None:
    # NQ: (0.5 + 0.25) / 2 = 0.375 -> 37.5; TC: 1.0 -> 100.0; not all 12 tasks -> Avg "–"
    summary = summarize({"trec": [1.0], "narrativeqa": [0.5, 0.25]})
    assert results_table(summary) == (
        "| model | NQ | TC | Avg |\n"
        "|---|---|---|---|\n"
        "| model | 37.5 | 100.0 | – |"
    )


def test_results_table_full_rows_and_labels() -> None:
    base = summarize({name: [0.125] for name in PAPER_LONGBENCH_TASKS})  # 12.5 everywhere, Avg 12.5
    better = summarize({**{name: [0.25] for name in PAPER_LONGBENCH_TASKS}, "musique": [0.5]})
    table = results_table(base, better, labels=["LaCT-760M", "+ REFINE"])
    lines = table.split("\n")
    assert lines[0] == "| model | NQ | QR | MF | HP | 2W | QM | MN | SS | TC | TQ | LC | RP | MU | Avg |"
    assert lines[2] == "| LaCT-760M |" + " 12.5 |" * 12 + " – | 12.5 |"  # no musique score in this row
    assert lines[3] == "| + REFINE |" + " 25.0 |" * 12 + " 50.0 | 25.0 |"
    assert results_table(better, tasks=["trec"]).split("\n")[2] == "| model | 25.0 | 25.0 |"
    with pytest.raises(ValueError, match="one label per summary"):
        results_table(base, better, labels=["only one"])
    with pytest.raises(ValueError, match="at least one summary"):
        results_table()


def test_niah_heatmap_writes_a_png(tmp_path: Path) -> None:
    records = [
        {"task": "niah_single_1", "length": length, "depth": depth, "score": score}
        for length in (4096, 8192)
        for depth, score in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0))
    ]
    out = niah_heatmap(records, tmp_path / "plots" / "niah.png")
    assert out == tmp_path / "plots" / "niah.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no records"):
        niah_heatmap([], tmp_path / "empty.png")


def test_predictions_jsonl_hashes_prompts(tmp_path: Path) -> None:
    prompt = "A long prompt. " * 100
    rows = [
        {"id": "hotpotqa:1", "task": "hotpotqa", "prompt": prompt, "prediction": "Paris", "answers": ["Paris"],
         "score": 1.0, "depth": 0.5},
        {"id": "hotpotqa:2", "task": "hotpotqa", "prompt_sha256": "ab" * 32, "prediction": "", "answers": ("x",),
         "score": 0},
    ]
    path = write_predictions_jsonl(tmp_path / "pred" / "hotpotqa.jsonl", rows)
    text = path.read_text(encoding="utf-8")
    assert "A long prompt" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert list(records[0]) == ["id", "task", "prompt_sha256", "prediction", "answers", "score", "depth"]
    assert records[0]["prompt_sha256"] == hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    assert records[1] == {"id": "hotpotqa:2", "task": "hotpotqa", "prompt_sha256": "ab" * 32, "prediction": "",
                          "answers": ["x"], "score": 0.0}
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(ValueError, match=r"lacks \['score', 'prompt_sha256 \(or prompt\)'\]"):
        write_predictions_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "task": "t", "prediction": "", "answers": []}])


def test_training_curves_and_inline_images_for_the_kfp_reports(tmp_path):
    from refine_core.evaluation.report import inline_png, training_curves

    history = [{"step": float(s), "refine/ntp_loss": 3.0 - 0.1 * s, "refine/reward_mean": 0.1 * s,
                "refine/clip_frac": 0.01} for s in range(1, 6)] + [{"step": 5.0, "eval/loss": 2.4}]
    png = training_curves(history, tmp_path / "curves.png", title="train-refine")
    assert png is not None and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert training_curves([{"step": 1.0, "other": 1.0}], tmp_path / "none.png") is None
    tag = inline_png(png, "curves")
    assert tag.startswith('<img alt="curves" src="data:image/png;base64,iVBORw0KGgo')
