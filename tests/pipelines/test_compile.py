"""Every pipeline compiles to IR YAML that parses back (PipelineSpec + the Kubernetes platform spec), and the IR says
what the cluster must do: GPUs for the GPU stages, /dev/shm as a memory emptyDir, credentials only from Secrets,
the tracking URI from the ConfigMap, retries, timeouts, caching only for data preparation, and the wiring of
which task feeds which. The compiled YAML holds no credential, even with credentials in the environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.components import load_component_from_file
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from components import _image
from pipelines import PIPELINES, _k8s, load_pipeline
from refine_core.config import load_config

REPO = Path(__file__).resolve().parents[2]
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYFORTEST0001",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-access-key-for-the-compile-test",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-for-the-compile-test",
    "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user",
    "KFP_TOKEN": "fake-kfp-bearer-token-for-the-compile-test",
}
GPU_COMPONENTS = {"train-refine", "train-ntp", "post-train", "ttt-evaluate"}
LAUNCHER = "launch-trainjob"
MLFLOW_COMPONENTS = GPU_COMPONENTS | {"start-run", "finish-run", "compare-report", "register-model", LAUNCHER}
# Builds whose data-parallel training stage runs as a TrainJob: name -> (pipeline, placement).
# A config's trainjob section, as `refine pipeline submit --config` applies it (the other builds use the defaults).
CONFIGURED = load_config(None, ["trainjob.node={cpu: '90', memory: 700Gi, memory_limit: 720Gi}",
                                "trainjob.launcher={cpu: 500m, memory: 2Gi}", "trainjob.keep_staged=true",
                                "trainjob.checkpoint_root=s3://refine-ckpt/midtrain"]).trainjob
DISTRIBUTED = {
    "full-2x8gpu": ("full", _k8s.TrainPlacement(nodes=2, gpus_per_node=8)),
    "midtrain-1x4gpu": ("midtrain", _k8s.TrainPlacement(nodes=1, gpus_per_node=4)),
    "pretrain-4x1gpu": ("pretrain", _k8s.TrainPlacement(nodes=4, gpus_per_node=1)),
    "midtrain-2x8gpu-configured": ("midtrain", _k8s.TrainPlacement(nodes=2, gpus_per_node=8, trainjob=CONFIGURED)),
}
RUN_ID_PLACEHOLDER = "{{$.pipeline_job_uuid}}"


@dataclass
class Compiled:
    """One compiled pipeline: the YAML text, the two parsed documents, and its tasks by name."""

    text: str
    spec: dict[str, Any]
    platform: dict[str, Any]
    tasks: dict[str, dict[str, Any]]

    def component(self, task: str) -> str:
        """The component a task runs (``train-refine`` for tasks ``train-refine`` and ``train-refine-2``)."""
        return re.sub(r"-\d+$", "", self.tasks[task]["componentRef"]["name"].removeprefix("comp-"))

    def executor(self, task: str) -> str:
        return self.spec["components"][self.tasks[task]["componentRef"]["name"]]["executorLabel"]

    def container(self, task: str) -> dict[str, Any]:
        return self.spec["deploymentSpec"]["executors"][self.executor(task)]["container"]

    def k8s(self, task: str) -> dict[str, Any]:
        return self.platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][self.executor(task)]

    def of(self, component: str) -> list[str]:
        return sorted(name for name in self.tasks if self.component(name) == component)


def _all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of the pipeline, including those inside exit handlers and conditions (their DAG components)."""
    tasks: dict[str, dict[str, Any]] = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            if "executorLabel" in spec["components"][task["componentRef"]["name"]]:
                assert name not in tasks, f"duplicate task name {name}"
                tasks[name] = task
    return tasks


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Compiled]]:
    out = tmp_path_factory.mktemp("ir")
    result = {}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_SECRETS.items():
            mp.setenv(key, value)
        builds = {name: (name, None) for name in PIPELINES} | DISTRIBUTED
        for name, (pipeline, placement) in builds.items():
            path = out / f"{name}.yaml"
            compiler.Compiler().compile(load_pipeline(pipeline, placement), str(path))
            text = path.read_text()
            spec, platform = yaml.safe_load_all(text)
            # Both documents are valid protos (unknown or misspelt fields would raise).
            json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
            for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
                json_format.ParseDict(executor, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
            load_component_from_file(str(path))  # and kfp reloads it
            result[name] = Compiled(text, spec, platform, _all_tasks(spec))
    yield result


def test_every_pipeline_compiles_deterministically(compiled: dict[str, Compiled], tmp_path: Path) -> None:
    assert set(compiled) == {"full", "midtrain", "posttrain", "eval", "pretrain", *DISTRIBUTED}
    assert not any(c.of(LAUNCHER) for name, c in compiled.items() if name in PIPELINES)  # one GPU: no launcher
    again = tmp_path / "full.yaml"
    compiler.Compiler().compile(load_pipeline("full"), str(again))
    assert again.read_text() == compiled["full"].text


def test_no_credentials_in_the_compiled_yaml(compiled: dict[str, Compiled]) -> None:
    for name, c in compiled.items():
        for value in FAKE_SECRETS.values():
            assert value not in c.text, f"{name}: a credential from the environment leaked into the IR"
        assert not re.search(r"(password|secret_access_key|access_key_id|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}",
                             c.text, re.IGNORECASE), name
        params = c.spec["root"]["inputDefinitions"]["parameters"]
        assert not [p for p in params if re.search(r"secret|password|token|key", p, re.IGNORECASE)], name


def test_gpu_stages_resources_shm_secrets_retries_timeouts(compiled: dict[str, Compiled]) -> None:
    seen = set()
    for c in compiled.values():
        for task in c.tasks:
            component = c.component(task)
            if component not in GPU_COMPONENTS:
                continue
            seen.add(component)
            resources = c.container(task)["resources"]
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
            assert resources["resourceMemoryLimit"] and resources["resourceCpuLimit"]
            k8s = c.k8s(task)
            assert {"volumeName": "shm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"} in \
                k8s["emptyDirMounts"]
            assert any(m["mountPath"] == "/tmp" for m in k8s["emptyDirMounts"])
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
            s3 = [s for s in k8s["secretAsEnv"] if s["secretName"] == _k8s.S3_SECRET]
            assert s3 and not s3[0]["optional"]
            assert {e["envVar"] for e in s3[0]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert int(k8s["activeDeadlineSeconds"]) >= 24 * 3600
            assert c.tasks[task]["retryPolicy"]["maxRetryCount"] == 2
            assert c.container(task)["image"] == _image.REFINE_GPU_IMAGE
    assert seen == GPU_COMPONENTS


def test_every_task_gets_tracking_uri_from_the_config_map_and_credentials_only_from_secrets(
    compiled: dict[str, Compiled],
) -> None:
    for c in compiled.values():
        for task in c.tasks:
            if task.startswith("importer"):
                continue
            k8s = c.k8s(task)
            required = [m for m in k8s["configMapAsEnv"] if not m["optional"]]
            assert required[0]["configMapName"] == _k8s.CONFIG_MAP
            assert required[0]["keyToEnv"] == [{"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"}]
            secret_env = {e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
            assert "MLFLOW_TRACKING_PASSWORD" in secret_env
            container_env = {e["name"] for e in c.container(task).get("env", [])}
            assert not container_env & {*FAKE_SECRETS, "MLFLOW_TRACKING_URI"}, (task, container_env)
            assert "activeDeadlineSeconds" in k8s and "retryPolicy" in c.tasks[task]
            if c.component(task) not in GPU_COMPONENTS:  # the launcher too: its GPUs are the TrainJob's
                assert "accelerator" not in c.container(task).get("resources", {}), task
                assert c.container(task)["image"] == _image.REFINE_CPU_IMAGE


def test_caching_only_for_data_preparation_and_run_ids_on_mlflow_tasks(compiled: dict[str, Compiled]) -> None:
    for c in compiled.values():
        for task, spec in c.tasks.items():
            component = c.component(task)
            cached = spec.get("cachingOptions", {}).get("enableCache", False)
            # The importer only records an artifact URI: its inputs determine it, so it may stay cached.
            assert cached == (component in ("prepare-data", "importer")), task
            params = spec["inputs"]["parameters"]
            if component in MLFLOW_COMPONENTS:
                assert params["kfp_run_id"]["runtimeValue"]["constant"] == RUN_ID_PLACEHOLDER, task
            if component in MLFLOW_COMPONENTS - {"start-run", "finish-run"}:
                assert params["kfp_task"]["runtimeValue"]["constant"] == "{{$.pipeline_task_name}}", task
                # start-run's output, directly or (inside a condition) through the condition's input channel
                assert params["parent_run_id"] in (
                    {"taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "start-run"}},
                    {"componentInputParameter": "pipelinechannel--start-run-Output"},
                ), task
            if component == "prepare-data":
                assert set(params) == {"config_yaml"}, "no run id: it would defeat the cache"


def _artifact_from(spec: dict[str, Any], name: str, c: Compiled | None = None) -> tuple[str, str]:
    """``(producer task, output key)`` of an input artifact; inside a condition it arrives through the condition's
    input channel ``pipelinechannel--<task>-<key>``, resolved against the task names of ``c``."""
    source = spec["inputs"]["artifacts"][name]
    if "taskOutputArtifact" in source:
        return source["taskOutputArtifact"]["producerTask"], source["taskOutputArtifact"]["outputArtifactKey"]
    channel = source["componentInputArtifact"].removeprefix("pipelinechannel--")
    assert c is not None, channel
    [producer] = [t for t in c.tasks if channel.startswith(f"{t}-") and "-" not in channel[len(t) + 1:]]
    return producer, channel[len(producer) + 1:]


@pytest.mark.parametrize(("build", "mid_component"), [("full", "train-refine"), ("full-2x8gpu", LAUNCHER)])
def test_full_pipeline_wiring(compiled: dict[str, Compiled], build: str, mid_component: str) -> None:
    c = compiled[build]
    mids = c.of(mid_component)
    assert len(mids) == 2 and len(c.of("post-train")) == 2 and len(c.of("ttt-evaluate")) == 2
    arm_of = {t: "ntp-baseline" if c.tasks[t]["inputs"]["parameters"]["baseline"]["runtimeValue"]["constant"]
              else "refine" for t in mids}
    assert sorted(arm_of.values()) == ["ntp-baseline", "refine"]
    chain: dict[str, dict[str, str]] = {arm: {"mid": t} for t, arm in arm_of.items()}
    for mid, arm in arm_of.items():
        assert _artifact_from(c.tasks[mid], "data") == ("prepare-data", "dataset")
        [post] = [t for t in c.of("post-train") if _artifact_from(c.tasks[t], "base_model") == (mid, "model")]
        [evaluation] = [t for t in c.of("ttt-evaluate") if _artifact_from(c.tasks[t], "model") == (post, "model")]
        chain[arm].update(post=post, eval=evaluation)
    compare = c.tasks["compare-report"]
    assert _artifact_from(compare, "baseline_results") == (chain["ntp-baseline"]["eval"], "results")
    assert _artifact_from(compare, "refine_results") == (chain["refine"]["eval"], "results")
    assert _artifact_from(compare, "baseline_model") == (chain["ntp-baseline"]["mid"], "model")
    assert _artifact_from(compare, "refine_model") == (chain["refine"]["mid"], "model")
    register = c.tasks["register-model"]
    assert _artifact_from(register, "model") == (chain["refine"]["post"], "model")
    assert _artifact_from(register, "results") == (chain["refine"]["eval"], "results")
    assert register["inputs"]["parameters"]["model_name"]["componentInputParameter"] == "pipelinechannel--model_name"
    # The exit task closes the parent run whatever happens; everything else runs inside the handler.
    finish = c.spec["root"]["dag"]["tasks"]["finish-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert set(c.spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finish-run"}
    assert set(c.spec["root"]["inputDefinitions"]["parameters"]) == {"config_yaml", "model_name"}


def test_phase_pipelines_wiring(compiled: dict[str, Compiled]) -> None:
    mid = compiled["midtrain"]
    assert len(mid.of("train-refine")) == 2 and mid.of("prepare-data") == ["prepare-data"]
    for t in mid.of("train-refine"):
        assert _artifact_from(mid.tasks[t], "data", mid) == ("prepare-data", "dataset")
    pre = compiled["pretrain"]
    assert _artifact_from(pre.tasks["train-ntp"], "data") == ("prepare-data", "dataset")
    for name, component, artifact in (("posttrain", "post-train", "base_model"), ("eval", "ttt-evaluate", "model")):
        c = compiled[name]
        tasks = c.of(component)
        assert len(tasks) == 2, "one from an imported model_uri, one from the config's model.source"
        fed = [t for t in tasks if artifact in c.tasks[t]["inputs"].get("artifacts", {})]
        assert len(fed) == 1 and _artifact_from(c.tasks[fed[0]], artifact, c) == ("importer", "artifact")
        importer = c.spec["deploymentSpec"]["executors"][c.spec["components"]["comp-importer"]["executorLabel"]]
        assert importer["importer"]["typeSchema"]["schemaTitle"] == "system.Model"
        assert set(c.spec["root"]["inputDefinitions"]["parameters"]) == {"config_yaml", "model_uri"}


def test_image_references_come_from_one_place_and_follow_the_environment() -> None:
    code = "from components import _image as i; print(i.REFINE_CPU_IMAGE, i.REFINE_GPU_IMAGE)"
    env = {**os.environ, "REFINE_IMAGE_TAG": "9.9.9", "REFINE_IMAGE_REGISTRY": "registry.example/ml"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["registry.example/ml/refine-cpu:9.9.9", "registry.example/ml/refine-gpu:9.9.9"]
    for path in (REPO / "components").glob("*.py"):
        if path.name != "_image.py":
            assert "base_image=REFINE_" in path.read_text() or path.name == "__init__.py", path
            assert not re.search(r"base_image=['\"]", path.read_text()), path


def launcher_constants(c: Compiled, task: str) -> dict[str, Any]:
    params = c.tasks[task]["inputs"]["parameters"]
    return {k: v["runtimeValue"]["constant"] for k, v in params.items() if "runtimeValue" in v}


def test_multi_gpu_training_goes_through_the_trainjob_launcher(compiled: dict[str, Compiled]) -> None:
    for name, (pipeline, placement) in DISTRIBUTED.items():
        c = compiled[name]
        stage = "train-ntp" if pipeline == "pretrain" else "train-refine"
        assert not c.of(stage), f"{name}: {stage} should run as a TrainJob"
        launchers = c.of(LAUNCHER)
        assert len(launchers) == (1 if pipeline == "pretrain" else 2), name
        per_node = _k8s.per_node(_k8s.MIDTRAIN, placement.gpus_per_node)
        for task in launchers:
            params = c.tasks[task]["inputs"]["parameters"]
            constant = launcher_constants(c, task)
            assert constant["stage"] == stage
            assert (constant["num_nodes"], constant["procs_per_node"]) == (placement.nodes, placement.gpus_per_node)
            assert constant["timeout_s"] == per_node.timeout_s
            assert constant["resume"] is True  # a retried task resumes from its trainers' last checkpoint
            assert "staging_uri" not in params, "the staging location comes from the ConfigMap, not the IR"
            assert _artifact_from(c.tasks[task], "data", c) == ("prepare-data", "dataset")
            # The launcher's own pod is small and has no GPU; each node's resources are a parameter of the task.
            resources = c.container(task)["resources"]
            launcher = placement.trainjob.launcher
            assert "accelerator" not in resources
            assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == (launcher.cpu,
                                                                                               launcher.memory)
            gpus = str(placement.gpus_per_node)
            if placement.trainjob.node.cpu is None:  # sized from the GPUs
                assert constant["node_resources"] == {
                    section: {"cpu": per_node.cpu, "memory": per_node.memory, "nvidia.com/gpu": gpus}
                    for section in ("requests", "limits")}
            passthrough = c.spec["components"][c.tasks[task]["componentRef"]["name"]]["taskConfigPassthroughs"]
            applied = {p["field"]: p.get("applyToTask", False) for p in passthrough}
            assert applied == {"RESOURCES": True, "KUBERNETES_TOLERATIONS": False, "KUBERNETES_NODE_SELECTOR": False,
                               "KUBERNETES_VOLUMES": True, "ENV": True}
            k8s = c.k8s(task)
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
            assert {m["mountPath"] for m in k8s["emptyDirMounts"]} == {"/dev/shm", "/tmp"}
            assert _k8s.S3_SECRET in {s["secretName"] for s in k8s["secretAsEnv"]}
            optional = [m for m in k8s["configMapAsEnv"] if m["optional"]][0]
            assert {"configMapKey": "REFINE_STAGING_URI", "envVar": "REFINE_STAGING_URI"} in optional["keyToEnv"]
            assert int(k8s["activeDeadlineSeconds"]) == per_node.timeout_s + 3600  # room to stage and copy back
            assert c.tasks[task]["retryPolicy"]["maxRetryCount"] == per_node.retries
            assert c.tasks[task]["cachingOptions"].get("enableCache", False) is False
        if pipeline == "full":  # only mid-training is data-parallel; the later stages stay one-GPU pods
            for task in c.of("post-train") + c.of("ttt-evaluate"):
                assert c.container(task)["resources"]["accelerator"]["resourceCount"] == "1"


def test_a_2x8_gpu_build_carries_the_configured_resources_checkpoint_root_and_resume_flag(
    compiled: dict[str, Compiled],
) -> None:
    """The compiled YAML of a 2-node x 8-GPU mid-training build with a config's trainjob section: what each
    TrainJob will get (nodes, processes, resourcesPerNode), where its checkpoints go and that it resumes."""
    c = compiled["midtrain-2x8gpu-configured"]
    for task in c.of(LAUNCHER):
        constant = launcher_constants(c, task)
        assert (constant["num_nodes"], constant["procs_per_node"]) == (2, 8)
        assert constant["node_resources"] == {
            "requests": {"cpu": "90", "memory": "700Gi", "nvidia.com/gpu": "8"},
            "limits": {"cpu": "90", "memory": "720Gi", "nvidia.com/gpu": "8"},
        }
        assert constant["checkpoint_root"] == "s3://refine-ckpt/midtrain" and constant["resume"] is True
        assert constant["keep_staged"] is True
        resources = c.container(task)["resources"]
        assert {k: resources[k] for k in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest",
                                          "resourceMemoryLimit")} == {
            "resourceCpuRequest": "500m", "resourceCpuLimit": "500m", "resourceMemoryRequest": "2Gi",
            "resourceMemoryLimit": "2Gi"}
    # The default build: checkpoints under the staging prefix, staged data deleted.
    for task in compiled["full-2x8gpu"].of(LAUNCHER):
        constant = launcher_constants(compiled["full-2x8gpu"], task)
        assert constant["checkpoint_root"] == "" and constant["keep_staged"] is False and constant["resume"] is True
    text = c.text
    for value in FAKE_SECRETS.values():
        assert value not in text


def test_a_pipeline_without_a_data_parallel_stage_refuses_a_multi_gpu_placement() -> None:
    with pytest.raises(ValueError, match="no data-parallel training stage"):
        load_pipeline("eval", _k8s.TrainPlacement(nodes=1, gpus_per_node=2))
    with pytest.raises(ValueError, match="must both be >= 1"):
        _k8s.TrainPlacement(nodes=0)
    assert load_pipeline("eval", _k8s.TrainPlacement()) is load_pipeline("eval")
