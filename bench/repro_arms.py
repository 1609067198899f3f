"""The arms of issue 17's study (EXPERIMENTS.md): which stage runs on which config of configs/repro/, from which
arm's model, with how many seeds. Read by the driver (bench/repro.py), the report and the model transport."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "repro"
WORK_PREFIX = "runs/repro"  # how the configs name the work directory (replaced by --work)
SHARED_PREFIX = "../shared/data"  # how the configs name the shared data (replaced by --shared)


@dataclass(frozen=True)
class Arm:
    """One arm of the study: a stage on a config, maybe starting from another arm's seed-0 model."""

    name: str
    config: str
    stage: str  # train-ntp | train-refine | post-train | ttt
    start: str | None = None
    overrides: tuple[str, ...] = ()
    evaluate: bool = True  # evaluate the trained model with eval.yaml (ttt answers as it adapts)
    eval_overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)


_QA_ONLY = ("eval.niah_tasks=[]",)
ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("base", "pretrain.yaml", "train-ntp"),
    Arm("mid-ntp", "midtrain-ntp.yaml", "train-refine", "base", seeds=(0, 1, 2)),
    Arm("mid-refine", "midtrain-refine.yaml", "train-refine", "base", seeds=(0, 1, 2)),
    Arm("post-sft", "posttrain.yaml", "post-train", "mid-refine", ("post.mode=sft",), eval_overrides=_QA_ONLY),
    Arm("post-nested_sft", "posttrain.yaml", "post-train", "mid-refine", ("post.mode=nested_sft",),
        eval_overrides=_QA_ONLY),
    Arm("post-nested_refine", "posttrain.yaml", "post-train", "mid-refine", ("post.mode=nested_refine",),
        eval_overrides=_QA_ONLY),
    *(Arm(f"ttt-{method}-{mode}", "ttt.yaml", "ttt", "post-nested_refine",
          (f"ttt.method={method}", f"ttt.mode={mode}"), evaluate=False)
      for method in ("ntp", "refine") for mode in ("reset", "cumulative")),
)}
# Arms whose seed-0 model another arm starts from: packed for the next slot when they finish.
STARTS = sorted({arm.start for arm in ARMS.values() if arm.start})
# Seconds a step is assumed to need before its first measurement (the budget check), on a GPU.
