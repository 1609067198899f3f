"""A loopback stand-in for the Kubernetes API server: just what the TrainJob launcher calls.

Endpoints: create / get / delete ``trainjobs.trainer.kubeflow.org`` in a namespace, list pods by label selector,
and read (and follow) a pod's log. Followed logs are sent chunked, line by line, and the stream stays open until the
pod has terminated or the job is deleted, like the real API server.

The HTTP handler only speaks the protocol; what the world looks like comes from overridable methods of the fake
(:meth:`FakeKubernetes.on_created`, :meth:`~FakeKubernetes.trainjob_status`, :meth:`~FakeKubernetes.pods`,
:meth:`~FakeKubernetes.pod_phase`, :meth:`~FakeKubernetes.log_lines`, :meth:`~FakeKubernetes.on_deleted`). Two
worlds exist:

* :class:`FakeKubernetes` is scripted: a :class:`Scenario` drives the job, every GET of the TrainJob advances one
  tick, and each tick sets the trainer pods' phase and, at the end, a ``Complete`` or ``Failed`` condition.
* :class:`ExecutingKubernetes` runs the TrainJob on this machine: it plays the Trainer's torch plugin (one process
  per node with the ``PET_*`` variables torchrun reads) and the kubelet (a private ``/tmp`` per pod, pod phases from
  exit codes, logs from the real output), so a launcher test can end in a real ``torchrun`` on CPU.

The server listens on 127.0.0.1 with an ephemeral port, serves each request in a daemon thread, and shuts itself
down after ``lifetime_s`` even if a test forgets to stop it (the executing fake also kills what it started).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback import LoopbackServer

logger = logging.getLogger(__name__)

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
TERMINAL = ("Succeeded", "Failed")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Tick:
    """The world after one more GET of the TrainJob: pod phase and, optionally, a final condition."""

    pods: str | None = "Running"  # phase of every trainer pod; None: no pods exist yet
    # (type, reason, message), e.g. ("Failed", "...", "..."); with one, existing pods count as exited.
    condition: tuple[str, str, str] | None = None


@dataclass
class Scenario:
    """The scripted life of the one TrainJob the test creates; the last tick repeats forever."""

    ticks: list[Tick]
    num_nodes: int = 2
    logs: list[str] = field(default_factory=lambda: ["starting", "step 1/2 | loss 5.0", "step 2/2 | loss 4.0", "done"])


def pod_name(job: str, index: int) -> str:
    """The name JobSet gives trainer pod ``index``: ``<job>-<replicated job>-<job index>-<index>-<random>``."""
    return f"{job}-node-0-{index}-abcde"


def pod_object(namespace: str, job: str, index: int, phase: str) -> dict[str, Any]:
    """A trainer pod as the API returns it, with the labels the launcher selects on."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job, index),
            "namespace": namespace,
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": job,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": str(index),
            },
        },
        "spec": {"containers": [{"name": "node", "image": "refine-gpu:test"}]},
        "status": {"phase": phase},
    }


def condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    """A true TrainJob status condition (``Complete`` or ``Failed``)."""
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-25T00:00:01Z"}


