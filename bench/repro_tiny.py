"""The toy scale of ``bench/repro.py --tiny``: every config of configs/repro/ shrunk so that the whole study runs
through the same code in about a minute on two CPU cores (tests/test_repro.py). Each patch is deep-merged into its
config's YAML tree (a list of the same length merges element by element)."""

from __future__ import annotations

from typing import Any

_DATA: dict[str, Any] = {
    "sources": [{}, {"synthetic_docs": 24, "synthetic_words": 300}],
    "min_tokens": 64,
    "max_tokens": 256,
    "eval_docs": 4,
}
# REFINE's inner step on short documents: 4 positions, a margin that fits, 2 documents per optimizer step.
_INNER: dict[str, Any] = {"num_chunks": 4, "margin": 8, "mini_batch_size": 2, "micro_batch_size": 2}
_QA_TEST = ["runs/repro/inputs/ruler_qa/ruler_squadqa_repro_512_*_test.parquet"]
_QA_TRAIN = ["runs/repro/inputs/ruler_qa/ruler_squadqa_repro_512_*_train.parquet"]
_MID: dict[str, Any] = {
    "device": "cpu",
    "data": _DATA,
    "refine": {"steps": 2, "batch_size": 4, **_INNER, "eval_every": 1, "eval_max_docs": 4, "save_every": 1,
               "log_every": 1},
}

TINY: dict[str, dict[str, Any]] = {
    "corpus.yaml": {"data": {"sources": [{"passage_doc_chars": 900}], "min_tokens": 64, "max_tokens": 256}},
    "pretrain.yaml": {
        "device": "cpu",
        "model": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2}},
        "data": {**_DATA, "tokenizer_vocab_size": 600, "tokenizer_train_chars": 400_000},
        "ntp": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": 2,
                "eval_max_docs": 4, "save_every": 2, "log_every": 1},
    },
    "midtrain-ntp.yaml": _MID,
    "midtrain-refine.yaml": _MID,
    "eval.yaml": {
        "device": "cpu",
        "eval": {"task_files": _QA_TEST, "batch_size": 16, "max_seq_tokens": 768,
                 # one task of each group, two lengths, one depth: 8 NIAH prompts
                 "niah_tasks": ["niah_single_1", "niah_multikey_2", "niah_multiquery", "niah_multivalue"],
                 "niah_lengths": [640, 768], "niah_depths": [0.5], "niah_examples_per_cell": 1},
        "ruler_qa": {"max_seq_length": 512, "num_test": 4, "num_train": 4},
    },
    "posttrain.yaml": {
        "device": "cpu",
        "post": {"train_files": _QA_TRAIN, "steps": 2, "batch_size": 2, "micro_batch_size": 2, "max_prompt_tokens": 480,
                 "save_every": 1},
        "refine": _INNER,
    },
    "ttt.yaml": {
        "device": "cpu",
        "eval": {"task_files": _QA_TEST, "batch_size": 2, "max_seq_tokens": 512},
        "ttt": {"batch_size": 2},
        "refine": _INNER,
    },
}
# Two seeds are enough to exercise the spread and the paired test.
TINY_SEEDS: dict[str, tuple[int, ...]] = {"mid-ntp": (0, 1), "mid-refine": (0, 1)}
