"""Run the API on uvicorn in a background thread: for processes that serve the API beside
other work (the embedded store admits one process), and for tests and benchmarks."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; ``start`` returns once it listens."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning") -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                log_config=None, timeout_graceful_shutdown=10)
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

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
