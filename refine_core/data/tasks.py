"""Readers for the evaluation and task files of spec §9 (RULER QA and LongBench parquet files).

Both formats become a list of :class:`TaskExample` in file order (file order matters: test-time training is
cumulative across batches, spec §10.1).

* RULER QA, ``ruler_{squadqa|hotpotqa}_{model}_{length}_{split}.parquet`` (spec §9.2): columns ``index``,
  ``prompt``, ``answer`` (list[str]), ``prompt_length``, ``max_answer_length``, ``total_length``,
  ``max_seq_length``, ``task``. The files carry no generation budget; spec §5.1 uses
  :data:`RULER_MAX_GEN_TOKENS` = 32, which the evaluator should apply when ``max_gen_tokens`` is ``None``.
* LongBench, ``{task}_16384.parquet`` (spec §9.1): columns ``prompt``, ``answers`` (list[str]),
  ``prompt_length``, ``max_answer_length``, ``total_length``, ``max_gen_tokens``, ``task`` and pandas'
  ``__index_level_0__`` (the row's index in the original LongBench file, used as the example id).

Gold answers (spec §10.15): a list column is kept as is, one answer per element; a string column is split on
``"|"``, which is how the official code stores them. The official code also joins list answers with ``"|"`` and
splits them back, so an answer that itself contains ``"|"`` (7 ``lcc`` answers, 1 ``multifieldqa_en`` answer in
the shipped files) becomes several; pass ``official_pipe_split=True`` to reproduce that.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Spec §5.1: greedy decoding of at most 32 new tokens for RULER QA.
RULER_MAX_GEN_TOKENS = 32
# Spec §5.3: per-task budgets, used only when a LongBench file lacks the ``max_gen_tokens`` column.
LONGBENCH_MAX_GEN_TOKENS = {
    "narrativeqa": 128,
    "qasper": 128,
    "samsum": 128,
    "multifieldqa_en": 64,
    "trec": 64,
    "lcc": 64,
    "repobench-p": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "triviaqa": 32,
    "musique": 32,
    "qmsum": 512,
    "multi_news": 512,
    "gov_report": 512,
}
# Columns that are not copied into ``TaskExample.extra`` (pandas' saved index is the id instead).
_PANDAS_INDEX = "__index_level_0__"


@dataclass
class TaskExample:
    """One prompt with its gold answers.

    Attributes:
        id: ``{task}:{index}``, stable across files of the same items (RULER's ``index``, LongBench's original row).
        task: the scorer key (``ruler_squadqa``, ``hotpotqa``, ``lcc``, ...).
        prompt: the raw prompt text (tokenize with no special tokens, spec §1).
        answers: the gold answers.
        max_gen_tokens: the generation budget from the file, or ``None`` when the file has none.
        extra: the remaining columns (``prompt_length``, ``total_length``, ...) and ``row``, the position in the file.
    """

    id: str
    task: str
    prompt: str
    answers: list[str]
    max_gen_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_answers(value: Any, official_pipe_split: bool = False) -> list[str]:
    """Gold answers from a list column or a ``"|"``-joined string (spec §10.15).

    Args:
        value: a list of strings (kept as is) or one string (split on ``"|"``).
        official_pipe_split: also split each list element on ``"|"``, as the official join-then-split does.

    Returns:
        The answers as a list of strings.
    """
    if isinstance(value, str):
        return value.split("|")
    if isinstance(value, (list, tuple)):
        answers = [str(a) for a in value]
        if official_pipe_split:
            return "|".join(answers).split("|")
        return answers
    if value is None:
        return []
    # numpy arrays (pandas) and other sequences
    return parse_answers(list(value), official_pipe_split)


def task_name_from_path(path: str | os.PathLike[str]) -> str:
    """The task a file holds, from its name: ``ruler_squadqa_lact_4096_200_test`` -> ``ruler_squadqa``,
    ``qasper_16384`` -> ``qasper``."""
    stem = Path(path).name.removesuffix(".parquet")
    ruler = re.match(r"^(ruler_[a-z0-9]+)_", stem)
    if ruler:
        return ruler.group(1)
    return re.sub(r"_\d+$", "", stem)


def _read_rows(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file {str(p)!r} does not exist; check the path (spec §9 lists the files).")
    table = pq.read_table(p)
    return table.column_names, table.to_pylist()


def _require(path: str | os.PathLike[str], columns: list[str], *options: str) -> str:
    for name in options:
        if name in columns:
            return name
    raise ValueError(
        f"{path} has none of the columns {list(options)}; its columns are {sorted(columns)}. "
        "Is it a RULER QA / LongBench file (spec §9)?"
    )


def _read(
    path: str | os.PathLike[str], id_column: str | None, answer_columns: tuple[str, ...], official_pipe_split: bool
) -> list[TaskExample]:
    columns, rows = _read_rows(path)
    prompt_col = _require(path, columns, "prompt")
    answer_col = _require(path, columns, *answer_columns)
    file_task = task_name_from_path(path)
    used = {prompt_col, answer_col, "task", "max_gen_tokens", _PANDAS_INDEX}
    examples = []
    for row, record in enumerate(rows):
        task = record.get("task") or file_task
        key = record.get(id_column) if id_column else None
        if key is None:
            key = record.get(_PANDAS_INDEX, row)
        gen = record.get("max_gen_tokens")
        if gen is None:
            gen = LONGBENCH_MAX_GEN_TOKENS.get(task)
        extra = {k: v for k, v in record.items() if k not in used}
        extra["row"] = row
        examples.append(
            TaskExample(
                id=f"{task}:{key}",
                task=str(task),
                prompt=record[prompt_col],
                answers=parse_answers(record[answer_col], official_pipe_split),
                max_gen_tokens=None if gen is None else int(gen),
                extra=extra,
            )
        )
    return examples


def read_ruler_qa(path: str | os.PathLike[str], official_pipe_split: bool = False) -> list[TaskExample]:
    """Read a RULER QA file (spec §9.2); ``max_gen_tokens`` is ``None`` (use :data:`RULER_MAX_GEN_TOKENS`).

    Args:
        path: the parquet file.
        official_pipe_split: see :func:`parse_answers`.

    Returns:
        The examples in file order, ids ``{task}:{index}``.
    """
    return _read(path, "index", ("answer", "answers"), official_pipe_split)


def read_longbench(path: str | os.PathLike[str], official_pipe_split: bool = False) -> list[TaskExample]:
    """Read a LongBench file (spec §9.1); ``max_gen_tokens`` from the file, else spec §5.3's per-task value.

    Args:
        path: the parquet file.
        official_pipe_split: see :func:`parse_answers`.

    Returns:
        The examples in file order, ids ``{task}:{original LongBench row}``.
    """
    return _read(path, None, ("answers", "answer"), official_pipe_split)


def read_task_file(path: str | os.PathLike[str], official_pipe_split: bool = False) -> list[TaskExample]:
    """Read either format, chosen from the file name (``ruler_*`` is RULER QA, anything else LongBench)."""
    if Path(path).name.startswith("ruler_"):
        return read_ruler_qa(path, official_pipe_split)
    return read_longbench(path, official_pipe_split)


def iter_task_files(directory: str | os.PathLike[str], pattern: str = "*.parquet") -> Iterator[Path]:
    """The task files in ``directory`` matching ``pattern``, in sorted order.

    Raises:
        FileNotFoundError: the directory does not exist.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"task directory {str(d)!r} does not exist; point it at e.g. ../shared/data/longbench.")
    yield from sorted(p for p in d.glob(pattern) if p.is_file())


def expand_task_files(patterns: Sequence[str]) -> list[Path]:
    """Parquet files named by paths, directories or globs, in a stable order; a pattern matching nothing fails."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            matched = sorted(Path(expanded).glob("*.parquet"))
        else:
            matched = sorted(Path(p) for p in glob.glob(expanded))
        if not matched:
            raise FileNotFoundError(f"task file pattern {pattern!r} matches no parquet file; check the path")
        files.extend(matched)
    return files
