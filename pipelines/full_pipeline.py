"""The full REFINE workflow as one Kubeflow pipeline.

    start-run ─> prepare-data ─┬─> train-refine (baseline=True)  ─> post-train ─> ttt-evaluate ─┐
                               └─> train-refine (REFINE)         ─> post-train ─> ttt-evaluate ─┴─> compare-report
                                                                                   └─> register-model (REFINE arm)
    finish-run: the exit task; closes the MLflow parent run with the pipeline's final state.

Both arms mid-train on the same prepared documents for the same number of steps (the NTP-only arm is
``refine.nsp_update=false``, the paper's "SFT MidTr"), are post-trained and evaluated the same way, and the report
puts their scores side by side. Every setting comes from one ``config_yaml`` parameter (an experiment YAML, e.g.
``configs/tiny-cpu.yaml``); credentials come from Kubernetes Secrets (:mod:`pipelines._k8s`).

    python -m pipelines.full_pipeline build/refine-full.yaml     # compile to IR YAML
    refine pipeline run --config configs/tiny-cpu.yaml           # run locally (kfp.local, CPU)

No ``from __future__ import annotations`` in pipeline files: kfp reads the parameter annotations as objects.
"""

import sys

from kfp import compiler, dsl

from components.compare_report import compare_report
from components.post_train import post_train
from components.prepare_data import prepare_data
from components.register_model import register_model
from components.train_refine import train_refine
from components.ttt_evaluate import ttt_evaluate
from pipelines import _k8s
from pipelines._k8s import EVALUATE, MIDTRAIN, POSTTRAIN, run_context
from pipelines._tracking import tracked_run

NAME = "refine-full"


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
            mid = _k8s.gpu_stage(
                train_refine(config_yaml=config_yaml, data=data.outputs["dataset"], baseline=baseline,
                             parent_run_id=parent, **run_context()),
                MIDTRAIN, f"mid-train {arm}",
            )
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


if __name__ == "__main__":
    compiler.Compiler().compile(full_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
