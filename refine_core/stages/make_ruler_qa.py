"""Stage: build RULER QA training and test files (the official repository no longer ships the training files).

Command line::

    refine make-ruler-qa --config configs/tiny-deltanet.yaml ruler_qa.source_path=dev-v2.0.json \
        ruler_qa.max_seq_length=4096 ruler_qa.name=delta_net model.tokenizer=fla-hub/delta_net-1.3B-100B

writes ``ruler_squadqa_delta_net_4096_1600_train.parquet`` and ``..._200_test.parquet`` under
``ruler_qa.out_dir`` with the model's tokenizer (the files are per tokenizer, spec §9.2). With
``ruler_qa.source_format=ruler`` the source is a set of RULER QA task files instead (their questions and passages,
:mod:`refine_core.data.ruler_qa_source`), e.g. the shipped 4K SQuAD test files rebuilt at another length.
"""

from __future__ import annotations

import logging
from pathlib import Path

from refine_core.config import ConfigError, RunConfig
from refine_core.data.ruler_qa import make_ruler_qa
from refine_core.stages.prepare_data import tokenizer_spec
from refine_core.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def make_ruler_qa_files(cfg: RunConfig) -> dict[str, Path]:
    """Write the train and test files described by ``cfg.ruler_qa`` with the model's tokenizer."""
    rq = cfg.ruler_qa
    if rq.source_path is None:
        raise ConfigError("ruler_qa.source_path is not set: point it at a SQuAD v2 or HotpotQA dev JSON file, or at "
                          "RULER QA task files with ruler_qa.source_format=ruler")
    tokenizer = load_tokenizer(tokenizer_spec(cfg.model), cfg.model.cache_dir)
    paths = make_ruler_qa(
        rq.source_path,
        rq.source_format,
        tokenizer,
        rq.max_seq_length,
        rq.num_train,
        rq.num_test,
        rq.out_dir,
        seed=rq.seed,
        name=rq.name,
        doc_order=rq.doc_order,
        disjoint_gold=rq.disjoint_gold,
    )
    for split, path in paths.items():
        logger.info("wrote the %s file %s", split, path)
    return paths
