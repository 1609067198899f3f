"""The TrainJob launcher: the object it builds, and create / watch / stream logs / delete against a loopback fake API.

The fake (``fake_k8s.py``) listens on 127.0.0.1 with an ephemeral port and stops by itself; the launcher talks to
it through the real ``kubernetes`` client, so the requests, JSON and chunked log streams are the real ones. The
scripted fake plays a job's life from a :class:`Scenario`; the executing one runs the job's trainer command here,
one process per node, so the last tests end in real ``torchrun`` ranks on CPU (gloo on loopback).
"""

from __future__ import annotations

import re
import textwrap
import threading
import time
from pathlib import Path

import kubernetes
import pytest
import torch
import yaml
from kfp import dsl
from kubeflow_trainer_api import models
from safetensors.torch import load_file

from refine_core.config import ConfigError, load_config, parse_quantity
from refine_core.distributed import trainjob as tj
from refine_core.stages.prepare_data import prepare_data
from tests.distributed.fake_k8s import ExecutingKubernetes, FakeKubernetes, Scenario, Tick

TASK_CONFIG = dsl.TaskConfig(
    resources={"limits": {"nvidia.com/gpu": "8", "cpu": "32", "memory": "512Gi"}, "requests": {"cpu": 16.0}},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    volumes=[{"name": "workspace", "persistentVolumeClaim": {"claimName": "refine-workspace"}}],
    volume_mounts=[{"name": "workspace", "mountPath": "/workspace"}],
    env=[
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.refine.svc:5000"},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "refine-s3", "key": "secret"}}},
    ],
)


def spec(**overrides) -> tj.TrainJobSpec:
    fields = {"stage": "train-refine", "image": "ghcr.io/refine-core/refine-gpu:0.1.0", "config": "/workspace/run.yaml",
              "namespace": "refine", "num_nodes": 2, **overrides}
    return tj.TrainJobSpec(**fields)


def node_pod_spec(body: dict) -> dict:
    patch = body["spec"]["runtimePatches"][0]
    assert patch["manager"] == tj.PATCH_MANAGER
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    return job["template"]["spec"]["template"]["spec"]


def test_the_built_trainjob_validates_and_carries_the_task_config():
    body = tj.build_trainjob(spec(overrides=["refine.steps=100"]).with_task_config(TASK_CONFIG))
    job = tj.validate_trainjob(body)
    assert isinstance(job, models.TrainerV1alpha1TrainJob)
    assert job.to_dict() == body  # nothing dropped by the models
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                          "name": "refine-torch"}
    trainer = body["spec"]["trainer"]
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"] == ["-m", "refine_core", "train-refine", "--config", "/workspace/run.yaml",
                               "refine.steps=100"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8  # one process per GPU
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8", "cpu": "32", "memory": "512Gi"},
                                           "requests": {"cpu": "16"}}
    assert trainer["env"] == TASK_CONFIG.env  # the secret stays a secretKeyRef
    pod = node_pod_spec(body)
    assert pod["tolerations"] == TASK_CONFIG.tolerations
    assert pod["nodeSelector"] == TASK_CONFIG.node_selector
    assert pod["volumes"] == TASK_CONFIG.volumes
    assert pod["containers"] == [{"name": "node", "volumeMounts": TASK_CONFIG.volume_mounts}]
    # The typed model sees the same values.
    assert job.spec.trainer.resources_per_node.limits["nvidia.com/gpu"].actual_instance == "8"
    node = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0]
    assert node.template.spec.template.spec.volumes[0].persistent_volume_claim.claim_name == "refine-workspace"
    assert node.template.spec.template.spec.tolerations[0].key == "nvidia.com/gpu"


def test_a_local_task_config_with_every_field_none_builds_a_plain_job():
    body = tj.build_trainjob(spec(config=None, config_yaml="refine:\n  steps: 3\n").with_task_config(dsl.TaskConfig()))
    tj.validate_trainjob(body)
    trainer = body["spec"]["trainer"]
    assert "resourcesPerNode" not in trainer and trainer["numProcPerNode"] == 1
    assert "runtimePatches" not in body["spec"]
    # The config text travels in the environment and is written before torchrun starts.
    assert trainer["command"][:2] == ["sh", "-c"] and "exec torchrun -m refine_core" in trainer["command"][2]
    assert trainer["args"] == ["refine-trainjob", "train-refine", "--config", tj.CONFIG_IN_POD]
    assert trainer["env"] == [{"name": tj.CONFIG_ENV, "value": "refine:\n  steps: 3\n"}]


