"""The tables of issue 17's reproduction, from the results ``bench/repro.py run`` wrote, into EXPERIMENTS.md and MLflow.

Scores are ×100 (as the paper's tables). A multi-seed arm shows ``mean ± std`` over its seeds (sample std, n - 1);
each seed's score is the mean over the examples of the cell. NIAH cells pool the examples of a group's tasks at one
length (S = single_1..3, MK = multikey_1..3, MQ, MV; spec §5.2); every task has the same number of examples per
length, so this equals the mean of the tasks' means. Comparisons (:func:`refine_core.evaluation.significance.
compare_arms`) pair seed ``s`` of one arm with seed ``s`` of the other and every example with itself, and report the
difference of the seed means, whether it exceeds the larger seed spread, and the two-sided paired permutation test
over the (seed, example) pairs.

MLflow: one experiment (``tracking.experiment`` of configs/repro/eval.yaml), one run per arm and seed, named
``repro-<arm>-s<seed>`` and tagged ``repro.run = <arm>/s<seed>`` (a new report replaces the run of an earlier one),
holding the training history as metric curves, the final scores, the config and overrides as params, and the
result, the scores, the summary, the NIAH heatmap and the study's tables as artifacts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.repro_arms import CONFIGS
from refine_core.evaluation.niah import niah_groups
from refine_core.evaluation.significance import ArmComparison, compare_arms, mean_std

logger = logging.getLogger("repro")

BEGIN = "<!-- repro-results:begin (written by `python bench/repro.py report`; edit outside the markers) -->"
END = "<!-- repro-results:end -->"
QA_TASK = "ruler_squadqa"
_GROUP_OF = {task: group for group, tasks in niah_groups().items() for task in tasks}


@dataclass
class Run:
    """The recorded result of one arm and seed."""

    arm: str
    seed: int
    record: dict[str, Any]
    scores: dict[str, dict[str, float]]  # task -> example id -> score
    folder: Path

    @property
    def summary(self) -> dict[str, Any]:
        return (self.record.get("eval") or self.record.get("ttt") or {}).get("summary", {})

    def final(self, key: str) -> float | None:
        """The last value of ``key`` in the training history (e.g. ``eval/loss``)."""
        values = [h[key] for h in self.record.get("train", {}).get("history", []) if key in h]
        return float(values[-1]) if values else None


def load_runs(results: Path) -> dict[tuple[str, int], Run]:
    """Every ``<arm>/s<seed>/result.json`` under ``results`` whose evaluation is complete."""
    runs = {}
    for path in sorted(results.glob("*/s*/result.json")):
        record = json.loads(path.read_text())
        if not (record.get("eval") or record.get("ttt") or {}).get("complete"):
            continue
        scores: dict[str, dict[str, float]] = {}
        score_file = path.parent / "scores.jsonl"
        for line in score_file.read_text().splitlines() if score_file.is_file() else []:
            row = json.loads(line)
            scores.setdefault(row["task"], {})[row["id"]] = float(row["score"])
        arm, seed = record["arm"], int(record["seed"])
        runs[(arm, seed)] = Run(arm, seed, record, scores, path.parent)
    return runs


# ------------------------------------------------------------------------------------------------------ metrics

Selector = Callable[[Run], dict[str, float]]


def niah_selector(group: str | None, length: int | None) -> Selector:
    """Per-example scores of the NIAH tasks of ``group`` (all groups: None) at ``length`` (all lengths: None)."""

    def select(run: Run) -> dict[str, float]:
        out = {}
        for task, scores in run.scores.items():
            if task not in _GROUP_OF or (group is not None and _GROUP_OF[task] != group):
                continue
            out.update({i: s for i, s in scores.items() if length is None or int(i.split(":")[1]) == length})
        return out

    return select


def qa_selector(run: Run) -> dict[str, float]:
    return dict(run.scores.get(QA_TASK, {}))


def niah_lengths(runs: dict[tuple[str, int], Run]) -> list[int]:
    return sorted({int(i.split(":")[1]) for run in runs.values() for task, scores in run.scores.items()
                   if task in _GROUP_OF for i in scores})


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cell(runs: list[Run], select: Selector) -> str:
    values = [100.0 * math.fsum(s.values()) / len(s) for s in (select(r) for r in runs) if s]
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _plain_cell(values: list[float | None], digits: int = 3) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "–"
    mean, std = mean_std(kept)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(kept) > 1 else f"{mean:.{digits}f}"


def _by_arm(runs: dict[tuple[str, int], Run], arm: str) -> dict[int, Run]:
    return {seed: run for (name, seed), run in sorted(runs.items()) if name == arm}


def compare(runs: dict[tuple[str, int], Run], metric: str, select: Selector, a: str, b: str) -> ArmComparison | None:
    """Arm ``b`` against arm ``a`` on one metric, paired by seed and example (None when they share no seed)."""
    per_a = {seed: select(run) for seed, run in _by_arm(runs, a).items()}
    per_b = {seed: select(run) for seed, run in _by_arm(runs, b).items()}
    per_a = {s: v for s, v in per_a.items() if v}
    per_b = {s: v for s, v in per_b.items() if v}
    if not set(per_a) & set(per_b):
        return None
    return compare_arms(metric, per_a, per_b)


def _comparison_row(label: str, c: ArmComparison) -> str:
    spread = {True: "yes", False: "no", None: "– (1 seed)"}[c.exceeds_spread]
    t = c.test
    return (f"| {label} | {c.mean_a:.1f} ± {c.std_a:.1f} | {c.mean_b:.1f} ± {c.std_b:.1f} | {c.diff:+.1f} | {spread} | "
            f"{t.p_value:.3g} | {t.n_pairs} ({t.n_nonzero} differ, {t.method}) |")


def verdict(label: str, a: str, b: str, c: ArmComparison) -> str:
    """One plain sentence for a comparison."""
    spread = ("beyond the seed spread" if c.exceeds_spread else
              "within the seed spread" if c.exceeds_spread is False else "one seed, so no spread to compare with")
    significant = "significant" if c.test.p_value < 0.05 else "not significant"
    return (f"{b} − {a} on {label}: {c.diff:+.1f} points ({c.mean_b:.1f} vs {c.mean_a:.1f}), {spread}; paired "
            f"permutation test p = {c.test.p_value:.3g} over {c.test.n_pairs} (seed, example) pairs ({significant} "
            "at 0.05).")


# ------------------------------------------------------------------------------------------------------- tables

_COMPARE_HEADER = ("| metric | {a} | {b} | Δ ({b} − {a}) | Δ beyond the seed spread? | p (paired permutation) | "
                   "pairs |\n|---|---|---|---|---|---|---|")


def midtraining_tables(runs: dict[tuple[str, int], Run]) -> tuple[str, list[str]]:
    """Table A layout (NIAH by group and length) with RULER-QA and the held-out loss; REFINE against NTP."""
    lengths = niah_lengths(runs)
    groups = list(niah_groups())
    arms = [("base", "base (pre-trained)"), ("mid-ntp", "+ NTP mid-training"), ("mid-refine", "+ REFINE mid-training")]
    columns: list[tuple[str, Selector]] = []
    for group in groups:
        columns += [(f"{group} {_length(n)}", niah_selector(group, n)) for n in lengths]
        columns.append((f"{group} avg", niah_selector(group, None)))
    columns += [("NIAH avg", niah_selector(None, None)), ("SQuAD-QA", qa_selector)]
    header = ["model", "seeds", *(name for name, _ in columns), "held-out loss", "recall acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, label in arms:
        members = list(_by_arm(runs, arm).values())
        if not members:
            continue
        cells = [_cell(members, select) for _, select in columns]
        cells += [_plain_cell([r.final("eval/loss") for r in members]),
                  _plain_cell([None if r.final("eval/recall_acc") is None else 100 * r.final("eval/recall_acc")
                               for r in members], 1)]
        lines.append("| " + " | ".join([label, ",".join(str(r.seed) for r in members), *cells]) + " |")
    table = "\n".join(lines)

    rows, verdicts = [], []
    metrics: list[tuple[str, Selector]] = [(g, niah_selector(g, None)) for g in groups]
    metrics += [(f"NIAH {_length(n)}", niah_selector(None, n)) for n in lengths]
    metrics += [("NIAH all", niah_selector(None, None)), ("SQuAD-QA", qa_selector)]
    for label, select in metrics:
        c = compare(runs, label, select, "mid-ntp", "mid-refine")
        if c is not None:
            rows.append(_comparison_row(label, c))
            if label in ("NIAH all", "SQuAD-QA"):
                verdicts.append(verdict(label, "NTP", "REFINE", c))
    if rows:
        table += "\n\nREFINE against NTP mid-training:\n\n" + _COMPARE_HEADER.format(a="NTP", b="REFINE") + "\n"
        table += "\n".join(rows)
    return table, verdicts


POST_ROWS = (
    ("mid-refine", "REFINE MidTr, no PostTr"),
    ("post-sft", "+ SFT"),
    ("post-nested_sft", "+ Nested SFT"),
    ("post-nested_refine", "+ Nested REFINE"),
    ("ttt-ntp-reset", "+ Nested REFINE + TTT NTP (reset)"),
    ("ttt-ntp-cumulative", "+ Nested REFINE + TTT NTP (cumulative)"),
    ("ttt-refine-reset", "+ Nested REFINE + TTT REFINE (reset)"),
    ("ttt-refine-cumulative", "+ Nested REFINE + TTT REFINE (cumulative)"),
)
POST_COMPARISONS = (
    ("post-sft", "post-nested_refine"), ("post-nested_sft", "post-nested_refine"), ("post-sft", "post-nested_sft"),
    ("ttt-ntp-reset", "ttt-refine-reset"), ("ttt-ntp-cumulative", "ttt-refine-cumulative"),
    ("post-nested_refine", "ttt-refine-cumulative"),
)


def post_tables(runs: dict[tuple[str, int], Run]) -> tuple[str, list[str]]:
    """Table B layout on the held-out SQuAD-QA set: post-training and TTT rows, and their paired comparisons."""
    lines = ["| row | seeds | SQuAD-QA | examples |", "|---|---|---|---|"]
    for arm, label in POST_ROWS:
        members = list(_by_arm(runs, arm).values())
        if arm == "mid-refine":
            members = members[:1]  # post-training starts from seed 0
        if members:
            seeds = ",".join(str(r.seed) for r in members)
            lines.append(f"| {label} | {seeds} | {_cell(members, qa_selector)} | {len(qa_selector(members[0]))} |")
    if len(lines) == 2:
        return "", []
    rows, verdicts = [], []
    names = dict(POST_ROWS)
    for a, b in POST_COMPARISONS:
        c = compare(runs, "SQuAD-QA", qa_selector, a, b)
        if c is not None:
            rows.append(_comparison_row(f"{names[b]} vs {names[a]}", c).replace(
                f"| {names[b]} vs {names[a]} |", f"| {names[b].lstrip('+ ')} vs {names[a].lstrip('+ ')} |"))
            verdicts.append(verdict("SQuAD-QA", names[a].lstrip("+ "), names[b].lstrip("+ "), c))
    table = "\n".join(lines)
    if rows:
        table += "\n\nPaired comparisons on SQuAD-QA:\n\n" + _COMPARE_HEADER.format(a="first", b="second") + "\n"
        table += "\n".join(rows)
    return table, verdicts


def provenance_table(runs: dict[tuple[str, int], Run]) -> str:
    """Where each number comes from: card, commit, commands, steps, seconds, config and overrides."""
    lines = ["| arm | seed | card | commit | last run | phases run | steps | train s | eval s | config + overrides |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, seed), run in sorted(runs.items()):
        rec = run.record
        last = rec["runs"][-1] if rec.get("runs") else {}
        train = rec.get("train", {})
        phase = rec.get("eval") or rec.get("ttt") or {}
        source = train if train else phase
        overrides = " ".join(o for o in source.get("overrides", []) if not o.startswith(("output_dir=", "tracking.")))
        steps = f"{train['steps']}/{train['target_steps']}" if train else "–"
        lines.append(f"| {arm} | {seed} | {last.get('card', '?')} | {last.get('commit', '?')[:9]} | "
                     f"{last.get('date', '?')} | {len(rec.get('runs', []))} | {steps} | "
                     f"{train.get('seconds', 0):.0f} | {phase.get('seconds', 0):.0f} | "
                     f"`{source.get('config', '?')}` {overrides} |")
    return "\n".join(lines)


def calibration_table(calibration: dict[str, Any]) -> str:
    """``bench/repro.py calibrate``'s measured step times and the projected time of each arm."""
    rows = [("NTP step (32 × 4,096 tokens)", f"{calibration['ntp_step_s']:.3f} s"),
            ("NTP tokens/s", f"{calibration['ntp_tokens_per_s']:,.0f}"),
            ("REFINE mid-training step (32 documents, 4 optimizer steps)", f"{calibration['refine_step_s']:.3f} s"),
            ("base pre-training, projected", f"{calibration['base_projected_s'] / 60:.1f} min"),
            ("mid-ntp, projected", f"{calibration['mid_ntp_projected_s'] / 60:.1f} min"),
            ("mid-refine, projected", f"{calibration['mid_refine_projected_s'] / 60:.1f} min")]
    head = f"Measured on {calibration.get('card', '?')} ({calibration.get('date', '?')}, commit " \
           f"{str(calibration.get('commit', '?'))[:9]}), steps after the first (which compile):"
    return head + "\n\n| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def render(runs: dict[tuple[str, int], Run], calibration: dict[str, Any] | None = None) -> str:
    """The whole results section (Markdown)."""
    parts = ["### Step times (`bench/repro.py calibrate`)", calibration_table(calibration)] if calibration else []
    if not runs:
        return "\n\n".join([*parts, "No device run of the study has happened yet: there are no results. "
                              "EXPERIMENTS.md says how to produce them."]) + "\n"
    mid, mid_verdicts = midtraining_tables(runs)
    post, post_verdicts = post_tables(runs)
    parts += ["### Mid-training (RULER NIAH by group and length, held-out RULER-QA; ×100)", mid]
    if post:
        parts += ["### Post-training and test-time training (held-out SQuAD-QA at 2K; ×100)", post]
    verdicts = mid_verdicts + post_verdicts
    if verdicts:
        parts += ["### What the numbers say (generated)", "\n".join(f"- {v}" for v in verdicts)]
    parts += ["### Provenance (every finished number: command count, card, commit, config, seed)",
              provenance_table(runs)]
    return "\n\n".join(parts) + "\n"


