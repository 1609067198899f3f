"""Evaluation outputs: the Markdown results table, the NIAH depth × length heatmap, the predictions JSONL, and the
training curves of a training stage's history (for the reports the Kubeflow UI shows).

Scores are shown ×100 with one decimal, as in the paper's tables (spec §6); :func:`results_table` takes the
dicts of :func:`refine_core.evaluation.tasks.summarize`. The heatmap is drawn with matplotlib's Agg canvas
directly (no pyplot, no display, no global backend switch). Prediction files never contain prompts, only their
SHA-256, so that they stay small and can be shared.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from refine_core.evaluation.tasks import TASKS

_DASH = "–"  # en dash, as the paper's tables mark an empty cell


def _fmt(value: float | None) -> str:
    return _DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _ordered_tasks(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    present: list[str] = []
    for summary in summaries:
        present.extend(name for name in summary["scores"] if name not in present)
    registry_order = [name for name in TASKS if name in present]
    return registry_order + sorted(name for name in present if name not in TASKS)


def results_table(
    *summaries: Mapping[str, Any], labels: Sequence[str] | None = None, tasks: Sequence[str] | None = None
) -> str:
    """A Markdown table, one row per summary: task columns (abbreviations) ×100 with one decimal, then Avg.

    Args:
        summaries: dicts from :func:`~refine_core.evaluation.tasks.summarize`.
        labels: row labels (default ``model``, ``model 2``, ...).
        tasks: columns to show, in order (default: every scored task, LongBench in Table C order first).

    Returns:
        The table; Avg is the 12-task LongBench average (spec §5.3) and "–" unless all 12 were scored. Missing
        cells are "–".

    Raises:
        ValueError: no summary, or ``labels`` of the wrong length.
    """
    if not summaries:
        raise ValueError("results_table needs at least one summary from tasks.summarize().")
    if labels is None:
        labels = ["model"] + [f"model {i + 2}" for i in range(len(summaries) - 1)]
    if len(labels) != len(summaries):
        raise ValueError(f"{len(labels)} labels for {len(summaries)} summaries; pass one label per summary.")
    columns = list(tasks) if tasks is not None else _ordered_tasks(summaries)
    header = ["model", *(TASKS[n].abbreviation if n in TASKS else n for n in columns), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summary in zip(labels, summaries, strict=True):
        cells = [_fmt(summary["scores"].get(name)) for name in columns]
        avg = summary.get("averages", {}).get("longbench")
        lines.append("| " + " | ".join([label, *cells, _fmt(avg)]) + " |")
    return "\n".join(lines)


def niah_heatmap(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "RULER NIAH") -> Path:
    """Write a PNG heatmap of the mean score ×100 per (needle depth, length bucket).

    Args:
        records: mappings with ``depth`` (fraction), ``length`` (tokens) and ``score`` (in [0, 1]); any ``task``
            key is ignored (all tasks are pooled).
        path: the PNG to write (parent directories are created).
        title: the figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no records.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells: dict[tuple[float, int], list[float]] = {}
    for rec in records:
        cells.setdefault((float(rec["depth"]), int(rec["length"])), []).append(float(rec["score"]))
    if not cells:
        raise ValueError("niah_heatmap got no records; pass dicts with depth, length and score.")
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [[math.nan] * len(lengths) for _ in depths]
    for (depth, length), scores in cells.items():
        grid[depths.index(depth)][lengths.index(length)] = 100.0 * math.fsum(scores) / len(scores)

    fig = Figure(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.45 * len(depths)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="score ×100")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out


_ROW_KEYS = ("id", "task", "prediction", "answers", "score")


def prompt_sha256(prompt: str) -> str:
    """Hex SHA-256 of the UTF-8 prompt (what prediction files store instead of the prompt)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def write_predictions_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per prediction: id, task, prompt_sha256, prediction, answers, score (+ extra keys).

    Args:
        path: the ``.jsonl`` file (parent directories are created; written to a temporary file then renamed).
        rows: mappings with ``id``, ``task``, ``prediction``, ``answers``, ``score`` and either ``prompt_sha256``
            or ``prompt``; a ``prompt`` is hashed and **never written**. Other keys (``depth``, ``length``, ...)
            are kept after the standard ones.

    Returns:
        The written path.

    Raises:
        ValueError: a row lacks a required key.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for index, row in enumerate(rows):
            missing = [key for key in _ROW_KEYS if key not in row]
            if "prompt_sha256" not in row and "prompt" not in row:
                missing.append("prompt_sha256 (or prompt)")
            if missing:
                raise ValueError(f"prediction row {index} lacks {missing}; each row needs {list(_ROW_KEYS)} too.")
            digest = row["prompt_sha256"] if "prompt_sha256" in row else prompt_sha256(str(row["prompt"]))
            record = {
                "id": row["id"], "task": row["task"], "prompt_sha256": digest, "prediction": row["prediction"],
                "answers": list(row["answers"]), "score": float(row["score"]),
            }
            record.update({k: v for k, v in row.items() if k not in record and k != "prompt"})
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


# The curves a training report shows, in this order, when the history has them.
CURVES = (
    ("ntp/loss", "NTP loss"), ("refine/ntp_loss", "NTP loss"), ("eval/loss", "held-out loss"),
    ("refine/reward_mean", "reward"), ("refine/clip_frac", "clip fraction"), ("post/sft_loss", "SFT loss"),
)


def training_curves(
    history: Sequence[Mapping[str, float]], path: str | os.PathLike[str], title: str = ""
) -> Path | None:
    """Write a PNG with one panel per logged curve (loss, held-out loss, reward, clip fraction) against the step.

    Returns:
        The written path, or ``None`` when the history has none of :data:`CURVES`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for key, label in CURVES:
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h and math.isfinite(h[key])]
        if points and label not in {p[1] for p in panels}:
            panels.append((key, label, points))
    if not panels:
        return None
    figure = Figure(figsize=(3.2 * len(panels), 2.6), dpi=100)
    FigureCanvasAgg(figure)
    for i, (_, label, points) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), i + 1)
        axis.plot([x for x, _ in points], [y for _, y in points], marker="." if len(points) < 30 else None)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def inline_png(path: str | os.PathLike[str], alt: str) -> str:
    """An ``<img>`` with the PNG inlined as a data URI: the Kubeflow UI renders it inside a Markdown report."""
    import base64

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{alt}" src="data:image/png;base64,{data}"/>'
