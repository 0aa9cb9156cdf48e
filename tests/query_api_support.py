"""Helpers for the query API tests: a gallery of real bird photos indexed through the real
ingest pipeline, and API servers on loopback ports."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.components import Components
from shared.config import Settings, load_settings
from shared.events import ImageUploaded
from shared.pipeline.stages import WorkItem
from tests.conftest import MOBILENET, free_port


@dataclass(frozen=True)
class Bird:
    path: Path
    image_id: str
    label: str
    split: str

    def read(self) -> bytes:
        return self.path.read_bytes()


def bird_rows(birds: Path) -> list[Bird]:
    with (birds / "labels.csv").open() as handle:
        return [
            Bird(birds / row["path"], row["path"], row["label"], row["split"])
            for row in csv.DictReader(handle)
        ]


def pick(rows: Sequence[Bird], *, train: int, test: int, skip_test: int = 0) -> list[Bird]:
    """Per species: the first ``train`` train photos and ``test`` test photos
    (after skipping ``skip_test`` test photos), in labels.csv order."""
    chosen: list[Bird] = []
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        n = seen.get((row.label, row.split), 0)
        seen[(row.label, row.split)] = n + 1
        if row.split == "train" and n < train:
            chosen.append(row)
        elif row.split == "test" and skip_test <= n < skip_test + test:
            chosen.append(row)
    return chosen


def api_settings(store: Path, weights: Path, roots: Sequence[Path], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "qdrant_path": store,
        "model_name": MOBILENET,
        "model_weights": weights,
        "device": "cpu",
        "image_file_roots": list(roots),
        "worker_metrics_port": 0,
        "api_host": "127.0.0.1",
        "api_port": free_port(),
    }
    values.update(overrides)
    return load_settings(**values)


def upload_item(bird: Bird, n: int, *, uri: str | None = None, inline: bool = False) -> WorkItem:
    event = ImageUploaded(
        event_id=f"test-{n}",
        source="tests",
        image_id=bird.image_id,
        uri=None if inline else (uri or bird.path.as_uri()),
        image_bytes=bird.read() if inline else None,
        metadata={"label": bird.label, "split": bird.split},
    )
    return WorkItem(bird.image_id, event)


def index(components: Components, items: Sequence[WorkItem]) -> None:
    report = components.ingest(list(items))
    failed = [(r.item.key, str(r.error)) for r in report.failures]
    assert not failed, f"indexing failed for {failed[:5]}"
    assert report.count("stored") == len(items), report.summary()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# -- the API as a real process (added for tests/test_api_hostile.py) --------------------------


class ApiProcess:
    """``python -m query_api`` in a subprocess with ``settings``, on loopback; its log goes
    to ``log_path`` (a file, not a pipe: a pipe nobody reads would stall the server)."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        from tests.conftest import REPO
        from tests.kafka_helpers import settings_env

        self.settings = settings
        self.log_path = log_path
        self.env = settings_env(settings)
        self.env["PYTHONPATH"] = str(REPO)
        self.process: Any = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self, timeout_s: float = 180.0) -> ApiProcess:
        import subprocess
        import sys
        import time

        import httpx

        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "query_api"],
                                        cwd=self.env["PYTHONPATH"],
                                        env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"query_api exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"query_api was not ready after {timeout_s}s:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory now, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        import subprocess

        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return int(self.process.returncode)


class TrickleServer:
    """Serves files under ``root`` over http on loopback, quickly until ``slow`` is set;
    then it sends the headers and trickles the body a byte at a time (for ``trickle_s`` at
    most), as a dying image host would. ``hits`` counts requests per path."""

    def __init__(self, root: Path, *, trickle_s: float = 8.0) -> None:
        import http.server
        import threading
        import time
        from collections import Counter

        self.root = root
        self.trickle_s = trickle_s
        self.slow = False
        self.hits: Counter[str] = Counter()
        self.active = 0  # requests being answered now
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's name
                with outer._lock:
                    outer.hits[self.path] += 1
                    outer.active += 1
                try:
                    self._answer()
                finally:
                    with outer._lock:
                        outer.active -= 1

            def _answer(self) -> None:
                path = (outer.root / self.path.lstrip("/")).resolve()
                if not path.is_relative_to(outer.root.resolve()) or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not outer.slow:
                    self.wfile.write(data)
                    return
                deadline = time.monotonic() + outer.trickle_s
                for byte in data:
                    if outer.stopping.is_set() or time.monotonic() > deadline:
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:
                        return  # the fetcher gave up
                    outer.stopping.wait(0.2)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def wait_idle(self, quiet_s: float = 0.5, limit_s: float = 15.0) -> None:
        """Return once no request has been open for ``quiet_s`` (``limit_s`` at most)."""
        import time

        deadline = time.monotonic() + limit_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.active:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.active} requests still open after {limit_s}s")

    def __enter__(self) -> TrickleServer:  # noqa: PYI034 - as BackgroundServer does
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@dataclass
class Exchange:
    """What a hand-made request got back."""

    status: int | None  # None: closed (or timed out) without an answer
    headers: dict[str, str]
    body: bytes
    sent: int  # bytes the client managed to send before it stopped
    elapsed_s: float  # from connecting to the end of the answer

    @property
    def code(self) -> str | None:
        import json

        try:
            return str(json.loads(self.body)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return None


def _parse_answer(raw: bytes) -> tuple[int | None, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def raw_exchange(port: int, chunks: Sequence[bytes] | Iterator[bytes], *, pause_s: float = 0.0,
                 limit_s: float = 30.0) -> Exchange:
    """Send ``chunks`` on a new loopback connection, ``pause_s`` apart, stopping as soon as
    the server answers or closes (so a 64 MiB header is never pushed in full); then read
    its answer. Everything is bounded by ``limit_s``."""
    import select
    import socket
    import time

    started = time.monotonic()
    sent = 0
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        for chunk in chunks:
            if time.monotonic() - started > limit_s:
                break
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # an answer, or a close: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
            if pause_s:
                time.sleep(pause_s)
        while time.monotonic() - started < limit_s:
            sock.settimeout(max(0.1, limit_s - (time.monotonic() - started)))
            try:
                part = sock.recv(65536)
            except OSError:
                break
            if not part:
                break
            raw += part
            status, headers, body = _parse_answer(raw)
            length = headers.get("content-length", "")
            if status is not None and length.isdigit() and len(body) >= int(length):
                break
    status, headers, body = _parse_answer(raw)
    return Exchange(status, headers, body, sent, time.monotonic() - started)
