"""``refine pipeline``: compile the Kubeflow pipelines, run one locally, or submit one to a cluster.

    refine pipeline compile [--pipeline NAME|all] [--output DIR] [--config FILE]   # IR YAML, one file per pipeline
    refine pipeline run --config configs/tiny-cpu.yaml [key=value ...]     # the full pipeline on this machine
    refine pipeline submit --host URL --config FILE [--experiment NAME] [--wait]

All three take ``--nodes N --gpus-per-node G``: above 1 x 1 the data-parallel training stage runs as a Kubeflow
Trainer TrainJob, built with the config's ``trainjob`` section (the launcher pod's and each node's resources, the
checkpoint root, keep_staged; :class:`refine_core.config.TrainJobConfig`). Their defaults come from
``$REFINE_TRAIN_NODES`` / ``$REFINE_TRAIN_GPUS_PER_NODE`` (what the retraining CronJob sets from its ConfigMap).

``run`` executes the pipeline through ``kfp.local.SubprocessRunner(use_venv=False)``: every task is a subprocess
of this Python, so ``refine_core`` must be installed here (it is in ``.venv``); GPU, volume and secret settings are
ignored locally. Artifacts land under ``--pipeline-root`` (default ``{output_dir}/kfp``); MLflow runs go to
``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``, else the embedded ``sqlite:///mlruns/mlflow.db``.

``submit`` compiles, uploads a new version of the pipeline (creating the pipeline on first use), and starts a run
in an experiment through ``kfp.Client``; a bearer token comes from ``$KFP_TOKEN`` (or kfp.Client's own
``KF_PIPELINES_SA_TOKEN_PATH``), never from a command-line argument.

The config travels as the ``config_yaml`` pipeline parameter: it is loaded and validated here, relative task file
paths are made absolute for local runs, and a config holding anything that looks like a credential is refused
(credentials reach pods only through Kubernetes Secrets, see ``pipelines/_k8s.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, local

from pipelines import PIPELINES, load_pipeline
from pipelines._console import QuietConsole
from pipelines._k8s import TrainPlacement
from refine_core.config import ConfigError, RunConfig, load_config, parse_overrides, to_dict
from refine_core.tracking import check_store_support, default_tracking_uri, redact

logger = logging.getLogger(__name__)


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()



def _resolve_path(value: str, config_dir: Path | None) -> str:
    """An absolute path (or glob) for a relative ``value`` that matches relative to the working directory, else to
    the config file's directory or one of its parents (``configs/data/x`` from ``configs/x.yaml``, anywhere)."""
    if "://" in value or os.path.isabs(os.path.expanduser(value)):
        return value
    bases = [Path.cwd()] + ([config_dir, *config_dir.parents] if config_dir is not None else [])
    for base in bases:
        if list(base.glob(value)):
            return str(base.resolve() / value)
    return value


def pipeline_config(path: str | None, overrides: Sequence[str], absolute_paths: bool) -> tuple[RunConfig, str]:
    """Load and validate the config; return it and the YAML text passed as the ``config_yaml`` parameter.

    Args:
        path: the experiment YAML.
        overrides: ``key=value`` overrides.
        absolute_paths: make relative task file paths absolute (local runs; a cluster resolves them in the pod).

    Raises:
        ConfigError: a bad config, or a value that looks like a credential.
    """
    cfg = load_config(path, list(overrides))
    if absolute_paths:
        config_dir = Path(path).resolve().parent if path else None
        cfg.post.train_files = [_resolve_path(p, config_dir) for p in cfg.post.train_files]
        cfg.eval.task_files = [_resolve_path(p, config_dir) for p in cfg.eval.task_files]
    tree = to_dict(cfg)
    if redact(tree) != tree:
        raise ConfigError(
            "the config holds a value that looks like a credential (a secret-looking key or user:password@ in a "
            "URL); pipeline parameters are stored in plain text by KFP. Put credentials in the Kubernetes Secrets "
            "named in pipelines/_k8s.py (or environment variables for local runs) and remove them from the config."
        )
    return cfg, yaml.safe_dump(tree, sort_keys=False)


def _params(items: Sequence[str]) -> dict[str, Any]:
    """``--param name=value`` pairs (values read as YAML)."""
    try:
        return dict(parse_overrides(list(items)))
    except ConfigError as exc:
        raise ConfigError(f"--param: {exc}") from exc



