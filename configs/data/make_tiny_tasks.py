"""Writes the two tiny RULER-QA-style task files that ``configs/tiny-cpu.yaml`` uses (a few KB each).

The real post-training and test files live in ``../shared/data``, which a clone elsewhere lacks; these stand-ins
have the RULER QA columns and template (spec §9.2, :mod:`refine_core.data.ruler_qa`) so that the post-training and
test-time-training stages run end to end anywhere. Each prompt hides one fact ("The secret city of item 7 is
Oslo.") in a few synthetic passages and asks for it. The scores mean nothing; the files only exercise the code.

Regenerate (deterministic, byte tokenizer lengths)::

    .venv/bin/python configs/data/make_tiny_tasks.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from refine_core.data.ruler_qa import RULER_QA_COLUMNS, RULER_QA_DOCUMENT, RULER_QA_TEMPLATE
from refine_core.data.sources import synthetic_documents

HERE = Path(__file__).resolve().parent
CITIES = ("Paris", "Oslo", "Lima", "Rome", "Kyoto", "Cairo")
MAX_SEQ_LENGTH = 1024


def _rows(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    filler = [doc.text[:80] for doc in synthetic_documents(24, 30, seed)]
    rows: dict[str, list] = {name: [] for name in RULER_QA_COLUMNS}
    for i in range(n):
        city = rng.choice(CITIES)
        docs = rng.sample(filler, 3)
        docs.insert(rng.randrange(4), f"The secret city of item {i} is {city}.")
        context = "\n\n".join(RULER_QA_DOCUMENT.format(i=j + 1, document=d) for j, d in enumerate(docs))
        prompt = RULER_QA_TEMPLATE.format(context=context, question=f"What is the secret city of item {i}?")
        answer = [city]
        prompt_length = len(prompt.encode())  # the byte tokenizer: one token per byte
        max_answer_length = max(len(a.encode()) for a in answer)
        values = (i, prompt, answer, prompt_length, max_answer_length, prompt_length + max_answer_length,
                  MAX_SEQ_LENGTH, "ruler_squadqa")
        for name, value in zip(RULER_QA_COLUMNS, values, strict=True):
            rows[name].append(value)
    return rows


def main() -> None:
    for split, n, seed in (("train", 8, 1), ("test", 8, 2)):
        path = HERE / f"ruler_squadqa_tiny_{MAX_SEQ_LENGTH}_{split}.parquet"
        pq.write_table(pa.table(_rows(n, seed)), path, compression="zstd")


if __name__ == "__main__":
    main()