def test_struct_floats_from_kfp_become_the_integers_the_api_wants():
    # KFP passes the TaskConfig through a protobuf Struct: every number arrives as a float.
    task_config = dsl.TaskConfig(
        resources={"limits": {"nvidia.com/gpu": 4.0}},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300.0}],
        volumes=[{"name": "cfg", "configMap": {"name": "refine-config", "defaultMode": 420.0}}],
        volume_mounts=[{"name": "cfg", "mountPath": "/etc/refine"}],
    )
    body = tj.build_trainjob(spec().with_task_config(task_config))
    tj.validate_trainjob(body)
    assert body["spec"]["trainer"]["numProcPerNode"] == 4
    assert body["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "4"}}
    pod = node_pod_spec(body)
    assert pod["tolerations"][0]["tolerationSeconds"] == 300 and pod["volumes"][0]["configMap"]["defaultMode"] == 420


def test_shm_is_added_only_when_asked_and_not_mounted():
    body = tj.build_trainjob(spec(runtime="torch-distributed", shm_size="8Gi"))
    pod = node_pod_spec(body)
    assert pod["volumes"] == [{"name": "refine-dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    mounted = spec(runtime="torch-distributed", shm_size="8Gi",
                   volumes=[{"name": "s", "emptyDir": {"medium": "Memory"}}],
                   volume_mounts=[{"name": "s", "mountPath": "/dev/shm"}])
    assert [v["name"] for v in node_pod_spec(tj.build_trainjob(mounted))["volumes"]] == ["s"]


def test_scratch_volumes_at_paths_the_refine_runtime_mounts_stay_with_the_launcher():
    # What pipelines/_k8s.py gives a task: /dev/shm and /tmp emptyDirs, plus a real workspace volume.
    task = dict(volumes=[{"name": "shm", "emptyDir": {"medium": "Memory"}}, {"name": "tmp", "emptyDir": {}},
                         {"name": "workspace", "persistentVolumeClaim": {"claimName": "w"}}],
                volume_mounts=[{"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                               {"name": "workspace", "mountPath": "/workspace"}])
    pod = node_pod_spec(tj.build_trainjob(spec(**task)))  # refine-torch mounts /dev/shm and /tmp itself
    assert pod["volumes"] == [task["volumes"][2]] and pod["containers"][0]["volumeMounts"] == [task["volume_mounts"][2]]
    other = node_pod_spec(tj.build_trainjob(spec(runtime="torch-distributed", **task)))
    assert other["volumes"] == task["volumes"]


def test_with_env_adds_plain_values_and_replaces_same_names():
    base = spec(env=[{"name": "A", "value": "1"}, {"name": "MLFLOW_RUN_ID", "value": "old"}])
    env = base.with_env({"MLFLOW_RUN_ID": "abc"}).env
    assert env == [{"name": "A", "value": "1"}, {"name": "MLFLOW_RUN_ID", "value": "abc"}]
    assert base.env[1]["value"] == "old"


def test_bad_objects_are_refused_before_anything_is_created():
    body = tj.build_trainjob(spec())
    stale = {**body, "spec": {**body["spec"], "podSpecOverrides": [{"targetJobs": [{"name": "node"}]}]}}
    with pytest.raises(ValueError, match="round-trip"):
        tj.validate_trainjob(stale)  # KFP 2.17's TaskConfig docstring still shows this removed field
    wrong = {**body, "spec": {**body["spec"], "trainer": {**body["spec"]["trainer"], "numNodes": "two"}}}
    with pytest.raises(ValueError, match="does not validate"):
        tj.validate_trainjob(wrong)
    with pytest.raises(ValueError, match="DNS-1035"):
        tj.build_trainjob(spec(name="Refine_Job"))
    with pytest.raises(ValueError, match="exactly one"):
        tj.build_trainjob(spec(config_yaml="a: 1"))


@pytest.mark.parametrize("text", ["8", "0.5", ".5", "500m", "1k", "64Gi", "512Mi", "1.5G", "100", "3Ti", "2E"])
def test_quantities_parse_as_kubernetes_parses_them(text):
    from kubernetes.utils import parse_quantity as reference  # the client library's own parser (a Decimal)

    assert parse_quantity(text, "x") == pytest.approx(float(reference(text)), rel=1e-12)


@pytest.mark.parametrize("text", ["", "8 cores", "-1", "1e3", "64GB", "Gi", "0x10", "1.2.3"])
def test_what_is_not_a_quantity_is_refused_with_the_forms_that_are(text):
    with pytest.raises(ConfigError, match=r"trainjob\.node\.memory=.*is not a Kubernetes quantity.*'64Gi'"):
        parse_quantity(text, "trainjob.node.memory")


def test_the_trainjob_section_validates_pod_resources_and_renders_them():
    cfg = load_config(None, ["trainjob.node={cpu: '96', memory: 768Gi, memory_limit: 800Gi}",
                             "trainjob.launcher.cpu=500m"])
    assert cfg.trainjob.node.as_kubernetes() == {"requests": {"cpu": "96", "memory": "768Gi"},
                                                 "limits": {"cpu": "96", "memory": "800Gi"}}
    assert cfg.trainjob.launcher.as_kubernetes() == {"requests": {"cpu": "500m", "memory": "4Gi"},
                                                     "limits": {"cpu": "500m", "memory": "4Gi"}}
    assert load_config(None, []).trainjob.node.as_kubernetes() == {}  # sized from the GPUs by the pipeline
    for override, message in (
        ("trainjob.node={memory: 64Gi, memory_limit: 32Gi}", r"memory_limit='32Gi' is below the request"),
        ("trainjob.launcher.cpu=0", r"trainjob\.launcher\.cpu='0' must be > 0"),
        ("trainjob.node.cpu=lots", r"trainjob\.node\.cpu='lots' is not a Kubernetes quantity"),
        ("trainjob.node.cpu_limit=4", r"cpu_limit is set without trainjob\.node\.cpu"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_node_resources_are_checked_before_the_trainjob_is_built():
    good = {"requests": {"cpu": "96", "memory": "768Gi", "nvidia.com/gpu": "8"},
            "limits": {"cpu": 96.0, "memory": "768Gi", "nvidia.com/gpu": 8.0}}
    body = tj.build_trainjob(spec(resources=good))
    assert body["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"cpu": "96", "memory": "768Gi",
                                                                      "nvidia.com/gpu": "8"}
    assert body["spec"]["trainer"]["numProcPerNode"] == 8
    for resources, message in (
        ({"limits": {"nvidia.com/gpu": "1.5"}}, r"nvidia\.com/gpu='1\.5' must be a whole number of GPUs"),
        ({"requests": {"memory": "64 GB"}}, r"requests\.memory='64 GB' is not a Kubernetes quantity"),
        ({"requests": {"cpu": "8"}, "limits": {"cpu": "4"}}, r"limits\.cpu is below .*requests\.cpu"),
        ({"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "8"}}, "cannot be overcommitted"),
        ({"limit": {"cpu": "8"}}, "unknown section"),
    ):
        with pytest.raises(ValueError, match=message):
            tj.build_trainjob(spec(resources=resources))


def api_client(fake: FakeKubernetes) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    configuration.host = fake.host
    return kubernetes.client.ApiClient(configuration)


class Sink:
    """Collects log lines and whether the fake job had finished when each arrived."""

    def __init__(self, fake: FakeKubernetes | None = None) -> None:
        self.fake = fake
        self.lines: list[str] = []
        self.while_running: list[bool] = []
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)
            if self.fake is not None:
                self.while_running.append(self.fake.current().condition is None)


def test_a_job_that_runs_then_completes_is_watched_and_its_logs_streamed():
    scenario = Scenario(ticks=[
        Tick(pods=None), Tick(pods="Pending"), *[Tick(pods="Running")] * 8,
        Tick(pods="Succeeded", condition=("Complete", "JobSetCompleted", "jobset completed")),
    ])
    with FakeKubernetes(scenario) as fake:
        sink = Sink(fake)
        status = tj.launch_trainjob(spec(name="refine-ok").with_task_config(TASK_CONFIG), api_client(fake),
                                    timeout_s=10, poll_s=0.05, log_sink=sink)
    assert status.phase == "Complete" and status.reason == "JobSetCompleted"
    assert status.phases_seen == ["Created", "Running", "Complete"]
    assert not status.deleted and fake.deleted == []
    pods = [f"refine-ok-node-0-{i}-abcde" for i in range(2)]
    assert sorted(status.pods) == pods
    for pod in pods:  # every line of every node, in order per pod
        assert [line for line in sink.lines if line.startswith(f"[{pod}] ")] == [
            f"[{pod}] {line}" for line in scenario.logs
        ]
    assert all(sink.while_running)  # streamed while the job ran, not read back at the end
    (created,) = fake.created
    assert created == tj.build_trainjob(spec(name="refine-ok").with_task_config(TASK_CONFIG))
    tj.validate_trainjob(created)
    assert ("DELETE", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/refine/trainjobs/refine-ok") not in fake.requests


def test_a_failed_job_is_deleted_and_the_error_names_the_reason():
    scenario = Scenario(ticks=[
        Tick(pods="Running"), Tick(pods="Running"),
        Tick(pods="Failed", condition=("Failed", "FailedJobs", "jobset failed: node-0 exited with code 1")),
    ])
    sink = Sink()
    with FakeKubernetes(scenario) as fake, pytest.raises(tj.TrainJobFailed, match="FailedJobs: jobset failed") as err:
        tj.launch_trainjob(spec(name="refine-bad"), api_client(fake), timeout_s=10, poll_s=0.05, log_sink=sink)
    assert fake.deleted == ["refine-bad"] and err.value.status.deleted
    assert err.value.status.phases_seen == ["Running", "Failed"]
    assert any(line.endswith("] done") for line in sink.lines)  # the logs up to the failure were streamed


def test_a_job_that_never_finishes_is_deleted_at_the_timeout():
    sink = Sink()
    with FakeKubernetes(Scenario(ticks=[Tick(pods="Pending"), Tick(pods="Running")])) as fake:
        start = time.monotonic()
        with pytest.raises(tj.TrainJobTimeout, match="did not complete within") as err:
            tj.launch_trainjob(spec(name="refine-slow"), api_client(fake), timeout_s=0.5, poll_s=0.05, log_sink=sink)
        took = time.monotonic() - start
    assert fake.deleted == ["refine-slow"] and err.value.status.deleted
    assert err.value.status.phase == "Running"
    assert took < 5  # the log streams end when the job is deleted; nothing waits for the grace period


def test_an_interrupted_wait_deletes_the_job(monkeypatch):
    class Interrupted:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM turned into SystemExit) does mid-wait

    monkeypatch.setattr(tj, "time", Interrupted)
    with FakeKubernetes(Scenario(ticks=[Tick(pods="Running")])) as fake, pytest.raises(KeyboardInterrupt):
        tj.launch_trainjob(spec(name="refine-int"), api_client(fake), timeout_s=10, poll_s=0.05, log_sink=Sink())
    assert fake.deleted == ["refine-int"]


def test_a_name_that_exists_is_refused():
    scenario = Scenario(ticks=[Tick(pods="Running", condition=("Complete", "JobSetCompleted", ""))])
    with FakeKubernetes(scenario) as fake:
        tj.launch_trainjob(spec(name="refine-dup"), api_client(fake), timeout_s=5, poll_s=0.05, log_sink=Sink())
        with pytest.raises(tj.TrainJobError, match="409"):
            tj.launch_trainjob(spec(name="refine-dup"), api_client(fake), timeout_s=5, poll_s=0.05, log_sink=Sink())


# -- the TrainJob executed here: the launcher's command under real torchrun, one process per emulated node --------

# The tiny CPU run of tests/distributed/test_torchrun.py, as the YAML a pipeline hands the launcher.
TINY_NTP = textwrap.dedent("""\
    device: cpu
    model:
      config: {hidden_size: 32, num_hidden_layers: 1, num_heads: 2}
    data:
      sources: [{path: synthetic, synthetic_docs: 40, synthetic_words: 60}]
      min_tokens: 96
      max_tokens: 128
      eval_docs: 4
""")
# Each node is a torchrun of one process: keep its BLAS threads from fighting over the test machine's cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Prepared shards of TINY_NTP's synthetic corpus: train-ntp reads prepared data, it does not prepare it."""
    root = tmp_path_factory.mktemp("prep")
    prepare_data(load_config(None, [f"output_dir={root}", "device=cpu",
                                    "data.sources=[{path: synthetic, synthetic_docs: 40, synthetic_words: 60}]",
                                    "data.min_tokens=96", "data.max_tokens=128", "data.eval_docs=4"]))
    return root / "data"


def pod_lines(lines: list[str], pod: str) -> list[str]:
    """The lines the launcher streamed from ``pod``, without their ``[pod] `` prefix."""
    return [line[len(pod) + 3:] for line in lines if line.startswith(f"[{pod}] ")]


@pytest.mark.slow
def test_a_trainjob_runs_under_real_torchrun_on_two_emulated_nodes(tmp_path, prepared):
    name = "refine-exec-ntp"
    trainjob = tj.TrainJobSpec(
        stage="train-ntp", image="refine-gpu:test", config_yaml=TINY_NTP, namespace="refine", name=name,
        num_nodes=2, procs_per_node=1,
        overrides=[f"data.prepared_dir={prepared}", "tracking.backend=none", "ntp.steps=2", "ntp.batch_size=4",
                   "ntp.micro_batch_size=2", "output_dir=/tmp/refine-run"],
        env=[{"name": "LOGLEVEL", "value": "INFO"},  # torchrun's agent logs its rendezvous: node 1 speaks too
             {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}}],
    )
    sandbox = tmp_path / "sandbox"
    lines: list[str] = []
    with ExecutingKubernetes(sandbox, extra_env=ONE_THREAD, shared=[prepared]) as fake:
        status = tj.launch_trainjob(trainjob, api_client(fake), timeout_s=120, poll_s=0.2, log_sink=lines.append)
    run = fake.runs[name]
    pods = [f"{name}-node-0-{i}-abcde" for i in range(2)]
    shown = "\n".join(lines[-60:])
    assert status.phase == "Complete" and status.reason == "JobSetCompleted", shown
    assert status.phases_seen[-1] == "Complete" and not status.deleted and fake.deleted == []
    assert run.exit_codes == [0, 0] and sorted(status.pods) == pods
    node0, node1 = (pod_lines(lines, pod) for pod in pods)
    assert node0 == run.output[pods[0]] and node1 == run.output[pods[1]]  # every line, in order, per pod

    # torchrun took the topology from the PET_* variables alone: 2 nodes x 1 process, static rendezvous.
    assert [node.env["PET_NODE_RANK"] for node in run.nodes] == ["0", "1"]
    assert {node.env["PET_MASTER_PORT"] for node in run.nodes} == {str(run.master_port)}
    assert any(re.search(r"rdzv_backend\s+: static", line) for line in node1)
    assert any("group_rank=1" in line for line in node1) and any("global_world_sizes=[2]" in line for line in node1)
    assert any("joined process group: rank 0/2" in line for line in node0)
    assert any(re.search(r"step 2/2 \| loss [\d.]+", line) for line in node0)
    assert run.skipped_env == ["AWS_SECRET_ACCESS_KEY"] and "AWS_SECRET_ACCESS_KEY" not in run.env

    # Each pod had its own /tmp: the shell wrote the config there and rank 0 (node 0) exported the final model.
    tmp0, tmp1 = (sandbox / name / f"node-{i}" / "tmp" for i in range(2))
    assert run.nodes[0].tmp == tmp0 and f"{tmp0}/refine-config.yaml" in run.nodes[0].argv
    assert f"data.prepared_dir={prepared}" in run.nodes[0].argv  # a shared volume is the same path everywhere
    assert yaml.safe_load((tmp0 / "refine-config.yaml").read_text()) == yaml.safe_load(TINY_NTP)
    assert (tmp0 / "refine-run" / "train-ntp" / "model" / "model.safetensors").is_file()
    assert (tmp0 / "refine-run" / "train-ntp" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert not (tmp1 / "refine-run" / "train-ntp" / "model").exists()  # rank 1 writes nothing


@pytest.mark.slow
def test_a_trainjob_whose_nodes_fail_raises_with_the_error_line_and_is_deleted(tmp_path):
    name = "refine-exec-bad"
    trainjob = tj.TrainJobSpec(stage="train-ntp", image="refine-gpu:test", config_yaml="device: cpu\n",
                               overrides=["ntp.no_such_key=1", "tracking.backend=none"], namespace="refine",
                               name=name, num_nodes=2, procs_per_node=1)
    lines: list[str] = []
    with ExecutingKubernetes(tmp_path / "sandbox", extra_env=ONE_THREAD) as fake:
        with pytest.raises(tj.TrainJobFailed) as err:
            tj.launch_trainjob(trainjob, api_client(fake), timeout_s=60, poll_s=0.2, log_sink=lines.append)
        run = fake.runs[name]
        assert run.wait(10), run.output  # the other node was killed, nothing is left running
    message = str(err.value)
    assert re.search(rf"FailedJobs: .*node [01] \(pod {name}-node-0-[01]-abcde\) exited with code 1", message)
    # The refine error of the rank (exit 2), not torchrun's own traceback (its exit 1) that follows it.
    assert "refine train-ntp: error: unknown config key(s) ntp.no_such_key" in message
    assert "ChildFailedError" not in message
    assert fake.deleted == [name] and err.value.status.deleted and err.value.status.phase == "Failed"
    assert all(code not in (0, None) for code in run.exit_codes)
    assert any("unknown config key(s) ntp.no_such_key" in line for line in lines)  # streamed as well


def test_the_executing_fake_gives_each_pod_its_topology_and_tmp_and_kills_a_deleted_job(tmp_path):
    # A hand-made TrainJob whose trainer reports what it sees, then sleeps: no torch, so this runs in a second.
    script = 'echo "node $PET_NODE_RANK/$PET_NNODES x $PET_NPROC_PER_NODE tmp=$TMPDIR" > /tmp/seen && cat /tmp/seen ' \
             '&& echo "$GREETING" && exec sleep 60'
    body = tj.build_trainjob(tj.TrainJobSpec(stage="train-ntp", image="x", config="/tmp/c.yaml", name="refine-sleep",
                                             num_nodes=2, procs_per_node=3,
                                             env=[{"name": "GREETING", "value": "hello from /tmp/x"}]))
    body["spec"]["trainer"].update(command=["sh", "-c", script], args=[])
    sandbox = tmp_path / "sandbox"
    with ExecutingKubernetes(sandbox, lifetime_s=30) as fake:
        client = api_client(fake)
        custom, core = kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)
        custom.create_namespaced_custom_object(tj.GROUP, tj.VERSION, "default", tj.PLURAL, body)
        run = fake.runs["refine-sleep"]
        deadline = time.monotonic() + 10
        while sum(len(node.lines) for node in run.nodes) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        pods = core.list_namespaced_pod("default", label_selector="jobset.sigs.k8s.io/jobset-name=refine-sleep")
        assert [pod.status.phase for pod in pods.items] == ["Running", "Running"]
        obj = custom.get_namespaced_custom_object(tj.GROUP, tj.VERSION, "default", tj.PLURAL, "refine-sleep")
        assert "status" not in obj  # neither Complete nor Failed while the nodes run
        log = core.read_namespaced_pod_log("refine-sleep-node-0-1-abcde", "default", container="node")
        tmp1 = sandbox / "refine-sleep" / "node-1" / "tmp"
        assert log == f"node 1/2 x 3 tmp={tmp1}\nhello from {sandbox}/refine-sleep/node-1/tmp/x\n"
        assert (tmp1 / "seen").is_file() and (sandbox / "refine-sleep" / "node-0" / "tmp" / "seen").is_file()
        assert tj.delete_trainjob(custom, "refine-sleep", "default")
        assert run.wait(fake.kill_grace_s + 2)
    assert run.exit_codes == [-15, -15]  # SIGTERM to each pod's process group reached the sleep
    assert run.failure is None  # deleting is not failing


@pytest.mark.slow
def test_fsdp_on_node_local_storage_checkpoints_to_s3_and_a_preempted_job_resumes(tmp_path, prepared, monkeypatch):
    """Two emulated nodes, each with a private ``/tmp`` as ``output_dir`` (node-local storage) and FSDP: each rank
    uploads its own DCP shards to S3 (moto's server), rank 0 the rest and the marker. The first job loses node 0
    right after its step-2 checkpoint is mirrored; a second job (the retry) starts with empty ``/tmp`` directories,
    downloads that checkpoint on each node, resumes at step 2, and ends with an uninterrupted job's weights."""
    from refine_core.training.checkpoint_mirror import S3CheckpointMirror
    from tests.integration.servers import SERVER_AWS_KEY_ID, SERVER_AWS_SECRET, start_moto

    (tmp_path / "moto").mkdir()
    with start_moto(tmp_path / "moto") as s3:
        aws = [{"name": "AWS_ENDPOINT_URL", "value": s3.url}, {"name": "AWS_ACCESS_KEY_ID", "value": SERVER_AWS_KEY_ID},
               {"name": "AWS_SECRET_ACCESS_KEY", "value": SERVER_AWS_SECRET},
               {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}]
        for entry in aws:  # this process reads the bucket too
            monkeypatch.setenv(entry["name"], entry["value"])

        def job(name: str, checkpoints: str) -> tj.TrainJobSpec:
            return tj.TrainJobSpec(
                stage="train-ntp", image="refine-gpu:test", config_yaml=TINY_NTP, namespace="refine", name=name,
                num_nodes=2, procs_per_node=1, env=aws,
                overrides=[f"data.prepared_dir={prepared}", "tracking.backend=none", "ntp.steps=4",
                           "ntp.save_every=2", "ntp.eval_every=0", "ntp.batch_size=4", "ntp.micro_batch_size=2",
                           "parallel=fsdp", "output_dir=/tmp/refine-run", f"checkpoint_uri={checkpoints}",
                           "ntp.resume=true"],
            )

        sandbox = tmp_path / "sandbox"
        runs: dict[str, list[str]] = {}
        preempt = re.compile(r"mirrored checkpoint step_00000002")
        with ExecutingKubernetes(sandbox, extra_env=ONE_THREAD, shared=[prepared], preempt_on=preempt) as fake:
            for name, checkpoints, fails in (("refine-fsdp-a", "s3://refine-mlflow/ckpt/job", True),
                                             ("refine-fsdp-b", "s3://refine-mlflow/ckpt/job", False),
                                             ("refine-fsdp-ref", "s3://refine-mlflow/ckpt/ref", False)):
                lines = runs.setdefault(name, [])
                if fails:
                    with pytest.raises(tj.TrainJobFailed, match="exited with code -9"):
                        tj.launch_trainjob(job(name, checkpoints), api_client(fake), timeout_s=180, poll_s=0.2,
                                           log_sink=lines.append)
                    # Both ranks' shards reached S3 although neither node sees the other's files.
                    keys = {o["Key"] for o in s3.client().list_objects_v2(
                        Bucket="refine-mlflow", Prefix="ckpt/job/train-ntp/step_00000002/")["Contents"]}
                    assert {"state/__0_0.distcp", "state/__1_0.distcp", "state/.metadata", "trainer_state.pt",
                            "COMPLETE"} <= {k.rsplit("step_00000002/", 1)[1] for k in keys}
                else:
                    status = tj.launch_trainjob(job(name, checkpoints), api_client(fake), timeout_s=180, poll_s=0.2,
                                                log_sink=lines.append)
                    assert status.phase == "Complete", "\n".join(lines[-40:])
                    # Node 0 holds only its own shards of step 4: that checkpoint is complete in S3 alone, and no
                    # partial copy was committed (or left) on either node.
                    for node in (0, 1):
                        local = sandbox / name / f"node-{node}" / "tmp" / "refine-run" / "train-ntp" / "checkpoints"
                        assert not any(local.glob("*step_00000004*")), sorted(local.iterdir())
                    assert S3CheckpointMirror(f"{checkpoints}/train-ntp").complete_steps() == [2, 4]
        assert fake.preempted == ["refine-fsdp-a-node-0-0-abcde"]
        retry = "\n".join(runs["refine-fsdp-b"])
        assert re.search(r"node-0-0-abcde\] .*resuming from mirrored checkpoint step 2 of "
                         r"s3://refine-mlflow/ckpt/job/train-ntp", retry), retry
        for node in (0, 1):  # each node fetched the checkpoint into its own empty /tmp (only rank 0 logs)
            local = sandbox / "refine-fsdp-b" / f"node-{node}" / "tmp" / "refine-run" / "train-ntp" / "checkpoints"
            assert (local / "step_00000002" / "COMPLETE").is_file()
            assert {p.name for p in (local / "step_00000002" / "state").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
        assert re.search(r"resumed train-ntp from \S+/step_00000002 at step 2", retry)
        assert "joined process group: rank 0/2" in retry and "step 4/4" in retry

    def exported(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(sandbox / name / "node-0" / "tmp" / "refine-run" / "train-ntp" / "model"
                             / "model.safetensors"))

    resumed, whole = exported("refine-fsdp-b"), exported("refine-fsdp-ref")
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key  # bitwise: the same 2 FSDP ranks on the CPU
