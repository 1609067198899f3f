"""A loopback stand-in for the Kubeflow Pipelines v2beta1 REST API: just what ``refine pipeline submit`` reaches
through ``kfp.Client``.

Endpoints: ``GET healthz``; ``GET pipelines`` (filtered by display name), ``POST pipelines/upload`` and
``POST pipelines/upload_version`` (multipart, the compiled IR in ``uploadfile``); ``GET experiments`` (filtered by
display name) and ``POST experiments``; ``POST runs`` and ``GET runs/{id}``. A run follows a scripted list of states,
one step per GET (``RUNNING`` then ``SUCCEEDED``, say); the last state repeats. Anything else is answered 404 and
recorded in :attr:`FakeKfp.unexpected`. Every request is recorded (method, path with query, headers, raw body), so a
test can check what reached the API and that no credential did; each created run keeps its request body and the
service account it asked for (:attr:`FakeRun.service_account`).

The server listens on 127.0.0.1 with an ephemeral port, serves each request in a daemon thread, and shuts itself
down after ``lifetime_s`` even if a test forgets to stop it.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback import LoopbackServer

API = "/apis/v2beta1"
CREATED_AT = "2026-01-01T00:00:00Z"
MAX_BODY = 20_000_000  # a compiled pipeline is ~100 kB; refuse anything absurd


@dataclass
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes


@dataclass
class Upload:
    """One uploaded pipeline or pipeline version."""

    pipeline_id: str
    version_id: str | None
    name: str
    package: bytes  # the compiled IR YAML as uploaded


@dataclass
class FakeRun:
    run_id: str
    body: dict[str, Any]  # the create-run request as sent
    states: list[str]
    # The run body's ``service_account``: the Kubernetes account the run's pods use. ``None`` when the client sent
    # none (kfp.Client leaves the field out) or an empty one; the real API then uses the cluster's default account.
    service_account: str | None = None
    gets: int = 0


@dataclass
class FakeKfp:
    """The fake API server; use as a context manager, then point ``kfp.Client(host=...)`` at :attr:`host`.

    Args:
        run_states: the states a created run reports on successive GETs (the last one repeats).
        multi_user: what healthz reports.
        lifetime_s: the server stops itself after this long.
    """

    run_states: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    multi_user: bool = False
    lifetime_s: float = 120.0
    requests: list[Request] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    pipelines: dict[str, str] = field(default_factory=dict)  # display name -> id
    uploads: list[Upload] = field(default_factory=list)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> experiment
    runs: dict[str, FakeRun] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._loopback: LoopbackServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeKfp:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._loopback = LoopbackServer(Handler, self.lifetime_s, self.stop)
        self._loopback.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loopback is not None:
            self._loopback.stop()

    @property
    def host(self) -> str:
        """``http://127.0.0.1:<port>`` (still known after the server stopped)."""
        assert self._loopback is not None, "use FakeKfp as a context manager"
        return self._loopback.host

    # -- state the tests set up or inspect ---------------------------------------------------------------------
    def add_pipeline(self, name: str) -> str:
        pipeline_id = f"pipeline-{uuid.uuid4().hex[:8]}"
        with self.lock:
            self.pipelines[name] = pipeline_id
        return pipeline_id

    def add_experiment(self, name: str, namespace: str = "") -> str:
        experiment_id = f"experiment-{uuid.uuid4().hex[:8]}"
        with self.lock:
            self.experiments[experiment_id] = _experiment(experiment_id, name, namespace)
        return experiment_id

    def calls(self) -> list[str]:
        """``METHOD /path`` of every request, without the API prefix and query (``GET healthz``)."""
        return [f"{r.method} {urlsplit(r.path).path.removeprefix(API + '/')}" for r in self.requests]

    # -- the API -----------------------------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(Request(method, target, headers, body))
            url = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path
            if method == "GET" and path == f"{API}/healthz":
                return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
            if method == "GET" and path == f"{API}/pipelines":
                name = _filter_name(query.get("filter"))
                found = [_pipeline(pid, n) for n, pid in self.pipelines.items() if name in (None, n)]
                return 200, ({"pipelines": found, "total_size": len(found)} if found else {})
            if method == "POST" and path == f"{API}/pipelines/upload":
                return self._upload(query, headers, body, version=False)
            if method == "POST" and path == f"{API}/pipelines/upload_version":
                return self._upload(query, headers, body, version=True)
            if method == "GET" and path == f"{API}/experiments":
                name = _filter_name(query.get("filter"))
                found = [e for e in self.experiments.values() if name in (None, e["display_name"])]
                return 200, ({"experiments": found, "total_size": len(found)} if found else {})
            if method == "POST" and path == f"{API}/experiments":
                payload = json.loads(body)
                if not payload.get("display_name"):
                    return _error(400, "experiment display_name is required")
                experiment_id = f"experiment-{uuid.uuid4().hex[:8]}"
                self.experiments[experiment_id] = _experiment(experiment_id, payload["display_name"],
                                                              payload.get("namespace") or "")
                return 200, self.experiments[experiment_id]
            if method == "POST" and path == f"{API}/runs":
                return self._create_run(json.loads(body))
            match = re.fullmatch(rf"{API}/runs/([\w-]+)", path)
            if method == "GET" and match:
                run = self.runs.get(match.group(1))
                if run is None:
                    return _error(404, f"run {match.group(1)} not found")
                state = run.states[min(run.gets, len(run.states) - 1)]
                run.gets += 1
                return 200, {**run.body, "run_id": run.run_id, "state": state, "created_at": CREATED_AT}
            self.unexpected.append(f"{method} {target}")
            return _error(404, f"the fake KFP API does not implement {method} {path}")

    def _upload(self, query: dict[str, str], headers: dict[str, str], body: bytes, version: bool
                ) -> tuple[int, dict[str, Any]]:
        package = _multipart_file(headers.get("content-type", ""), body, "uploadfile")
        if package is None:
            return _error(400, "multipart field uploadfile is missing")
        name = query.get("name") or query.get("display_name")
        if not name:
            return _error(400, "name is required")
        if not version:
            if name in self.pipelines:
                return _error(409, f"pipeline {name} already exists")
            pipeline_id = f"pipeline-{uuid.uuid4().hex[:8]}"
            self.pipelines[name] = pipeline_id
            self.uploads.append(Upload(pipeline_id, None, name, package))
            return 200, _pipeline(pipeline_id, name, query.get("description"))
        pipeline_id = query.get("pipelineid", "")
        if pipeline_id not in self.pipelines.values():
            return _error(404, f"pipeline {pipeline_id!r} not found")
        if any(u.pipeline_id == pipeline_id and u.version_id and u.name == name for u in self.uploads):
            return _error(409, f"version {name} of pipeline {pipeline_id} already exists")
        version_id = f"version-{uuid.uuid4().hex[:8]}"
        self.uploads.append(Upload(pipeline_id, version_id, name, package))
        return 200, {"pipeline_id": pipeline_id, "pipeline_version_id": version_id, "display_name": name,
                     "name": name, "created_at": CREATED_AT}

    def _create_run(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if payload.get("experiment_id") not in self.experiments:
            return _error(404, f"experiment {payload.get('experiment_id')!r} not found")
        ref = payload.get("pipeline_version_reference") or {}
        if not any(u.pipeline_id == ref.get("pipeline_id") and u.version_id == ref.get("pipeline_version_id")
                   for u in self.uploads):
            return _error(404, f"pipeline version {ref!r} not found")
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.runs[run_id] = FakeRun(run_id, payload, list(self.run_states),
                                    service_account=payload.get("service_account") or None)
        return 200, {**payload, "run_id": run_id, "state": "PENDING", "created_at": CREATED_AT}


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeKfp
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            status, payload = _error(413, "body too large")
        else:
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, payload = self.server_fake.handle(self.command, self.path, headers, body)
            except Exception as exc:  # a bug in the fake, or a body it cannot parse: say so to the client
                status, payload = _error(500, f"fake KFP API error: {exc!r}")
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": message, "message": message, "code": status}


def _pipeline(pipeline_id: str, name: str, description: str | None = None) -> dict[str, Any]:
    return {"pipeline_id": pipeline_id, "display_name": name, "name": name, "description": description or "",
            "created_at": CREATED_AT}


def _experiment(experiment_id: str, name: str, namespace: str) -> dict[str, Any]:
    return {"experiment_id": experiment_id, "display_name": name, "namespace": namespace,
            "storage_state": "AVAILABLE", "created_at": CREATED_AT}


def _filter_name(raw: str | None) -> str | None:
    """The display name of a kfp filter ``{"predicates": [{"key": "display_name", "stringValue": ...}]}``."""
    if not raw:
        return None
    for predicate in json.loads(raw).get("predicates", []):
        if predicate.get("key") in ("display_name", "name"):
            return predicate.get("stringValue") or predicate.get("string_value")
    return None


def _multipart_file(content_type: str, body: bytes, field_name: str) -> bytes | None:
    """The bytes of the ``field_name`` part of a ``multipart/form-data`` body."""
    if not content_type.startswith("multipart/form-data"):
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == field_name:
            return part.get_payload(decode=True)
    return None
