"""The query API for ``imgsearch up``: uvicorn in a thread of the up process.

The listening socket is bound first, before ``up`` starts a broker or touches the data
directory, so a port in use is reported at once and leaves nothing behind.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import click

API_START_TIMEOUT_S = 60.0
API_STOP_TIMEOUT_S = 15.0


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}. Is another `imgsearch up` "
            f"running? Open http://{host}:{port}/ to see, or choose another port: --port "
            f"{port + 1 if port else 8001}."
        ) from exc
    return sock


class ApiServer:
    """uvicorn serving the query API on an already bound socket, in a thread of this
    process (no signal handlers there)."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import uvicorn

        from query_api.server import server_config  # the API's limits, wherever it runs

        self.socket = sock
        self.host = str(sock.getsockname()[0])
        self.port = int(sock.getsockname()[1])
        config = server_config(app, lifespan="on", log_level="warning",
                               timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="api")
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # noqa: BLE001 - SystemExit when the lifespan fails
            self.error = exc

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise click.ClickException(
                    f"the query API did not start ({self.error!r}); see the log above")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(API_STOP_TIMEOUT_S)
        self.socket.close()
