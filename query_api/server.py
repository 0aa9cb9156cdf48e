"""The one uvicorn configuration of the query API, and a server in a background thread.

``server_config`` is used by every place that serves the API (``python -m query_api``,
``BackgroundServer`` for tests and benchmarks, ``imgsearch up``), so the limits of
docs/query_api.md ("Limits") hold wherever the API runs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from query_api.protocol import LimitedH11Protocol
from shared.config import Settings


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus what LimitedH11Protocol reads from it."""

    def __init__(self, app: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s


def app_settings(app: FastAPI) -> Settings:
    """The Settings an app was built with (create_app keeps them on app.state)."""
    service = getattr(app.state, "service", None)
    if service is None:
        raise ValueError("not an app from query_api.app.create_app: it carries no settings")
    settings: Settings = service.settings
    return settings


def server_config(app: FastAPI, settings: Settings | None = None, **overrides: Any) -> ServerConfig:
    """uvicorn's configuration for ``app`` from its Settings; ``overrides`` are passed on
    (host, port, log_level, lifespan, timeout_graceful_shutdown, ...)."""
    settings = settings or app_settings(app)
    values: dict[str, Any] = {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_config": None,  # keep the project's logging format
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": 30,
        # h11, not httptools: httptools has no limit on the size of a request's head.
        "http": LimitedH11Protocol,
        "h11_max_incomplete_event_size": settings.api_max_header_bytes,
        "header_timeout_s": settings.api_header_timeout_s,
        "timeout_keep_alive": settings.api_keepalive_timeout_s,
        "limit_concurrency": settings.api_max_connections,
        # No WebSocket endpoints: an upgrade request is answered as plain HTTP.
        "ws": "none",
    }
    values.update(overrides)
    return ServerConfig(app, **values)


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; ``start`` returns once it listens."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning", settings: Settings | None = None) -> None:
        self.host = host
        self.port = port
        config = server_config(app, settings, host=host, port=port, log_level=log_level,
                               timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        if self._thread is not None:
            raise RuntimeError(f"the API server on {self.url} is already running")
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"the API server on {self.url} stopped during start-up (see the log above)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the API server on {self.url} did not start in {timeout_s}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> BackgroundServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
