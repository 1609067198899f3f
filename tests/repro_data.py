"""A stand-in for ../shared/data with the file names configs/repro/ reads, small enough for the tiny study."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from refine_core.data.ruler_qa import format_ruler_qa_prompt
from refine_core.data.sources import synthetic_documents

LONGBENCH = ("2wikimqa", "gov_report", "hotpotqa", "lcc", "multi_news", "multifieldqa_en", "musique", "narrativeqa",
             "qasper", "qmsum", "repobench-p", "samsum", "triviaqa")
HEAD = "Answer the question based on the given passages. Only give me the answer and do not output any other words."


def _paragraphs(seed: int, count: int) -> list[str]:
    return [p for d in synthetic_documents(count, 60, seed) for p in d.text.split("\n\n")[1:] if p.strip()]


def fake_shared_data(root: Path, questions: int = 12) -> Path:
    """LongBench files of synthetic prose, RULER HotpotQA files of it, and RULER SQuAD files whose question ``i``
    is answered by its own paragraph ("... was named Keeper{i} ..."); returns ``root``."""
    for k, name in enumerate(LONGBENCH):
        texts = _paragraphs(100 + k, 6)
        prompts = []
        for j in range(3):
            body = "\n".join(f"Passage {i + 1}:\n{t}" for i, t in enumerate(texts[3 * j : 3 * j + 3]))
            prompts.append(f"{HEAD}\n\nThe following are given passages.\n{body}\n\n{HEAD}\n\nQuestion: Q{j}?\nAnswer:")
        _write(root / "longbench" / f"{name}_16384.parquet", {"prompt": prompts, "answers": [["a"]] * len(prompts)})
    filler = _paragraphs(7, 8)
    gold = [f"The lighthouse number {i} on the northern coast was kept for many years by a woman named Keeper{i}, "
            f"who wrote long letters about the storms of every winter she saw there." for i in range(questions)]
    for model, shift in (("delta_net", 1), ("lact", 2)):
        for task, answerable in (("squadqa", True), ("hotpotqa", False)):
            rows: dict[str, list] = {"index": [], "prompt": [], "answer": [], "task": []}
            for i in range(questions):
                docs = [filler[(i + shift) % len(filler)], filler[(3 * i + 2 * shift) % len(filler)]]
                docs.insert(i % 3, gold[i] if answerable else filler[(5 * i) % len(filler)])
                rows["index"].append(i)
                rows["prompt"].append(format_ruler_qa_prompt(docs, f"Who kept lighthouse number {i}?"))
                rows["answer"].append([f"Keeper{i}"])
                rows["task"].append(f"ruler_{task}")
            if task == "hotpotqa":  # distinct passages from the SQuAD ones: training text
                rows["prompt"] = [p.replace("lighthouse", "windmill") for p in rows["prompt"]]
            _write(root / "ruler" / f"ruler_{task}_{model}_4096_200_test.parquet", rows)
    return root


def _write(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
