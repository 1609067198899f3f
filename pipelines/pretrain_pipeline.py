"""Phase pipeline: next-token-prediction training from scratch (or continued from ``model.source``).

    start-run ─> prepare-data ─> train-ntp

The NTP model it produces can start a mid-training run (``model.source`` / the ``model`` artifact).

    python -m pipelines.pretrain_pipeline build/refine-pretrain.yaml
"""

import sys

from kfp import compiler, dsl

from components.prepare_data import prepare_data
from components.train_ntp import train_ntp
from pipelines import _k8s
from pipelines._k8s import MIDTRAIN, run_context
from pipelines._tracking import tracked_run

NAME = "refine-pretrain"


@dsl.pipeline(name=NAME, description="Data prep, then next-token-prediction training.")
def pretrain_pipeline(config_yaml: str):
    """Args:
        config_yaml: the experiment config (the text of a ``configs/*.yaml`` file; ``ntp`` section).
    """
    with tracked_run(config_yaml, NAME) as parent:
        data = _k8s.data_stage(prepare_data(config_yaml=config_yaml), _k8s.DATA, "prepare data")
        _k8s.gpu_stage(
            train_ntp(config_yaml=config_yaml, data=data.outputs["dataset"], parent_run_id=parent, **run_context()),
            MIDTRAIN, "train NTP",
        )


if __name__ == "__main__":
    compiler.Compiler().compile(pretrain_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
