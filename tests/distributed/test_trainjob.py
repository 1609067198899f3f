"""The TrainJob launcher: the object it builds, and create / watch / stream logs / delete against a loopback fake API.

The fake (``fake_k8s.py``) listens on 127.0.0.1 with an ephemeral port and stops by itself; the launcher talks to
it through the real ``kubernetes`` client, so the requests, JSON and chunked log streams are the real ones.
"""

from __future__ import annotations

import textwrap
import threading
import time

import kubernetes
import pytest
from kfp import dsl
from kubeflow_trainer_api import models

from refine_core.distributed import trainjob as tj
from tests.distributed.fake_k8s import FakeKubernetes, Scenario, Tick

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
    mounted = spec(shm_size="8Gi", volumes=[{"name": "s", "emptyDir": {"medium": "Memory"}}],
                   volume_mounts=[{"name": "s", "mountPath": "/dev/shm"}])
    assert [v["name"] for v in node_pod_spec(tj.build_trainjob(mounted))["volumes"]] == ["s"]


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


def test_the_component_launches_through_a_kubeconfig_with_a_local_task_config(tmp_path, monkeypatch, capsys):
    from components.launch_trainjob import launch_trainjob

    scenario = Scenario(ticks=[Tick(pods="Running"), Tick(pods="Succeeded", condition=("Complete", "Done", ""))])
    with FakeKubernetes(scenario) as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(textwrap.dedent(f"""\
            apiVersion: v1
            kind: Config
            clusters: [{{name: fake, cluster: {{server: "{fake.host}"}}}}]
            users: [{{name: fake, user: {{token: not-a-secret}}}}]
            contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: refine}}}}]
            current-context: fake
        """))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        name = launch_trainjob.python_func(
            stage="train-ntp", config_yaml="ntp:\n  steps: 2\n", task_config=dsl.TaskConfig(), num_nodes=1,
            namespace="refine", job_name="refine-component", poll_s=0.05, timeout_s=10,
        )
    assert name == "refine-component"
    (created,) = fake.created
    assert created["spec"]["trainer"]["numNodes"] == 1
    assert created["spec"]["trainer"]["image"].rsplit("/", 1)[-1].startswith("refine-gpu:")
    assert "[refine-component-node-0-0-abcde] done" in capsys.readouterr().out