def compile_pipelines(names: Sequence[str], output: Path, placement: TrainPlacement | None = None) -> list[Path]:
    """Compile the named pipelines to ``output/<pipeline name>.yaml`` (``<name>-<NxG>gpu.yaml`` for a multi-GPU
    placement of their training stage); returns the files written."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        pipeline = load_pipeline(name, placement)
        suffix = f"-{placement.label}" if placement is not None and placement.distributed else ""
        path = output / f"{pipeline.name}{suffix}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        written.append(path)
    return written



def run_local(name: str, config_yaml: str, pipeline_root: Path, params: dict[str, Any] | None = None,
              placement: TrainPlacement | None = None, log_path: Path | None = None) -> Path:
    """Run pipeline ``name`` through ``kfp.local`` with subprocesses of this interpreter; returns its run folder.

    With a multi-GPU ``placement`` the training tasks create TrainJobs on the cluster of ``$KUBECONFIG`` (the
    tests point it at a loopback fake that runs them here).

    With ``log_path`` the tasks' own output (kfp's executor JSON, every log line) goes to that file and the
    terminal gets one line per task (:class:`pipelines._console.QuietConsole`); without it, everything is printed.

    Raises:
        RuntimeError: a task failed (kfp.local's message names it).
    """
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    # kfp.local.init is process-global and rmtree's workspace_root after every run (mlops-notes §2.6): a fresh
    # temporary directory per run, never anything real. The task subprocesses get their own TMPDIR too: each
    # lightweight task writes its source to a `mktemp -d` that kfp never removes, and the stages' working
    # directories live there; it is all deleted when the run ends.
    scratch = Path(tempfile.mkdtemp(prefix="refine-kfp-"))
    (scratch / "tmp").mkdir()
    (scratch / "workspace").mkdir()
    saved_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch / "tmp")
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   workspace_root=str(scratch / "workspace"), raise_on_error=True)
        with warnings.catch_warnings():
            # Locally the images and the resource settings do not apply; kfp says so for every task.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*have no effect.*", category=UserWarning)
            with QuietConsole(log_path, pipeline_root=pipeline_root) if log_path else contextlib.nullcontext():
                load_pipeline(name, placement)(config_yaml=config_yaml, **(params or {}))
    finally:
        if saved_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_tmpdir
        shutil.rmtree(scratch, ignore_errors=True)
    new = sorted((p for p in set(pipeline_root.iterdir()) - before if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return new[-1] if new else pipeline_root


def _pipeline_runs(tracking_uri: str, pipeline: str, since_ms: int) -> list[Any]:
    """MLflow parent runs of ``pipeline`` started after ``since_ms``, newest first."""
    from mlflow import MlflowClient

    from refine_core.kfp_support import KFP_PIPELINE_TAG, PIPELINE_ROLE, ROLE_TAG

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return client.search_runs(
        experiments,
        filter_string=f"tags.`{ROLE_TAG}` = '{PIPELINE_ROLE}' and tags.`{KFP_PIPELINE_TAG}` = '{pipeline}' "
        f"and attributes.start_time >= {since_ms}",
        order_by=["attributes.start_time DESC"],
    )


def summarize_local_run(tracking_uri: str, pipeline: str, since_ms: int, run_dir: Path) -> list[str]:
    """Lines saying what the run produced: the MLflow parent run, its stage runs, the reports, where to browse."""
    from mlflow import MlflowClient

    lines = [f"artifacts: {run_dir}"]
    for report in sorted(run_dir.glob("compare-report*/report")):
        lines.append(f"comparison report: {report}")
        lines.append(report.read_text().rstrip())
    parents = _pipeline_runs(tracking_uri, pipeline, since_ms)
    if parents:
        parent = parents[0]
        client = MlflowClient(tracking_uri=tracking_uri)
        lines.append(f"MLflow parent run {parent.info.run_id} ({parent.info.status}) in experiment "
                     f"{parent.info.experiment_id}")
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
        )
        for child in children:
            lines.append(f"  {child.info.run_name:<40} {child.info.status:<9} {len(child.data.metrics):3d} metrics")
    return lines


def _browse_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        try:
            shown = f"sqlite:///{db.relative_to(Path.cwd())}"
        except ValueError:
            shown = tracking_uri
        return f"browse: mlflow ui --backend-store-uri {shown}     # http://127.0.0.1:5000"
    return f"browse: {tracking_uri}"



def submit(
    host: str,
    name: str,
    params: dict[str, Any],
    *,
    experiment: str,
    run_name: str,
    version_name: str,
    namespace: str | None = None,
    service_account: str | None = None,
    placement: TrainPlacement | None = None,
    wait: bool = False,
    timeout_s: int = 24 * 3600,
    client: Any | None = None,
) -> tuple[str, str | None]:
    """Upload a version of pipeline ``name`` and start a run of it in ``experiment``.

    Args:
        host: the KFP API endpoint (``http://localhost:8080`` after a port-forward, or the cluster's URL).
        name: a key of :data:`pipelines.PIPELINES`.
        params: the run's pipeline parameters (``config_yaml`` and the pipeline's others).
        experiment: the KFP experiment (created when missing).
        run_name: the run's display name.
        version_name: the new pipeline version's name (unique per pipeline).
        namespace: the Kubeflow profile namespace (multi-user deployments).
        service_account: the Kubernetes service account the run's pods use (``None``: the cluster's default). A
            run whose training goes through the TrainJob launcher needs ``refine-launcher`` (manifests/base/launcher),
            the account allowed to create TrainJobs; KFP sets it per run, not per task.
        placement: the nodes x GPUs of the data-parallel training stage (:class:`TrainPlacement`).
        wait: wait for the run to end.
        timeout_s: how long to wait.
        client: a ``kfp.Client`` (tests pass a fake); default: ``kfp.Client(host=host, namespace=...)``.

    Returns:
        ``(run_id, final state or None when not waiting)``.
    """
    if client is None:
        import kfp

        client = kfp.Client(host=host, namespace=namespace or "kubeflow",
                            existing_token=os.environ.get("KFP_TOKEN") or None)
    pipeline = load_pipeline(name, placement)
    with tempfile.TemporaryDirectory(prefix="refine-submit-") as tmp:
        package = str(Path(tmp) / f"{pipeline.name}.yaml")
        compiler.Compiler().compile(pipeline, package)
        pipeline_id = client.get_pipeline_id(pipeline.name)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(package, pipeline_name=pipeline.name,
                                                 description=pipeline.description, namespace=namespace).pipeline_id
            logger.info("created pipeline %s (%s)", pipeline.name, pipeline_id)
        version = client.upload_pipeline_version(package, pipeline_version_name=version_name, pipeline_id=pipeline_id)
    exp = client.create_experiment(experiment, namespace=namespace)
    run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name, params=params,
                              pipeline_id=pipeline_id, version_id=version.pipeline_version_id,
                              service_account=service_account or None)
    _out(f"submitted run {run.run_id} of {pipeline.name} version {version_name!r} in experiment {experiment!r}")
    _out(f"  {host.rstrip('/')}/#/runs/details/{run.run_id}")
    if not wait:
        return run.run_id, None
    state = wait_for_run(client, run.run_id, timeout_s)
    _out(f"run {run.run_id} finished: {state}")
    return run.run_id, state


def dry_run_summary(name: str, cfg: RunConfig, placement: TrainPlacement, params: dict[str, Any]) -> list[str]:
    """What ``submit`` would send, without a cluster: the pipeline compiled, its tasks and their resources."""
    pipeline = load_pipeline(name, placement)
    with tempfile.TemporaryDirectory(prefix="refine-dry-run-") as tmp:
        package = Path(tmp) / f"{pipeline.name}.yaml"
        compiler.Compiler().compile(pipeline, str(package))
        size = package.stat().st_size
        spec = next(yaml.safe_load_all(package.read_text()))  # the IR; a platform spec (Kubernetes) may follow
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    components = spec.get("components", {})
    tasks: dict[str, dict] = {}
    pending = [spec["root"]["dag"]["tasks"]]
    while pending:  # exit handlers and condition groups are components with a DAG of their own
        for task_name, task in pending.pop().items():
            inner = components.get(task.get("componentRef", {}).get("name", ""), {}).get("dag")
            if inner:
                pending.append(inner["tasks"])
            else:
                tasks[task_name] = task
    lines = [
        f"dry run: pipeline {pipeline.name} ({len(tasks)} tasks, {size:,} bytes compiled) with config "
        f"{cfg.name!r} on {placement.nodes} node(s) x {placement.gpus_per_node} GPU(s); nothing was submitted",
        f"parameters: {', '.join(sorted(params))}",
    ]
    for task_name, task in sorted(tasks.items()):
        executor = components.get(task["componentRef"]["name"], {}).get("executorLabel", "")
        container = executors.get(executor, {})
        resources = container.get("container", {}).get("resources", {})
        gpus = resources.get("accelerator", {}).get("resourceCount") or resources.get("accelerator", {}).get("count")
        memory = resources.get("resourceMemoryLimit") or resources.get("memoryLimit")
        lines.append(f"  {task_name:<28} gpus {gpus or 0:<3} memory {memory or '-'}")
        params = {k: v["runtimeValue"]["constant"] for k, v in task.get("inputs", {}).get("parameters", {}).items()
                  if "runtimeValue" in v}
        if "node_resources" in params:  # a TrainJob launcher: what it will ask for
            limits = params["node_resources"].get("limits", {})
            lines.append(f"  {'':<28} -> TrainJob {int(params['num_nodes'])} node(s) x {int(params['procs_per_node'])} "
                         f"process(es), per node {limits}, checkpoints "
                         f"{params.get('checkpoint_root') or '$REFINE_STAGING_URI/<run>/<task>/checkpoints'}, "
                         f"resume={params.get('resume')}")
    return lines


# Run states after which a KFP run never changes again. kfp 2.17's own wait_for_run_completion leaves CANCELED
# out (kubeflow/pipelines#14473) and would poll a canceled run until the timeout.
FINAL_RUN_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")


def wait_for_run(client: Any, run_id: str, timeout_s: float, poll_s: float = 5.0) -> str:
    """Poll the run until it reaches a final state; ``TIMEOUT`` when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(client.get_run(run_id).state)
        if state in FINAL_RUN_STATES:
            return state
        if time.monotonic() >= deadline:
            logger.error("run %s is still %s after %.0f s; it keeps running on the cluster", run_id, state, timeout_s)
            return "TIMEOUT"
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))



