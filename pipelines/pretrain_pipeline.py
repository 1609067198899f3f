"""Phase pipeline: next-token-prediction training from scratch (or continued from ``model.source``).

    start-run ─> prepare-data ─> train-ntp

The NTP model it produces can start a mid-training run (``model.source`` / the ``model`` artifact).

    python -m pipelines.pretrain_pipeline build/refine-pretrain.yaml
"""

import sys

from kfp import compiler, dsl

from components.prepare_data import prepare_data
from pipelines import _k8s
from pipelines._k8s import MIDTRAIN, SINGLE_GPU, TrainPlacement
from pipelines._tracking import tracked_run
from pipelines._training import training_task

NAME = "refine-pretrain"


def build(placement: TrainPlacement = SINGLE_GPU):
    """The pre-training pipeline with ``train-ntp`` placed by ``placement``."""

    @dsl.pipeline(name=NAME, description="Data prep, then next-token-prediction training.")
    def pretrain_pipeline(config_yaml: str):
        """Args:
            config_yaml: the experiment config (the text of a ``configs/*.yaml`` file; ``ntp`` section).
        """
        with tracked_run(config_yaml, NAME) as parent:
            data = _k8s.data_stage(prepare_data(config_yaml=config_yaml), _k8s.DATA, "prepare data")
            training_task("train-ntp", config_yaml=config_yaml, data=data.outputs["dataset"], parent_run_id=parent,
                          placement=placement, resources=MIDTRAIN, name="train NTP")

    return pretrain_pipeline


pretrain_pipeline = build()


if __name__ == "__main__":
    compiler.Compiler().compile(pretrain_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
