"""Phase pipeline: mid-training only — data prep, then the NTP-baseline and REFINE arms side by side.

    start-run ─> prepare-data ─┬─> train-refine (baseline=True)
                               └─> train-refine (REFINE)

The models start from the config's ``model`` section (``model.source``: a hub checkpoint such as
``fla-hub/delta_net-1.3B-100B``, an ``s3://`` prefix, or nothing for a fresh model). Their ``Model`` artifacts
(metadata: MLflow run ids, held-out loss) feed :mod:`pipelines.posttrain_pipeline` through ``model_uri``.

    python -m pipelines.midtrain_pipeline build/refine-midtrain.yaml
"""

import sys

from kfp import compiler, dsl

from components.prepare_data import prepare_data
from pipelines import _k8s
from pipelines._k8s import MIDTRAIN, SINGLE_GPU, TrainPlacement
from pipelines._tracking import tracked_run
from pipelines._training import training_task

NAME = "refine-midtrain"


def build(placement: TrainPlacement = SINGLE_GPU):
    """The mid-training pipeline with both arms placed by ``placement`` (one pod, or a TrainJob each)."""

    @dsl.pipeline(name=NAME, description="Data prep, then NTP-baseline and REFINE mid-training side by side.")
    def midtrain_pipeline(config_yaml: str, train_baseline: bool = True):
        """Args:
            config_yaml: the experiment config (the text of a ``configs/*.yaml`` file).
            train_baseline: also train the NTP-only baseline arm.
        """
        with tracked_run(config_yaml, NAME) as parent:
            data = _k8s.data_stage(prepare_data(config_yaml=config_yaml), _k8s.DATA, "prepare data")
            common = dict(config_yaml=config_yaml, data=data.outputs["dataset"], parent_run_id=parent,
                          placement=placement, resources=MIDTRAIN)
            training_task("train-refine", baseline=False, name="mid-train refine", **common)
            with dsl.If(train_baseline == True, name="with-baseline"):  # noqa: E712 - a KFP condition, not a bool
                training_task("train-refine", baseline=True, name="mid-train ntp-baseline", **common)

    return midtrain_pipeline


midtrain_pipeline = build()


if __name__ == "__main__":
    compiler.Compiler().compile(midtrain_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
