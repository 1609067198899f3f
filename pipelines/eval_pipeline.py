"""Phase pipeline: test-time training + evaluation (or plain evaluation, ``ttt.method=none``) of one model.

    start-run ─> [importer(model_uri)] ─> ttt-evaluate

``model_uri`` names a model in HF layout in the pipeline root's object store (e.g. the ``model`` artifact of a
``refine-posttrain`` run); empty means the config's ``model.source`` (a hub checkpoint such as
``fla-hub/delta_net-1.3B-100B`` or an ``s3://`` prefix).

    python -m pipelines.eval_pipeline build/refine-eval.yaml
"""

import sys

from kfp import compiler, dsl

from components.ttt_evaluate import ttt_evaluate
from pipelines import _k8s
from pipelines._k8s import EVALUATE, run_context
from pipelines._tracking import tracked_run

NAME = "refine-eval"


@dsl.pipeline(name=NAME, description="Test-time training and evaluation of one model on the config's tasks.")
def eval_pipeline(config_yaml: str, model_uri: str = ""):
    """Args:
        config_yaml: the experiment config (the text of a ``configs/*.yaml`` file).
        model_uri: the model to evaluate (an artifact URI); empty: the config's ``model.source``.
    """
    with tracked_run(config_yaml, NAME) as parent:
        with dsl.If(model_uri != "", name="from-artifact"):
            imported = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False)
            imported.set_display_name("import model")
            _k8s.gpu_stage(
                ttt_evaluate(config_yaml=config_yaml, model=imported.output, parent_run_id=parent, **run_context()),
                EVALUATE, "TTT + evaluate",
            )
        with dsl.Else():
            _k8s.gpu_stage(ttt_evaluate(config_yaml=config_yaml, parent_run_id=parent, **run_context()),
                           EVALUATE, "TTT + evaluate")


if __name__ == "__main__":
    compiler.Compiler().compile(eval_pipeline, sys.argv[1] if len(sys.argv) > 1 else f"{NAME}.yaml")
