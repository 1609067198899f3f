"""A run whose gradients stay non-finite fails, instead of finishing "successfully" with untrained weights.

A step whose gradient norm is not finite is skipped (its optimizer step is not taken: spec §2 step 6.4), which
rides out a rare bad batch. But a diverged run (say ``ntp.lr=1e6``) skips every step after the first, keeps its
loss at ln(vocab) and used to exit 0 with a model exported. :class:`DivergenceGuard` counts training steps in which
every optimizer step was skipped; after ``max_skipped_steps`` of them in a row it raises :class:`TrainingDiverged`,
which names the steps, the documents of the last one, the last good checkpoint and what to change. Nothing is
exported and no checkpoint is written at the failing step (a skipped step never changes the weights, so the newest
checkpoint holds the weights from before the non-finite steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from refine_core.errors import RunFailed


class TrainingDiverged(RunFailed):
    """The run failed: its gradients were not finite for too many steps in a row (exit status 1 in the CLI)."""


@dataclass
class DivergenceGuard:
    """Counts skipped optimizer steps and fails the run after ``limit`` fully skipped training steps in a row."""

    stage: str
    section: str  # the config section of the stage's settings, for the message
    limit: int  # 0 = never fail
    streak: int = 0
    skipped_total: int = 0

    def update(
        self, step: int, *, skipped: int, optimizer_steps: int, doc_ids: Sequence[int], last_good: Path | None,
        lr: tuple[str, float] | None = None,
    ) -> None:
        """Account for training step ``step``; raises :class:`TrainingDiverged` once the limit is reached."""
        self.skipped_total += skipped
        self.streak = self.streak + 1 if optimizer_steps and skipped >= optimizer_steps else 0
        if not self.limit or self.streak < self.limit:
            return
        docs = ", ".join(str(i) for i in list(doc_ids)[:8]) + (" ..." if len(doc_ids) > 8 else "")
        where = f"the newest checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        resume = f" (or resume from it with {self.section}.resume=true)" if last_good else ""
        lr_hint = f" ({lr[0]}={lr[1]:g})" if lr is not None else ""
        raise TrainingDiverged(
            f"{self.stage}: the gradient was not finite in {self.streak} steps in a row (steps "
            f"{step - self.streak + 1}-{step}; documents of the last: {docs}), so the run stops and exports nothing; "
            f"{where}. Lower the learning rate{lr_hint} or check those documents, then run again{resume}; "
            f"{self.section}.max_skipped_steps sets how many such steps are tolerated (0 = never stop)."
        )