# The service account `refine pipeline submit` starts runs as when --service-account is not given.
SERVICE_ACCOUNT_ENV = "REFINE_KFP_SERVICE_ACCOUNT"


# Defaults of --nodes / --gpus-per-node (the retraining CronJob sets them from the refine-config ConfigMap).
NODES_ENV = "REFINE_TRAIN_NODES"
GPUS_PER_NODE_ENV = "REFINE_TRAIN_GPUS_PER_NODE"


def _env_count(name: str) -> int:
    """A positive count from the environment (unset or empty: 1)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        sys.stderr.write(f"refine pipeline: error: ${name}={value!r} must be a whole number >= 1 (or unset).\n")
        raise SystemExit(2)
    return int(value)


def _placement_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--nodes", type=int, default=_env_count(NODES_ENV),
                     help="nodes for the data-parallel training stage (mid-/pre-training); with --gpus-per-node above "
                     f"1 x 1 it runs as a Kubeflow Trainer TrainJob (default: ${NODES_ENV}, else 1)")
    sub.add_argument("--gpus-per-node", type=int, default=_env_count(GPUS_PER_NODE_ENV),
                     help=f"GPUs (torchrun processes) per node for that stage (default: ${GPUS_PER_NODE_ENV}, else 1)")


def placement_from(args: argparse.Namespace, cfg: RunConfig | None = None) -> TrainPlacement:
    """The :class:`TrainPlacement` of ``--nodes`` / ``--gpus-per-node``, with ``cfg``'s ``trainjob`` section."""
    placement = TrainPlacement(nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    return placement.with_config(cfg.trainjob) if cfg is not None else placement


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refine pipeline", description="Compile, run or submit the Kubeflow "
                                     "pipelines of components/ and pipelines/.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [*PIPELINES, "all"]

    sub = commands.add_parser("compile", help="compile pipelines to IR YAML")
    sub.add_argument("--pipeline", default="all", choices=names, help="which pipeline (default: all)")
    sub.add_argument("--output", default="build/pipelines", type=Path, help="directory (default: build/pipelines)")
    sub.add_argument("--config", metavar="FILE",
                     help="experiment YAML whose trainjob section sizes a multi-GPU build (default: its defaults)")
    _placement_arguments(sub)

    for command, text in (("run", "run a pipeline locally (kfp.local, subprocesses, CPU)"),
                          ("submit", "upload a pipeline version and start a run on a Kubeflow cluster")):
        sub = commands.add_parser(command, help=text, description=text)
        sub.add_argument("--config", required=True, metavar="FILE", help="experiment YAML")
        sub.add_argument("--pipeline", default="full", choices=list(PIPELINES), help="which pipeline (default: full)")
        sub.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="another pipeline parameter, e.g. model_uri=s3://... or model_name=my-model")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. refine.steps=20")
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved config the pipeline would get (secrets redacted) and exit")
        _placement_arguments(sub)
        if command == "submit":
            sub.add_argument("--dry-run", action="store_true",
                             help="compile and summarize the pipeline with this config; contact no cluster")
        if command == "run":
            sub.add_argument("--pipeline-root", type=Path, help="where artifacts go (default: {output_dir}/kfp)")
            sub.add_argument("-v", "--verbose", action="store_true",
                             help="print every task's output (default: one line per task, the rest in a log file)")
        else:
            sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
            sub.add_argument("--experiment", default="refine", help="KFP experiment (default: refine)")
            sub.add_argument("--run-name", help="run display name (default: <config name>-<time>)")
            sub.add_argument("--version-name", help="pipeline version name (default: <config name>-<time>)")
            sub.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
            sub.add_argument("--service-account", default=os.environ.get(SERVICE_ACCOUNT_ENV) or None,
                             help="Kubernetes service account of the run's pods; multi-GPU runs need refine-launcher, "
                             f"which may create TrainJobs (default: ${SERVICE_ACCOUNT_ENV}, else the cluster's)")
            sub.add_argument("--wait", action="store_true", help="wait for the run to end and report its state")
            sub.add_argument("--timeout", type=int, default=24 * 3600, help="seconds to wait (default: 1 day)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``refine pipeline ...``; returns the exit status (2: bad arguments or config, 1: the run failed)."""
    from refine_core import runtime

    args = build_parser().parse_args(argv)
    runtime.setup_logging(args.log_level)
    try:
        placement = placement_from(args)
        if args.command == "compile":
            if args.config:
                placement = placement_from(args, load_config(args.config))
            names = list(PIPELINES) if args.pipeline == "all" else [args.pipeline]
            if placement.distributed:  # only the pipelines with a data-parallel stage have a multi-GPU build
                names = [n for n in names if PIPELINES[n][2]] if args.pipeline == "all" else names
            for path in compile_pipelines(names, args.output, placement):
                _out(f"wrote {path}")
            return 0
        load_pipeline(args.pipeline, placement)  # refuses a multi-GPU placement of a pipeline without one
    except ValueError as exc:  # ConfigError included
        sys.stderr.write(f"refine pipeline {args.command}: error: {exc}\n")
        return 2

    try:
        cfg, config_yaml = pipeline_config(args.config, args.overrides, absolute_paths=args.command == "run")
        params = _params(args.param)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"refine pipeline {args.command}: error: {exc}\n")
        return 2
    placement = placement_from(args, cfg)
    if args.command == "submit" and placement.distributed and not args.service_account:
        logger.warning(
            "a %dx%d-GPU run launches TrainJobs, which the run's service account must be allowed to create: pass "
            "--service-account refine-launcher (or set $%s), unless that Role is bound to the cluster's default "
            "account (manifests/README.md)", placement.nodes, placement.gpus_per_node, SERVICE_ACCOUNT_ENV,
        )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))
        return 0
    if args.command == "submit" and args.dry_run:
        for line in dry_run_summary(args.pipeline, cfg, placement, {"config_yaml": config_yaml, **params}):
            _out(line)
        return 0

    if args.command == "submit":
        _, state = submit(
            args.host, args.pipeline, {"config_yaml": config_yaml, **params}, experiment=args.experiment,
            run_name=args.run_name or f"{cfg.name}-{stamp}", version_name=args.version_name or f"{cfg.name}-{stamp}",
            namespace=args.namespace, service_account=args.service_account, placement=placement, wait=args.wait,
            timeout_s=args.timeout,
        )
        return 0 if state in (None, "SUCCEEDED") else 1

    # One tracking URI for this process and every task subprocess (they inherit the environment), absolute so
    # that it does not depend on a task's working directory.
    tracking_uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if cfg.tracking.backend == "mlflow":
        check_store_support(tracking_uri)  # before any task runs: the embedded store needs full MLflow
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    pipeline_root = (args.pipeline_root or Path(cfg.output_dir) / "kfp").resolve()
    since_ms = int(time.time() * 1000) - 1000
    start = time.perf_counter()
    log_path = None if args.verbose else pipeline_root / f"{cfg.name}-{stamp}.log"
    _out(f"running pipeline {load_pipeline(args.pipeline).name} locally"
         + (f"; task output goes to {log_path} (-v prints it)" if log_path else ""))
    try:
        run_dir = run_local(args.pipeline, config_yaml, pipeline_root, params, placement, log_path=log_path)
    except RuntimeError as exc:
        sys.stderr.write(f"refine pipeline run: {exc}" + (f"; its output is in {log_path}" if log_path else "") + "\n")
        return 1
    wall = time.perf_counter() - start
    _out()
    _out(f"pipeline {load_pipeline(args.pipeline).name} finished in {wall:.1f} s")
    if cfg.tracking.backend == "mlflow":
        for line in summarize_local_run(tracking_uri, load_pipeline(args.pipeline).name, since_ms, run_dir):
            _out(line)
        _out(_browse_hint(tracking_uri))
    else:
        _out(f"artifacts: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