class FakeKubernetes:
    """The fake API server with a scripted world; use as a context manager, then point an ``ApiClient`` at
    :attr:`host`. Subclasses change the world by overriding the methods under "the world"."""

    def __init__(self, scenario: Scenario | None, lifetime_s: float = 30.0) -> None:
        self.scenario = scenario  # None only in subclasses that override every world method
        self.lifetime_s = lifetime_s
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.tick = -1
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._loopback: LoopbackServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeKubernetes:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._loopback = LoopbackServer(Handler, self.lifetime_s, self.stop)
        self._loopback.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        if self._loopback is not None:
            self._loopback.stop()

    @property
    def host(self) -> str:
        assert self._loopback is not None and self._loopback.running, "use the fake as a context manager"
        return self._loopback.host

    # -- the world: what the handler asks; the scripted answers ------------------------------------------------
    def on_created(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """The TrainJob was stored (``body`` is a copy); a ``ValueError`` makes the POST fail with 422."""

    def trainjob_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ``status`` of the TrainJob on this GET (``None``: no status yet). Scripted: one tick per GET."""
        with self.lock:
            self.tick += 1
            tick = self.current()
        if tick.condition is None:
            return None
        return {"conditions": [condition(*tick.condition)]}

    def pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The trainer pods of ``job`` (the handler filters them by the request's label selector)."""
        phase = self._job_phase(job)
        if phase is None:
            return []
        return [pod_object(namespace, job, index, phase) for index in range(self._scenario().num_nodes)]

    def pod_phase(self, namespace: str, pod: str) -> str | None:
        """The phase of ``pod`` (``None``: no such pod); a terminal phase ends a followed log."""
        return self._job_phase(pod.split("-node-")[0])

    def log_lines(self, namespace: str, pod: str, start: int) -> list[str]:
        """The lines of ``pod``'s log from line ``start`` on, as far as they exist now."""
        return self._scenario().logs[start:]

    def on_deleted(self, namespace: str, name: str) -> None:
        """The TrainJob was removed (it is already in :attr:`deleted`)."""

    # -- the scripted world ------------------------------------------------------------------------------------
    def _scenario(self) -> Scenario:
        if self.scenario is None:
            raise TypeError(f"{type(self).__name__} has no Scenario: override the world methods")
        return self.scenario

    def current(self) -> Tick:
        ticks = self._scenario().ticks
        return ticks[min(max(self.tick, 0), len(ticks) - 1)]

    def _job_phase(self, job: str) -> str | None:
        with self.lock:
            if job in self.deleted:
                return "Failed"  # deleted: the kubelet kills the containers
            tick = self.current()
        if tick.condition is not None and tick.pods not in (None, *TERMINAL):
            # JobSet reports Complete/Failed only once the containers have exited, which ends followed logs.
            return "Succeeded" if tick.condition[0] == "Complete" else "Failed"
        return tick.pods


# -- the executing world ---------------------------------------------------------------------------------------

# Variables of a torchrun job (or of a Trainer pod) that the host running the tests may itself have: a pod would
# not inherit them, and they would contradict (PET_* override) or confuse the emulated job's own topology.
_HOST_ONLY_ENV = re.compile(r"^(PET_|TORCHELASTIC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
                            r"ROLE_RANK|ROLE_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)$")
# An absolute path /tmp or /tmp/...: not the "tmp" inside /var/tmp or /home/x/tmp.
_TMP_PATH = re.compile(r"(?<![\w./-])/tmp(?![\w.-])")
# The sandbox is spliced into `sh -c` scripts, so it must need no quoting there.
_SHELL_SAFE = re.compile(r"[\w./+@-]+")
# torchrun's own report of a failed worker ("failed (exitcode: 2) local_rank: 0 (pid: ...) of binary: ..."),
# followed by ~30 lines of its traceback and summary that say nothing about why the worker failed.
_TORCHRUN_REPORT = re.compile(r"failed \(exitcode: -?\d+\) local_rank: ")
FAILURE_TAIL = 5  # lines of the failing node's own output quoted in the Failed condition


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound and released; good enough on one test machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PodRun:
    """One emulated trainer pod: its process, its private ``/tmp`` and everything it printed (stdout + stderr).

    ``exit_code`` is set only after the output reached EOF, so a terminal phase means the log is complete.
    """

    index: int
    name: str
    root: Path  # <sandbox>/<job>/node-<i>: the pod's working directory
    tmp: Path  # what the pod sees as /tmp
    argv: list[str]  # command + args after the /tmp rewrite
    env: dict[str, str]  # the process's whole environment
    process: subprocess.Popen[str] | None  # None: the command could not be started
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    @property
    def phase(self) -> str:
        if self.exit_code is None:
            return "Running"
        return "Succeeded" if self.exit_code == 0 else "Failed"


@dataclass
class JobRun:
    """One executed TrainJob: its nodes, the trainer env that reached them and, once failed, why."""

    namespace: str
    name: str
    master_port: int
    num_nodes: int
    procs_per_node: str
    env: dict[str, str]  # the trainer's plain env values, as the pods got them
    skipped_env: list[str]  # names of trainer env entries with valueFrom (secrets): not available here
    nodes: list[PodRun] = field(default_factory=list)
    failure: str | None = None  # message of the Failed condition, from the first node that exited non-zero
    deleted: bool = False

    @property
    def exit_codes(self) -> list[int | None]:
        return [node.exit_code for node in self.nodes]

    @property
    def output(self) -> dict[str, list[str]]:
        """Each pod's output lines so far, by pod name."""
        return {node.name: list(node.lines) for node in self.nodes}

    def wait(self, timeout_s: float) -> bool:
        """Wait until every node's process has exited and its output is read; ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        return all(node.done.wait(max(0.0, deadline - time.monotonic())) for node in self.nodes)


class ExecutingKubernetes(FakeKubernetes):
    """A fake API server that runs each created TrainJob here, as the Trainer's torch runtime would on a cluster.

    For a TrainJob it reads ``spec.trainer`` (``command``, ``args``, plain-value ``env``, ``numNodes``,
    ``numProcPerNode``; nothing of the runtime, which must not be needed) and starts, per node ``i``, one process
    running ``command + args`` in its own session (process group), with:

    * the environment the torch plugin gives a node: ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK=i``,
      ``PET_MASTER_ADDR=127.0.0.1`` and one ``PET_MASTER_PORT`` per job, which torchrun takes as the defaults of
      its flags (static rendezvous), plus ``GLOO_SOCKET_IFNAME=lo`` so that gloo stays on loopback;
    * a private ``/tmp`` (the runtime's emptyDir): absolute ``/tmp`` paths in command, args and trainer env values
      become ``<sandbox>/<job>/node-<i>/tmp``, which is also ``TMPDIR`` — except inside ``shared`` directories,
      which stand for a volume every pod mounts at the same path (test data in pytest's ``tmp_path``, say);
    * this repository on ``PYTHONPATH`` and the venv's ``bin`` first on ``PATH`` (the image's code and torchrun).

    Pods are ``Running`` while their process runs, then ``Succeeded`` or ``Failed`` by exit code; logs are the
    process's merged stdout and stderr. The TrainJob becomes ``Complete`` when every node exited 0, and ``Failed``
    (naming the node, quoting its last lines) as soon as one did not, whereupon the other nodes are killed, as
    JobSet's failure policy does. DELETE and :meth:`stop` kill process groups: SIGTERM, then SIGKILL after
    :attr:`kill_grace_s`.

    ``preempt_on``: a pattern; the first time any node prints a matching line, the fake SIGKILLs that node's process
    group, as losing the node to a spot preemption does (the job then fails, and a retry must take over).

    Attributes:
        runs: every job run so far by name (also after deletion), with the node exit codes and output.
        preempted: the pods killed by ``preempt_on`` (at most one).
    """

    kill_grace_s = 5.0

    def __init__(
        self,
        sandbox: Path,
        lifetime_s: float = 300.0,
        extra_env: Mapping[str, str] | None = None,
        shared: Sequence[Path] = (),
        preempt_on: re.Pattern[str] | None = None,
    ) -> None:
        super().__init__(None, lifetime_s)
        self.preempt_on = preempt_on
        self.preempted: list[str] = []
        self.sandbox = Path(sandbox).resolve()
        if not _SHELL_SAFE.fullmatch(str(self.sandbox)):
            raise ValueError(f"sandbox {self.sandbox} must need no shell quoting: it is spliced into `sh -c` scripts")
        self.extra_env = dict(extra_env or {})
        self._shared = [re.compile(re.escape(str(Path(p).resolve())) + r"(?![\w.-])") for p in shared]
        self.runs: dict[str, JobRun] = {}

    # -- the world ---------------------------------------------------------------------------------------------
    def on_created(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        trainer = (body.get("spec") or {}).get("trainer") or {}
        command, args = [str(a) for a in trainer.get("command") or []], [str(a) for a in trainer.get("args") or []]
        if not command:
            raise ValueError("spec.trainer.command is empty; the executing fake knows no runtime's default command")
        env: dict[str, str] = {}
        skipped: list[str] = []
        for entry in trainer.get("env") or []:
            if entry.get("valueFrom") is not None:
                skipped.append(entry["name"])
            else:
                env[entry["name"]] = str(entry.get("value", ""))
        if skipped:
            logger.warning("TrainJob %s: env %s come from valueFrom (secrets): not set in the local pods",
                           name, ", ".join(skipped))
        run = JobRun(namespace=namespace, name=name, master_port=free_port(),
                     num_nodes=int(trainer.get("numNodes", 1)), procs_per_node=str(trainer.get("numProcPerNode", 1)),
                     env=env, skipped_env=skipped)
        for index in range(run.num_nodes):
            run.nodes.append(self._start_node(run, index, command + args))
        with self.lock:
            self.runs[name] = run
        for node in run.nodes:
            if node.process is None:
                self._exited(run, node)
            else:
                node.reader = threading.Thread(target=self._read, args=(run, node), name=node.name, daemon=True)
                node.reader.start()

    def trainjob_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            run = self.runs.get(name)
            if run is None:
                return None
            if run.failure is not None:
                return {"conditions": [condition("Failed", "FailedJobs", run.failure)]}
            if run.nodes and all(code == 0 for code in run.exit_codes):
                return {"conditions": [condition("Complete", "JobSetCompleted", "jobset completed successfully")]}
        return None

    def pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        with self.lock:
            run = self.runs.get(job)
            if run is None or run.namespace != namespace:
                return []
            return [pod_object(namespace, job, node.index, node.phase) for node in run.nodes]

    def pod_phase(self, namespace: str, pod: str) -> str | None:
        with self.lock:
            node = self._node(namespace, pod)
            return None if node is None else node.phase

    def log_lines(self, namespace: str, pod: str, start: int) -> list[str]:
        with self.lock:
            node = self._node(namespace, pod)
            return [] if node is None else node.lines[start:]

    def on_deleted(self, namespace: str, name: str) -> None:
        with self.lock:
            run = self.runs.get(name)
            if run is None:
                return
            run.deleted = True
        # Answer the DELETE now, as the API server does, and let the "kubelet" stop the containers meanwhile.
        threading.Thread(target=self._terminate, args=(run.nodes,), name=f"delete-{name}", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()  # before killing: killed nodes are not failures of their job
        with self.lock:
            nodes = [node for run in self.runs.values() for node in run.nodes]
        self._terminate(nodes)
        for node in nodes:
            if node.reader is not None:
                node.reader.join(self.kill_grace_s)
        super().stop()

    # -- the pods ----------------------------------------------------------------------------------------------
    def _node(self, namespace: str, pod: str) -> PodRun | None:
        """The node behind ``pod``; call with the lock held."""
        for run in self.runs.values():
            if run.namespace == namespace:
                for node in run.nodes:
                    if node.name == pod:
                        return node
        return None

    def in_pod(self, text: str, tmp: Path) -> str:
        """``text`` as the pod sees it: absolute ``/tmp`` paths moved to ``tmp``, shared directories left alone."""

        def swap(match: re.Match[str]) -> str:
            if any(shared.match(text, match.start()) for shared in self._shared):
                return match.group(0)
            return str(tmp)

        return _TMP_PATH.sub(swap, text)

    def _start_node(self, run: JobRun, index: int, argv: list[str]) -> PodRun:
        root = self.sandbox / run.name / f"node-{index}"
        tmp = root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {name: value for name, value in os.environ.items() if not _HOST_ONLY_ENV.match(name)}
        env.update(self.extra_env)
        env.update({name: self.in_pod(value, tmp) for name, value in run.env.items()})
        env.update(
            PET_NNODES=str(run.num_nodes),
            PET_NPROC_PER_NODE=run.procs_per_node,
            PET_NODE_RANK=str(index),
            PET_MASTER_ADDR="127.0.0.1",
            PET_MASTER_PORT=str(run.master_port),
            GLOO_SOCKET_IFNAME="lo",
            TMPDIR=str(tmp),
            PYTHONUNBUFFERED="1",  # a pod's log shows lines as they are printed; a pipe would block-buffer them
            PATH=os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p),
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        )
        node = PodRun(index=index, name=pod_name(run.name, index), root=root, tmp=tmp,
                      argv=[self.in_pod(part, tmp) for part in argv], env=env, process=None)
        try:
            node.process = subprocess.Popen(
                node.argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", start_new_session=True,
            )
        except OSError as exc:  # what the kubelet reports as a StartError: the pod fails, the job goes on
            node.lines.append(f"failed to start {node.argv[0]!r}: {exc}")
            node.exit_code = 128
        return node

    def _read(self, run: JobRun, node: PodRun) -> None:
        """Collect the node's output line by line until EOF, then record its exit."""
        assert node.process is not None and node.process.stdout is not None
        with node.process.stdout:
            for line in node.process.stdout:
                with self.lock:
                    node.lines.append(line.rstrip("\n"))
                    preempt = (self.preempt_on is not None and not self.preempted
                               and self.preempt_on.search(line) is not None)
                    if preempt:
                        self.preempted.append(node.name)
                if preempt:
                    _kill_tree(node)  # the node is gone: no SIGTERM, no grace period, nothing of the pod survives
        code = node.process.wait()
        with self.lock:
            node.exit_code = code
        self._exited(run, node)

    def _exited(self, run: JobRun, node: PodRun) -> None:
        """A node's process is gone: fail the job if it was the first to exit non-zero and kill the others."""
        with self.lock:
            failed = (node.exit_code != 0 and run.failure is None and not run.deleted
                      and not self.stopping.is_set())
            if failed:
                run.failure = (f"jobset failed due to one or more job failures: node {node.index} (pod {node.name}) "
                               f"exited with code {node.exit_code}; last output: {_last_words(node.lines)}")
            others = [other for other in run.nodes if other is not node]
        node.done.set()
        if failed:  # JobSet's failure policy: one failed node fails the job, and the other pods are stopped
            threading.Thread(target=self._terminate, args=(others,), name=f"fail-{run.name}", daemon=True).start()

    def _terminate(self, nodes: Sequence[PodRun]) -> None:
        """SIGTERM the process groups of ``nodes`` still running, SIGKILL those left after the grace period."""
        running = [node for node in nodes if not node.done.is_set()]
        for node in running:
            _signal_group(node, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace_s
        for node in running:
            if not node.done.wait(max(0.0, deadline - time.monotonic())):
                _signal_group(node, signal.SIGKILL)


def _signal_group(node: PodRun, sig: signal.Signals) -> None:
    if node.process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(node.process.pid, sig)  # start_new_session: the group is torchrun and its workers


def _kill_tree(node: PodRun) -> None:
    """SIGKILL the node's process and every descendant, as losing the node (or its container) does.

    A process-group kill is not enough: torchrun starts its workers in sessions of their own, so they would outlive
    their agent and go on training. Descendants are found through ``/proc`` (each process's parent id), collected
    before any is killed so that none is re-parented away first.
    """
    if node.process is None:
        return
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [node.process.pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _last_words(lines: Sequence[str]) -> str:
    """The last few non-empty lines a failing node printed before torchrun's own failure report, joined by `` | ``."""
    cut = next((i for i, line in enumerate(lines) if _TORCHRUN_REPORT.search(line)), len(lines))
    words = [line for line in lines[:cut] if line.strip()][-FAILURE_TAIL:]
    return " | ".join(words or [line for line in lines if line.strip()][-FAILURE_TAIL:]) or "(no output)"


# -- HTTP ------------------------------------------------------------------------------------------------------


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality (``k=v``, ``k==v``) and set (``k in (a, b)``) requirements, comma-separated."""
    for term in re.split(r",(?![^(]*\))", selector):
        term = term.strip()
        if not term:
            continue
        if match := re.match(r"^(\S+)\s+in\s+\(([^)]*)\)$", term):
            if labels.get(match.group(1)) not in [v.strip() for v in match.group(2).split(",")]:
                return False
        else:
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


class _Handler(BaseHTTPRequestHandler):
    """The API protocol (paths, JSON, status objects, chunked logs); the world comes from :attr:`server_fake`."""

    protocol_version = "HTTP/1.1"
    server_fake: FakeKubernetes

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # keep pytest output clean

    # -- helpers -----------------------------------------------------------------------------------------------
    def _send_json(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send_json(
            code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message,
                   "code": code}
        )

    def _route(self, method: str) -> None:
        fake = self.server_fake
        # Read every request body, even one we ignore (DELETE options): the connection is kept alive.
        length = int(self.headers.get("Content-Length") or 0)
        self.body: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}") if length else {}
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with fake.lock:
            fake.requests.append((method, url.path))
        if match := TRAINJOBS.match(url.path):
            self._trainjobs(method, match.group(1), match.group(2))
        elif (match := PODS.match(url.path)) and method == "GET":
            selector = query.get("labelSelector", "")
            job = dict(t.partition("=")[::2] for t in selector.split(",") if "=" in t).get(
                "jobset.sigs.k8s.io/jobset-name", ""
            )
            with fake.lock:
                known = any(name == job for _, name in fake.jobs) or job in fake.deleted
            pods = fake.pods(match.group(1), job) if known else []
            items = [p for p in pods if _matches(p["metadata"]["labels"], selector)]
            self._send_json(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
        elif (match := POD_LOG.match(url.path)) and method == "GET":
            self._log(match.group(1), match.group(2), query)
        else:
            self._status(404, "NotFound", f"{method} {url.path} is not served by the fake API server")

    def _trainjobs(self, method: str, namespace: str, name: str | None) -> None:
        fake = self.server_fake
        if method == "POST" and name is None:
            body = self.body
            key = (namespace, body["metadata"]["name"])
            with fake.lock:
                if key in fake.jobs:
                    self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{key[1]}" already exists')
                    return
                stored = json.loads(json.dumps(body))
                stored["metadata"].update(uid="0000-fake", creationTimestamp="2026-11-25T00:00:00Z")
                fake.jobs[key] = stored
                fake.created.append(body)
            try:
                fake.on_created(namespace, key[1], json.loads(json.dumps(stored)))
            except ValueError as exc:
                with fake.lock:
                    del fake.jobs[key]
                    fake.created.remove(body)
                self._status(422, "Invalid", f'TrainJob.trainer.kubeflow.org "{key[1]}" is invalid: {exc}')
                return
            self._send_json(201, stored)
            return
        key = (namespace, name or "")
        with fake.lock:
            job = fake.jobs.get(key)
        if job is None:
            self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            return
        if method == "GET":
            status = fake.trainjob_status(namespace, key[1])
            with fake.lock:
                obj = json.loads(json.dumps(job))
            if status is not None:
                obj["status"] = status
            self._send_json(200, obj)
        elif method == "DELETE":
            with fake.lock:
                del fake.jobs[key]
                fake.deleted.append(key[1])
            fake.on_deleted(namespace, key[1])
            self._send_json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        else:
            self._status(405, "MethodNotAllowed", f"{method} on a TrainJob")

    def _log(self, namespace: str, pod: str, query: dict[str, str]) -> None:
        fake = self.server_fake
        if query.get("container") != "node":
            self._status(400, "BadRequest", f"container {query.get('container')!r} is not valid for pod {pod}")
            return
        phase = fake.pod_phase(namespace, pod)
        if phase is None:
            self._status(404, "NotFound", f'pods "{pod}" not found')
            return
        if phase == "Pending":
            self._status(400, "BadRequest", f'container "node" in pod "{pod}" is waiting to start')
            return
        # The kubernetes client sends follow=True; the API server parses it like Go's strconv.ParseBool.
        if query.get("follow") not in ("1", "t", "T", "true", "True", "TRUE"):
            data = b"".join(f"{line}\n".encode() for line in fake.log_lines(namespace, pod, 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            # Keep following until the container has exited (or the job is deleted, or the server stops). The
            # phase is read before the lines: once it is terminal, the lines fetched after it are all there are.
            while True:
                ended = fake.pod_phase(namespace, pod) in TERMINAL or fake.stopping.is_set()
                lines = fake.log_lines(namespace, pod, sent)
                for line in lines:
                    data = f"{line}\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                sent += len(lines)
                if ended:
                    break
                time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client closed the stream

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")


def write_kubeconfig(path: Path, fake: FakeKubernetes, namespace: str = "refine") -> Path:
    """A kubeconfig whose current context is ``fake`` (what a component's ``api_client_from_environment`` reads
    through ``$KUBECONFIG`` when it runs outside a cluster)."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f'clusters: [{{name: fake, cluster: {{server: "{fake.host}"}}}}]\n'
        "users: [{name: fake, user: {token: not-a-secret}}]\n"
        f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
        "current-context: fake\n"
    )
    return path
