"""Component ``launch-trainjob``: a training stage on several GPUs or nodes, as a Kubeflow Trainer v2 ``TrainJob``.

It stands in for ``train-refine`` / ``train-ntp`` when a pipeline is compiled with more than one GPU for
mid-training (``refine pipeline compile --nodes 2 --gpus-per-node 8``) and has the same inputs and outputs, so the
rest of the pipeline is wired alike. This small pod stages the ``data`` (and ``base_model``) where the trainer pods
reach them, opens the stage's nested MLflow run, creates the TrainJob (``torchrun -m refine_core <stage>`` in the
GPU image on every node), streams its logs, and once it completes copies the exported model into ``model``
(:mod:`refine_core.distributed.handover`). The trainer's rank 0 logs into the same MLflow run (``MLFLOW_RUN_ID``).

The trainers checkpoint to a location that depends only on the KFP run and task and run with ``resume=true``, so a
retry of this task (or of the job) continues from the last committed checkpoint. When the job ends the launcher
deletes what it staged (the checkpoints only after a success), unless ``keep_staged``.

Resources: this pod's own come from the task (``set_cpu_request`` ..., ``trainjob.launcher`` of the config;
declared as a RESOURCES passthrough applied to this task, and not copied into the job); each trainer node's are
``node_resources`` (``resourcesPerNode``). The task's tolerations and node selector are not
applied to this pod: KFP passes them through (``task_config_passthroughs``, mlops-notes §2.3) and
:mod:`refine_core.distributed.trainjob` copies them into the TrainJob. Env and volumes apply to both. The pod needs
the ``refine-launcher`` service account (``manifests/base/launcher``; ``refine pipeline submit --service-account
refine-launcher``).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components._image import REFINE_CPU_IMAGE


@dsl.component(
    base_image=REFINE_CPU_IMAGE,
    install_kfp_package=False,
    task_config_passthroughs=[
        # This pod's own resources: KFP refuses resources on a task whose passthroughs lack them. The nodes' come
        # from node_resources, so the launcher ignores these (with_task_config(resources=False)).
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.RESOURCES, apply_to_task=True),
        dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    ],
)
def launch_trainjob(
    stage: str,
    config_yaml: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    task_config: dsl.TaskConfig,
    baseline: bool = False,
    num_nodes: int = 1,
    procs_per_node: int = 1,
    staging_uri: str = "",
    parent_run_id: str = "",
    kfp_run_id: str = "",
    kfp_task: str = "",
    runtime: str = "refine-torch",
    image: str = "",
    namespace: str = "",
    timeout_s: int = 7 * 24 * 3600,
    poll_s: float = 15.0,
    node_resources: dict = {},  # noqa: B006 - KFP parameters need literal defaults; never mutated
    checkpoint_root: str = "",
    resume: bool = True,
    keep_staged: bool = False,
    base_model: Input[Model] | None = None,
):
    """Run ``stage`` as a TrainJob of ``num_nodes`` x ``procs_per_node`` processes; outputs as ``train-refine``'s.

    Args:
        stage: ``train-refine`` or ``train-ntp`` (the data-parallel stages).
        config_yaml: the experiment config; its batch sizes must be multiples of the number of processes.
        data: a ``prepare-data`` output.
        model: the final model (HF layout); metadata: MLflow run ids, arm, steps, held-out loss, TrainJob name.
        metrics: ``train/steps``, ``train/final_eval_loss``.
        report: a Markdown summary with the logged history as a table.
        task_config: filled by KFP from this task's settings (every field ``None`` in a local run).
        baseline: with ``train-refine``, the NTP-only arm (``refine.nsp_update=false``).
        num_nodes: nodes (pods) of the job.
        procs_per_node: torchrun processes per node, one per GPU.
        staging_uri: where inputs and the result pass between this pod and the trainers (``s3://...`` or a shared
            directory); empty: ``$REFINE_STAGING_URI``.
        parent_run_id: the pipeline's MLflow parent run (``start-run``'s output).
        kfp_run_id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
        kfp_task: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        runtime: the ClusterTrainingRuntime (``manifests/base/trainer``).
        image: the training image; empty: ``components._image.REFINE_GPU_IMAGE`` as resolved in this pod.
        namespace: default: this pod's namespace.
        timeout_s: delete the job and fail after this long.
        poll_s: seconds between status polls.
        node_resources: ``resourcesPerNode`` of the TrainJob (``{"requests": {...}, "limits": {...}}``, GPUs
            included); empty: none.
        checkpoint_root: where the trainers checkpoint, plus ``/{kfp run id}/{task}`` (``s3://`` or a directory the
            trainer pods mount); empty: the task's staging prefix.
        resume: the trainers continue from the newest complete checkpoint there (what makes a retry resume).
        keep_staged: keep the staged data, result and checkpoints when the job ends.
        base_model: a model to start from; default: the config's ``model`` section.
    """
    import signal
    import sys

    from components._image import REFINE_GPU_IMAGE
    from refine_core import kfp_support as ks
    from refine_core import runtime as rt
    from refine_core.distributed import handover
    from refine_core.distributed import trainjob as tj

    rt.setup_logging("INFO")
    # KFP stops a pod with SIGTERM: turn it into SystemExit so that the launcher deletes the TrainJob.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    name, arm, settings = ks.training_arm(stage, baseline)
    cfg = ks.stage_config(config_yaml, name, prepared_dir=data.path, settings=settings)
    ctx = ks.KfpContext(parent_run_id, kfp_run_id, kfp_task)
    staging = handover.staging_for(staging_uri, kfp_run_id, kfp_task)
    world = num_nodes * procs_per_node
    tj.check_resources(node_resources, "node_resources")
    checkpoints = handover.checkpoint_location(staging, checkpoint_root, kfp_run_id, kfp_task)
    succeeded = False
    with ks.open_stage_run(cfg, name, ctx, {"refine.arm": arm, "refine.world_size": world}) as tracker:
        try:
            settings.update(handover.push_inputs(staging, data.path, base_model.path if base_model else None))
            settings.update(handover.trainer_settings(stage, checkpoints, resume))
            spec = tj.TrainJobSpec(
                stage=stage, image=image or REFINE_GPU_IMAGE, config_yaml=config_yaml,
                overrides=handover.as_overrides(settings), namespace=namespace or tj.current_namespace(),
                num_nodes=num_nodes, procs_per_node=procs_per_node, runtime=runtime, active_deadline_s=timeout_s,
                resources=dict(node_resources) or None,
            ).with_task_config(task_config, resources=False)
            if tracker.run_id:
                spec = spec.with_env({"MLFLOW_RUN_ID": tracker.run_id})  # rank 0 logs into this stage run
            status = tj.launch_trainjob(spec, tj.api_client_from_environment(), timeout_s=timeout_s, poll_s=poll_s,
                                        log_sink=print)
            result = handover.pull_result(staging, ks.work_dir(name))
            model.metadata.update(ks.export_training(
                result, name, tracker, ctx, model.path, metrics, report.path, arm=arm, world_size=world,
                trainjob=status.name, data_fingerprint=data.metadata.get("data_fingerprint"),
            ))
            succeeded = True  # the model is in the output artifact: the checkpoints have served their purpose
        finally:  # success, failure, timeout or SIGTERM alike
            handover.clean_up(staging, checkpoints, succeeded=succeeded, keep_staged=keep_staged)
