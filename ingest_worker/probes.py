"""The worker's HTTP endpoint (WORKER_METRICS_PORT): Prometheus metrics and probes.

* ``/metrics``  the Prometheus exposition;
* ``/healthz``  liveness: 200 unless the process must be restarted (a fatal error, a dead
  thread, a stall nothing explains); orchestrators restart it on 503;
* ``/readyz``   readiness: 200 while consuming; 503 with the reason while it waits out an
  outage, is stalled, or is starting or stopping.

Both probes answer from ``Supervisor.health()``, computed at request time.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from shared.pipeline.supervise import Health

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    health: Callable[[], Health]
    timeout = 10  # seconds a client may take to send its request

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            health = type(self).health()
            ok = health.alive if path == "/healthz" else health.ready
            body = {"status": "ok" if ok else "unavailable", "alive": health.alive,
                    "ready": health.ready, "reason": health.reason}
            self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b'{"error": "not found: /metrics, /healthz, /readyz"}',
                       "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("probe %s", format % args)


class ProbeServer:
    def __init__(self, host: str, port: int, health: Callable[[], Health]) -> None:
        handler = type("ProbeHandler", (_Handler,), {"health": staticmethod(health)})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])

    def start(self, spawn: Callable[[str, Callable[[], None]], Any] | None = None) -> ProbeServer:
        """Serve on a thread: ``spawn``'s (a supervisor's, so that the server dying is
        fatal like any other thread's) or a plain daemon thread."""
        if spawn is not None:
            spawn("probes", self.server.serve_forever)
        else:
            threading.Thread(target=self.server.serve_forever, name="probes", daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
