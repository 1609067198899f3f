"""Component ``launch-trainjob``: run a stage on several GPUs or nodes as a Kubeflow Trainer v2 ``TrainJob``.

The task's own resources, tolerations, node selector, volumes and env are not used by this small pod: KFP passes
them through (``task_config_passthroughs``, mlops-notes §2.3) and :mod:`refine_core.distributed.trainjob` copies
them into the TrainJob, which runs ``torchrun -m refine_core <stage>`` in the GPU image on every node. Volumes and
env also apply to this task, so it sees the same workspace and MLflow settings. The pod needs the ``refine-launcher``
service account (``manifests/base/launcher``). Set the task's ``kubernetes.set_timeout`` above ``timeout_s`` and
disable caching: the result is a side effect on the cluster.

Usage in a pipeline::

    task = launch_trainjob(stage="train-refine", config_yaml=cfg, num_nodes=2)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(8)   # per node, copied into the TrainJob
    task.set_cpu_limit("32").set_memory_limit("512Gi").set_caching_options(False)
"""

from kfp import dsl

from components._image import REFINE_CPU_IMAGE


@dsl.component(
    base_image=REFINE_CPU_IMAGE,
    install_kfp_package=False,
    task_config_passthroughs=[
        dsl.TaskConfigField.RESOURCES,
        dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    ],
)
def launch_trainjob(
    stage: str,
    config_yaml: str,
    task_config: dsl.TaskConfig,
    overrides: list = [],  # noqa: B006 - KFP reads the default from the signature; it is never mutated
    num_nodes: int = 1,
    procs_per_node: int = 0,
    runtime: str = "refine-torch",
    image: str = "",
    namespace: str = "",
    job_name: str = "",
    timeout_s: int = 7 * 24 * 3600,
    poll_s: float = 15.0,
    delete_on_success: bool = False,
) -> str:
    """Create the TrainJob, stream its trainer pods' logs here, wait for it; delete it on failure or timeout.

    Args:
        stage: the ``refine`` subcommand (``train-ntp``, ``train-refine``).
        config_yaml: the experiment config (its paths must point at storage every node reaches).
        task_config: filled by KFP from this task's settings; locally every field is ``None`` and nothing is
            copied (a local run has no cluster to launch on and stops with a clear error).
        overrides: extra ``key=value`` overrides for the stage.
        num_nodes: nodes (pods) of the job; the task's resources are per node.
        procs_per_node: torchrun processes per node; 0 = one per GPU of the task's resources (else 1).
        runtime: the ClusterTrainingRuntime (``manifests/base/trainer``).
        image: the training image; empty: ``components._image.REFINE_GPU_IMAGE`` as resolved in this pod (the
            signature can hold only literals: KFP runs this function's source text on its own).
        namespace: default: this pod's namespace.
        job_name: default: ``refine-<stage>-<random>``.
        timeout_s: delete the job and fail after this long.
        poll_s: seconds between status polls.
        delete_on_success: also delete the job when it completes.

    Returns:
        The TrainJob's name.
    """
    import logging
    import signal
    import sys

    from components._image import REFINE_GPU_IMAGE
    from refine_core import runtime as rt
    from refine_core.distributed import trainjob as tj

    rt.setup_logging("INFO")
    # KFP stops a pod with SIGTERM: turn it into SystemExit so that the launcher deletes the TrainJob.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    spec = tj.TrainJobSpec(
        stage=stage,
        image=image or REFINE_GPU_IMAGE,
        config_yaml=config_yaml,
        overrides=[str(o) for o in overrides or []],
        namespace=namespace or tj.current_namespace(),
        name=job_name or None,
        num_nodes=num_nodes,
        procs_per_node=procs_per_node or None,
        runtime=runtime,
    ).with_task_config(task_config)
    if spec.resources is None:
        logging.getLogger("launch-trainjob").warning(
            "task_config carries no resources (a local run, or the task sets none): the TrainJob requests none"
        )
    status = tj.launch_trainjob(
        spec, tj.api_client_from_environment(), timeout_s=timeout_s, poll_s=poll_s, log_sink=print,
        delete_on_success=delete_on_success,
    )
    return status.name
