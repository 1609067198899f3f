"""A loopback stand-in for the Kubernetes API server: just what the TrainJob launcher calls.

Endpoints: create / get / delete ``trainjobs.trainer.kubeflow.org`` in a namespace, list pods by label selector,
and read (and follow) a pod's log. A scripted :class:`Scenario` drives the job: every GET of the TrainJob advances
one tick, and each tick sets the trainer pods' phase and, at the end, a ``Complete`` or ``Failed`` condition.
Followed logs are sent chunked, line by line, and the stream stays open until the pod has terminated or the job is
deleted, like the real API server.

The server listens on 127.0.0.1 with an ephemeral port, serves each request in a daemon thread, and shuts itself
down after ``lifetime_s`` even if a test forgets to stop it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
TERMINAL = ("Succeeded", "Failed")


@dataclass
class Tick:
    """The world after one more GET of the TrainJob: pod phase and, optionally, a final condition."""

    pods: str | None = "Running"  # phase of every trainer pod; None: no pods exist yet
    condition: tuple[str, str, str] | None = None  # (type, reason, message), e.g. ("Failed", "...", "...")


@dataclass
class Scenario:
    """The scripted life of the one TrainJob the test creates; the last tick repeats forever."""

    ticks: list[Tick]
    num_nodes: int = 2
    logs: list[str] = field(default_factory=lambda: ["starting", "step 1/2 | loss 5.0", "step 2/2 | loss 4.0", "done"])


class FakeKubernetes:
    """The fake API server; use as a context manager, then point an ``ApiClient`` at :attr:`host`."""

    def __init__(self, scenario: Scenario, lifetime_s: float = 30.0) -> None:
        self.scenario = scenario
        self.lifetime_s = lifetime_s
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.tick = -1
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeKubernetes:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- the scripted world ------------------------------------------------------------------------------------
    def current(self) -> Tick:
        ticks = self.scenario.ticks
        return ticks[min(max(self.tick, 0), len(ticks) - 1)]

    def pod_phase(self, job: str) -> str | None:
        with self.lock:
            if job in self.deleted:
                return "Failed"  # deleted: the kubelet kills the containers
            return self.current().pods

    def pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        phase = self.pod_phase(job)
        if phase is None:
            return []
        return [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job}-node-0-{index}-abcde",
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
            for index in range(self.scenario.num_nodes)
        ]


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
            self._send_json(201, stored)
            return
        key = (namespace, name or "")
        with fake.lock:
            job = fake.jobs.get(key)
        if job is None:
            self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            return
        if method == "GET":
            with fake.lock:
                fake.tick += 1
                tick = fake.current()
                obj = json.loads(json.dumps(job))
            if tick.condition is not None:
                kind, reason, message = tick.condition
                obj["status"] = {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message,
                                                 "lastTransitionTime": "2026-11-25T00:00:01Z"}]}
            self._send_json(200, obj)
        elif method == "DELETE":
            with fake.lock:
                del fake.jobs[key]
                fake.deleted.append(key[1])
            self._send_json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        else:
            self._status(405, "MethodNotAllowed", f"{method} on a TrainJob")

    def _log(self, namespace: str, pod: str, query: dict[str, str]) -> None:
        fake = self.server_fake
        job = pod.split("-node-")[0]
        if query.get("container") != "node":
            self._status(400, "BadRequest", f"container {query.get('container')!r} is not valid for pod {pod}")
            return
        if fake.pod_phase(job) in (None, "Pending"):
            self._status(400, "BadRequest", f'container "node" in pod "{pod}" is waiting to start')
            return
        lines = [f"{line}\n".encode() for line in fake.scenario.logs]
        if query.get("follow") != "true":
            data = b"".join(lines)
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
        try:
            for line in lines:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(0.01)
            # Keep following until the container has exited (or the job is deleted, or the server stops).
            while fake.pod_phase(job) not in TERMINAL and not fake.stopping.is_set():
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
