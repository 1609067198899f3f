"""The full REFINE workflow as one Kubeflow pipeline.

    start-run ─> prepare-data ─┬─> train-refine (baseline=True)  ─> post-train ─> ttt-evaluate ─┐
                               └─> train-refine (REFINE)         ─> post-train ─> ttt-evaluate ─┴─> compare-report
                                                                                   └─> register-model (REFINE arm)
    finish-run: the exit task; closes the MLflow parent run with the pipeline's final state.

Both arms mid-train on the same prepared documents for the same number of steps (the NTP-only arm is
``refine.nsp_update=false``, the paper's "SFT MidTr"), are post-trained and evaluated the same way, and the report
puts their scores side by side. Every setting comes from one ``config_yaml`` parameter (an experiment YAML, e.g.
``configs/tiny-cpu.yaml``); credentials come from Kubernetes Secrets (:mod:`pipelines._k8s`). Mid-training runs on
one GPU in its task's pod, or, built with a larger :class:`~pipelines._k8s.TrainPlacement`, as a Kubeflow Trainer
``TrainJob`` per arm (the ``launch-trainjob`` component takes the place of ``train-refine``).

    python -m pipelines.full_pipeline build/refine-full.yaml     # compile to IR YAML
    refine pipeline compile --pipeline full --nodes 2 --gpus-per-node 8   # mid-training on 2 x 8 GPUs
    refine pipeline run --config configs/tiny-cpu.yaml           # run locally (kfp.local, CPU)

No ``from __future__ import annotations`` in pipeline files: kfp reads the parameter annotations as objects.
"""

import sys

from kfp import compiler, dsl

from components.compare_report import compare_report
from components.post_train import post_train
from components.prepare_data import prepare_data
from components.register_model import register_model
from components.ttt_evaluate import ttt_evaluate
from pipelines import _k8s
from pipelines._k8s import EVALUATE, MIDTRAIN, POSTTRAIN, SINGLE_GPU, TrainPlacement, run_context
from pipelines._tracking import tracked_run
from pipelines._training import training_task

NAME = "refine-full"


def build(placement: TrainPlacement = SINGLE_GPU):
    """The full pipeline with mid-training placed by ``placement``."""

    @dsl.pipeline(name=NAME, description="Data prep, NTP-baseline and REFINE mid-training, post-training, "
                  "test-time training + evaluation of both arms, comparison report, model registration.")
    def full_pipeline(config_yaml: str, model_name: str = "refine-deltanet"):
        """Args:
            config_yaml: the experiment config (the text of a ``configs/*.yaml`` file).
            model_name: the MLflow registered model that receives the REFINE arm's final model.
        """
        with tracked_run(config_yaml, NAME) as parent:
            data = _k8s.data_stage(prepare_data(config_yaml=config_yaml), _k8s.DATA, "prepare data")
            arms = {}
            for arm, baseline in (("ntp-baseline", True), ("refine", False)):
                mid = training_task("train-refine", config_yaml=config_yaml, data=data.outputs["dataset"],
                                    baseline=baseline, parent_run_id=parent, placement=placement, resources=MIDTRAIN,
                                    name=f"mid-train {arm}")
                post = _k8s.gpu_stage(
                    post_train(config_yaml=config_yaml, base_model=mid.outputs["model"], parent_run_id=parent,
                               **run_context()),
                    POSTTRAIN, f"post-train {arm}",
                )
                evaluation = _k8s.gpu_stage(
                    ttt_evaluate(config_yaml=config_yaml, model=post.outputs["model"], parent_run_id=parent,
                                 **run_context()),
                    EVALUATE, f"TTT + evaluate {arm}",
                )
                arms[arm] = (mid, post, evaluation)
            (base_mid, _, base_eval), (refine_mid, refine_post, refine_eval) = arms["ntp-baseline"], arms["refine"]
            _k8s.light_stage(
                compare_report(config_yaml=config_yaml, baseline_results=base_eval.outputs["results"],
                               refine_results=refine_eval.outputs["results"], baseline_model=base_mid.outputs["model"],
                               refine_model=refine_mid.outputs["model"], parent_run_id=parent, **run_context()),
                "compare arms",
            )
            _k8s.light_stage(
                register_model(config_yaml=config_yaml, model=refine_post.outputs["model"], model_name=model_name,
                               results=refine_eval.outputs["results"], parent_run_id=parent, **run_context()),
                "register REFINE model",
            )

    return full_pipeline


full_pipeline = build()


if __name__ == "__main__":
    compiler.Compiler().compile(full_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
