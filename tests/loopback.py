"""The HTTP server under the loopback fakes of external APIs (``tests/distributed/fake_k8s.py``,
``tests/integration/fake_kfp.py``): 127.0.0.1 on an ephemeral port, one daemon thread per request, and a watchdog
that stops the fake after ``lifetime_s`` even when a test forgets to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """Serves ``handler`` on loopback; :meth:`start` returns the base URL, :meth:`stop` is idempotent.

    Args:
        handler: the request handler class (usually a subclass bound to its fake).
        lifetime_s: after this long the watchdog calls ``on_timeout``.
        on_timeout: what the watchdog calls; the fake's own ``stop`` (so that it also ends what it started).
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], lifetime_s: float, on_timeout: Callable[[], None]
                 ) -> None:
        self._handler = handler
        self._lifetime_s = lifetime_s
        self._on_timeout = on_timeout
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None
        self.host = ""  # ``http://127.0.0.1:<port>``, still known after the server stopped

    def start(self) -> str:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler)
        self._server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self._lifetime_s, self._on_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self.host

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
