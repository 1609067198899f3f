"""The comparison of training arms (REFINE against the NTP baseline, beside the model both started from): one table
of evaluation scores and held-out figures with each arm's difference to the baseline, as Markdown and HTML.

Kept apart from the KFP glue (``refine_core.kfp_support`` re-exports it for the ``compare-report`` component) so that
the report is a pure function of numbers, tested without KFP or MLflow.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.4g}"
    return "–" if value is None else str(value)


def flat_scores(summary: Mapping[str, Any]) -> dict[str, float]:
    """Task scores and averages (×100) of an evaluation summary as ``eval/<task>`` / ``eval/avg/<name>``."""
    out = {f"eval/{task}": float(v) for task, v in summary.get("scores", {}).items()}
    out.update({f"eval/avg/{name}": float(v) for name, v in summary.get("averages", {}).items()})
    return out


# What the report's less obvious rows mean, printed under the table when the row is there.
METRIC_GLOSSARY = {
    "midtrain/final_recall_acc": "top-1 accuracy (%) on held-out tokens that repeat a span seen earlier in the same "
    "document and in no other (names, places); it is in-context recall where it beats the next row",
    "midtrain/final_first_mention_acc": "the same spans at their first occurrence, where only the model's prior "
    "helps (refine_core/training/recall_probe.py)",
}


def midtrain_scores(metadata: Mapping[str, Any], when: str) -> dict[str, float]:
    """A mid-trained ``Model`` artifact's held-out figures for the comparison report, ``when`` = ``"initial"``
    (the start model) or ``"final"``: ``midtrain/final_eval_loss``, and the recall probe's
    ``midtrain/final_recall_acc`` and ``midtrain/final_first_mention_acc`` (×100, like the evaluation scores).
    Missing figures are left out."""
    scores = {}
    if metadata.get(f"{when}_eval_loss") is not None:
        scores["midtrain/final_eval_loss"] = float(metadata[f"{when}_eval_loss"])
    for key in ("recall_acc", "first_mention_acc"):
        if metadata.get(f"{when}_{key}") is not None:
            scores[f"midtrain/final_{key}"] = 100.0 * float(metadata[f"{when}_{key}"])
    return scores


def compare_report(arms: Mapping[str, Mapping[str, float | None]], baseline: str,
                   title: str = "REFINE vs the NTP baseline", caveat: str = "") -> tuple[str, str, dict[str, float]]:
    """The arms' numbers side by side, with each arm's difference to ``baseline``.

    Args:
        arms: label -> flat metrics (``eval/<task>`` scores ×100 from :func:`flat_scores`, held-out losses, ...),
            in column order.
        baseline: the label the differences are taken against.
        title: the report's heading.
        caveat: a sentence put first (e.g. that a tiny run is a smoke test, not the paper's result).

    Returns:
        ``(markdown, html, deltas)``; ``deltas`` maps ``compare/<arm>_minus_<baseline>/<metric>`` to a number.
    """
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {list(arms)}")
    labels = list(arms)
    others = [label for label in labels if label != baseline]
    header = ["metric", *labels, *(f"Δ {other}" for other in others)]
    rows: list[list[str]] = []
    deltas: dict[str, float] = {}
    for name in sorted({name for metrics in arms.values() for name in metrics}):
        values = [arms[label].get(name) for label in labels]
        base = arms[baseline].get(name)
        diffs = []
        for other in others:
            value = arms[other].get(name)
            diff = None if value is None or base is None else value - base
            if diff is not None:
                deltas[f"compare/{other}_minus_{baseline}/{name}"] = diff
            diffs.append(diff)
        rows.append([name, *(_fmt(v) for v in values), *(_fmt(d) for d in diffs)])
    note = f"Evaluation scores are ×100 (higher is better), losses lower is better; Δ = arm − {baseline}."
    note = f"{caveat} {note}" if caveat else note
    md = [f"# {title}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    glossary = [f"{name}: {text}" for name, text in METRIC_GLOSSARY.items() if any(row[0] == name for row in rows)]
    if glossary:
        md += ["", *(f"- {line}" for line in glossary)]
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(note)}</p><table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + f"</tr>{cells}</table>"
        + ("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in glossary) + "</ul>" if glossary else "")
        + "</body></html>\n"
    )
    return "\n".join(md) + "\n", page, deltas