def write_experiments(path: Path, section: str) -> None:
    """Replace the text between :data:`BEGIN` and :data:`END` in ``path`` with ``section``."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no results markers; add the lines\n{BEGIN}\n{END}\nwhere the tables go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


# ------------------------------------------------------------------------------------------------------ mlflow


def log_mlflow(runs: dict[tuple[str, int], Run], tables: str, experiment: str, tracking_uri: str | None) -> list[str]:
    """One MLflow run per arm and seed (see the module docstring); returns their ids."""
    from mlflow.entities import Metric

    from refine_core.tracking import MlflowTracker

    ids = []
    for (arm, seed), run in sorted(runs.items()):
        key = f"{arm}/s{seed}"
        last = run.record["runs"][-1] if run.record.get("runs") else {}
        tags = {"repro.run": key, "repro.arm": arm, "repro.seed": seed, "repro.card": last.get("card"),
                "repro.commit": last.get("commit")}
        tracker = MlflowTracker(experiment=experiment, tracking_uri=tracking_uri, run_name=f"repro-{arm}-s{seed}",
                                tags=tags)
        client = tracker.client
        for old in client.search_runs([tracker.experiment_id], filter_string=f"tags.`repro.run` = '{key}'"):
            if old.info.run_id != tracker.run_id:
                client.delete_run(old.info.run_id)
        source = run.record.get("train") or run.record.get("eval") or run.record.get("ttt") or {}
        tracker.log_params({"arm": arm, "seed": seed, "config": source.get("config"),
                            "overrides": " ".join(source.get("overrides", [])), "card": last.get("card"),
                            "commit": last.get("commit"), "steps": run.record.get("train", {}).get("steps")})
        points = [Metric(k, float(v), 0, int(h["step"])) for h in run.record.get("train", {}).get("history", [])
                  for k, v in h.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)]
        for start in range(0, len(points), 1000):
            client.log_batch(tracker.run_id, metrics=points[start : start + 1000])
        final = {f"score/{name}": float(v) for name, v in run.summary.get("scores", {}).items()}
        for group, row in run.summary.get("niah_table", {}).items():
            final.update({f"niah/{group}/{length}": float(v) for length, v in row.items()})
        tracker.log_metrics(final, step=int(run.record.get("train", {}).get("steps", 0) or 0))
        for name in ("result.json", "scores.jsonl", "summary.md", "niah_heatmap.png"):
            if (run.folder / name).is_file():
                tracker.log_artifact(run.folder / name)
        client.log_text(tracker.run_id, tables, "tables.md")
        tracker.close()
        ids.append(tracker.run_id)
    return ids


def report(study: Any, experiments: Path | None, tracking_uri: str | None) -> str:
    """Tables from ``study.results`` into ``<results>/tables.md``, ``experiments`` and MLflow; returns the tables."""
    import yaml

    runs = load_runs(study.results)
    calibration_file = study.results / "calibration.json"
    tables = render(runs, json.loads(calibration_file.read_text()) if calibration_file.is_file() else None)
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "tables.md").write_text(tables)
    if experiments is not None:
        write_experiments(experiments, tables)
    if runs:
        experiment = yaml.safe_load((CONFIGS / "eval.yaml").read_text())["tracking"]["experiment"]
        ids = log_mlflow(runs, tables, experiment, tracking_uri)
        logger.info("MLflow: %d runs in experiment %s", len(ids), experiment)
    logger.info("tables:\n%s", tables)
    return tables
