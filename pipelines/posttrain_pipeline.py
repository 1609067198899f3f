"""Phase pipeline: post-training only (task SFT, Nested SFT or Nested REFINE, ``post.mode``) of one model.

    start-run ─> [importer(model_uri)] ─> post-train

``model_uri`` names a model in HF layout in the pipeline root's object store (e.g. the ``model`` artifact of a
``refine-midtrain`` run: ``s3://bucket/v2/artifacts/.../train-refine/model``); empty means the config's
``model.source``.

    python -m pipelines.posttrain_pipeline build/refine-posttrain.yaml
"""

import sys

from kfp import compiler, dsl

from components.post_train import post_train
from pipelines import _k8s
from pipelines._k8s import POSTTRAIN, run_context
from pipelines._tracking import tracked_run

NAME = "refine-posttrain"


@dsl.pipeline(name=NAME, description="Post-train one model on the config's task files.")
def posttrain_pipeline(config_yaml: str, model_uri: str = ""):
    """Args:
        config_yaml: the experiment config (the text of a ``configs/*.yaml`` file).
        model_uri: the model to post-train (an artifact URI); empty: the config's ``model.source``.
    """
    with tracked_run(config_yaml, NAME) as parent:
        with dsl.If(model_uri != "", name="from-artifact"):
            imported = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False)
            imported.set_display_name("import model")
            _k8s.gpu_stage(
                post_train(config_yaml=config_yaml, base_model=imported.output, parent_run_id=parent,
                           **run_context()),
                POSTTRAIN, "post-train",
            )
        with dsl.Else():
            _k8s.gpu_stage(post_train(config_yaml=config_yaml, parent_run_id=parent, **run_context()),
                           POSTTRAIN, "post-train")


if __name__ == "__main__":
    compiler.Compiler().compile(posttrain_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
