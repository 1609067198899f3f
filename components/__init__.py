"""Kubeflow Pipelines components: one thin ``@dsl.component`` per ``refine_core`` stage, each in its own file.

    from components.train_refine import train_refine      # the component object; .python_func is the function

Every component runs on the project image (:mod:`components._image`) with ``refine_core`` and kfp installed, so
it is a lightweight component with ``install_kfp_package=False`` that imports ``refine_core`` inside its body
(mlops-notes §2.1 option (a)); ``kfp.local.SubprocessRunner(use_venv=False)`` runs the same code on a laptop. The
bodies only wire parameters and artifact paths to the one stage entry function; the shared glue is
:mod:`refine_core.kfp_support`, which does not import kfp.

| file | stage entry function | image |
| --- | --- | --- |
| ``start_run.py`` / ``finish_run.py`` | MLflow parent run of a pipeline run (open / close, exit task) | CPU |
| ``prepare_data.py`` | ``refine_core.stages.prepare_data.prepare_data`` | CPU |
| ``train_ntp.py`` | ``refine_core.stages.train_ntp.train_ntp`` | GPU |
| ``train_refine.py`` | ``refine_core.stages.train_refine.train_refine`` (``baseline=True``: NTP-only arm) | GPU |
| ``post_train.py`` | ``refine_core.stages.post_train.post_train`` | GPU |
| ``ttt_evaluate.py`` | ``refine_core.stages.ttt.test_time_train`` (``ttt.method=none``: ``evaluate``) | GPU |
| ``compare_report.py`` | both arms side by side (Markdown + HTML) | CPU |
| ``register_model.py`` | MLflow model registry | CPU |
| ``launch_trainjob.py`` | a stage on several GPUs / nodes as a Kubeflow Trainer ``TrainJob`` | CPU (launcher) |

The component files do not use ``from __future__ import annotations``: kfp reads the parameter annotations
(``Input[Dataset]``, ``Output[Model]``) at decoration time and needs them as objects, not strings; no re-exports
here either, so that ``components.train_refine`` stays the module.
"""
