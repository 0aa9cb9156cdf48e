"""`imgsearch up`: the whole system in one process, driven as a user would, over HTTP.

A subprocess runs `imgsearch up` with its own Tansu broker, the embedded store, the real
mobilenetv2_100 weights and real bird photos. Stopping it by signal must leave no broker
process behind and nothing half-written in the store.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MOBILENET, REPO, free_port

SPECIES = ("Blue_Jay", "Painted_Bunting", "American_Goldfinch", "Horned_Puffin")
START_TIMEOUT_S = 180.0
INDEX_TIMEOUT_S = 300.0


class UpProcess:
    """`imgsearch up` in a subprocess; its output lines are collected as they come."""

    def __init__(self, paths: list[Path], data: Path, weights: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KAFKA_", "QDRANT_", "MODEL_", "API_"))
               and k not in ("IMAGE_FILE_ROOTS", "LOG_LEVEL", "WORKER_METRICS_PORT")}
        env.update(MODEL_NAME=MOBILENET, MODEL_WEIGHTS=str(weights), DEVICE="cpu",
                   PYTHONUNBUFFERED="1")
        self.log = log
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgsearch", "up", *map(str, paths), "--data-dir", str(data),
             "--port", str(self.port)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log.open("a") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                # tqdm redraws with \r: the last state of a bar is what counts.
                for part in line.rstrip("\n").split("\r"):
                    self.lines.append(part)
                    self._new.put(part)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in list(self.lines):
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None and self._new.empty():
                    break
                continue
            if match := regex.search(line):
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s}s "
                             f"(exit {self.process.poll()}); output:\n{self.output[-4000:]}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"`imgsearch up` exited with {self.process.returncode}:\n"
                                     f"{self.output[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"/readyz not 200 within {START_TIMEOUT_S}s:\n{self.output[-4000:]}")

    @property
    def broker_pid(self) -> int:
        return int(self.wait_for_line(r"broker:  local Tansu, pid (\d+)", 60).group(1))

    def stop(self, sig: signal.Signals, timeout_s: float = 90.0) -> int:
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"`imgsearch up` did not stop within {timeout_s}s after "
                                 f"{sig.name}:\n{self.output[-4000:]}") from None
        self._reader.join(10)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def process_gone(pid: int) -> bool:
    """True when no process has this pid (a zombie still counts as there)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def photos(tmp_path: Path, birds: Path) -> Path:
    root = tmp_path / "photos"
    for species in SPECIES:
        shutil.copytree(birds / species, root / species)
    return root


@pytest.fixture
def start(tmp_path: Path, mobilenet_weights: Path) -> Iterator[Any]:
    started: list[UpProcess] = []

    def run(paths: list[Path], data: Path) -> UpProcess:
        up = UpProcess(paths, data, mobilenet_weights, tmp_path / "up.log")
        started.append(up)
        return up

    yield run
    for up in started:
        up.close()


def search(url: str, photo: Path) -> list[dict[str, Any]]:
    response = httpx.post(f"{url}/search", params={"limit": 5}, content=photo.read_bytes(),
                          headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["hits"]


def count(url: str) -> int:
    return int(httpx.get(f"{url}/count", timeout=30).json()["count"])


def cli(*args: str, cwd: Path,
        timeout_s: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """Another `imgsearch` command, as a user would type it in a second terminal."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "QDRANT_", "MODEL_", "API_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "imgsearch", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout_s, check=False)
    return result, time.monotonic() - started


def test_up_indexes_serves_and_restarts_without_reindexing(
        start: Any, photos: Path, tmp_path: Path) -> None:
    good = sorted(photos.rglob("*.jpg"))
    broken = photos / "Horned_Puffin" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated: not a whole JPEG")
    data = tmp_path / "data"

    # First run: everything is new.
    up = start([photos], data)
    t0 = time.monotonic()
    up.wait_ready()
    ready_s = time.monotonic() - t0
    # /readyz answers as soon as the API thread serves, a moment before `up` prints it.
    assert up.wait_for_line(rf"^search:  {re.escape(up.url)}/", 10)
    broker = up.broker_pid
    done = up.wait_for_line(r"indexed: (\d+) stored, (\d+) failed",
                            INDEX_TIMEOUT_S)
    assert tuple(map(int, done.groups())) == (len(good), 1)
    assert up.wait_for_line(rf"{re.escape(str(broken.resolve()))}: undecodable: ", 5)
    up.wait_for_line(r"^ready: ", 30)
    print(f"\nfirst run: /readyz after {ready_s:.1f}s, indexed {len(good)} in "
          f"{time.monotonic() - t0:.1f}s from start")
    assert count(up.url) == len(good)
    page = httpx.get(f"{up.url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

    probe = good[len(good) // 2]
    hits = search(up.url, probe)
    assert hits[0]["image_id"] == f"photos/{probe.relative_to(photos).as_posix()}"
    assert hits[0]["score"] > 0.999
    assert hits[0]["metadata"] == {"label": probe.parent.name}

    # Beside it, another terminal's `dlq list` finds its broker (random port) through the
    # data directory, and answers in seconds.
    listed, took = cli("dlq", "list", "--data-dir", str(data), cwd=tmp_path)
    print(f"dlq list beside up: {took:.1f}s")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "undecodable" in listed.stdout and "photos/Horned_Puffin/broken.jpg" in listed.stdout
    assert took < 10
    # `search` asks the running up (the embedded store serves one process)...
    found, _ = cli("search", str(probe), "-k", "3", "--data-dir", str(data), cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert f"photos/{probe.relative_to(photos).as_posix()}" in found.stdout
    # ... and `index` says in one line why it cannot open the store now.
    refused, _ = cli("index", str(photos), "--data-dir", str(data), cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"pid {up.process.pid}" in refused.stderr and "imgsearch publish" in refused.stderr

    assert up.stop(signal.SIGINT) == 0, up.output[-4000:]
    assert "stopped cleanly" in up.output
    assert process_gone(broker), f"broker pid {broker} outlived `imgsearch up`"
    assert not (data / "imgsearch-up" / "running.json").exists()

    # Second run on the same data directory, after 4 photos were deleted: the rest are
    # served without being indexed again, the 4 leave the index, and the file that failed
    # is not tried again while it is unchanged.
    removed = good[:2] + good[-2:]
    for path in removed:
        path.unlink()
    again = start([photos], data)
    again.wait_ready()
    second_broker = again.broker_pid
    kept = len(good) - len(removed)
    again.wait_for_line(rf"images:  {kept + 1} under .*: {kept} already indexed, 0 to index, "
                        r"4 removed from the folders \(to delete\), 1 skipped \(failed before",
                        120)
    again.wait_for_line(rf"skipped {re.escape(str(broken.resolve()))}: undecodable", 5)
    again.wait_for_line(r"^indexed: 0 stored, 0 failed, 4 removed", INDEX_TIMEOUT_S)
    again.wait_for_line(r"^ready: ", 30)
    assert count(again.url) == len(good) - 4
    gone = f"photos/{removed[0].relative_to(photos).as_posix()}"
    assert httpx.get(f"{again.url}/images/{gone}", timeout=30).status_code == 404
    hits = search(again.url, probe)
    assert hits[0]["image_id"] == f"photos/{probe.relative_to(photos).as_posix()}"
    # A second `up` on the same data directory is refused at once, naming the first.
    twice, took = cli("up", str(photos), "--data-dir", str(data), "--port", str(free_port()),
                      cwd=tmp_path)
    assert twice.returncode == 1 and "is already serving" in twice.stderr and took < 5

    assert again.stop(signal.SIGTERM) == 0, again.output[-4000:]
    assert process_gone(second_broker)


def test_failed_files_are_retried_once_they_change(tmp_path: Path) -> None:
    from imgsearch.files import ImageFile
    from imgsearch.index import Failure
    from imgsearch.mirror import FailedFiles

    bad, slow = tmp_path / "bad.jpg", tmp_path / "slow.jpg"
    bad.write_bytes(b"not an image")
    slow.write_bytes(b"whatever")
    files = [ImageFile(bad, "x/bad.jpg", "x"), ImageFile(slow, "x/slow.jpg", "x")]
    failed = FailedFiles.for_collection(tmp_path / "data", "images")
    failed.update([Failure(bad, "undecodable", "not a recognised image format"),
                   Failure(slow, "fetch_timeout", "took too long")], succeeded=[])
    failed.save()
    again = FailedFiles.for_collection(tmp_path / "data", "images")
    assert again.known(files[0]) is not None, "a file that cannot decode is remembered"
    assert again.known(files[1]) is None, "a timeout may pass: tried again next time"
    bad.write_bytes(b"now a different file")
    assert again.known(files[0]) is None, "a changed file is tried again"


def test_a_port_in_use_is_reported_at_once_and_nothing_is_created(
        tmp_path: Path, photos: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        data = tmp_path / "data"
        result, took = cli("up", str(photos), "--data-dir", str(data), "--port", str(port),
                           cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr and "broker:" not in result.stdout
    assert not data.exists()
    assert took < 5, took


def test_offline_without_weights_fails_in_seconds_saying_what_to_do(
        tmp_path: Path, photos: Path) -> None:
    """No --weights, no cached weights, no reachable hub (here: a closed loopback port)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "MODEL_", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "imgsearch", "up", str(photos), "--data-dir",
         str(tmp_path / "data"), "--port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    took = time.monotonic() - started
    print(f"\noffline without weights: exit {result.returncode} after {took:.1f}s: "
          f"{result.stderr.strip()}")
    assert result.returncode == 1
    assert took < 20
    assert "no weights for 'resnet50'" in result.stderr and "--weights" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Error:") == 1
    match = re.search(r"local Tansu, pid (\d+)", result.stdout)
    assert match and process_gone(int(match.group(1)))


def test_up_stopped_mid_indexing_leaves_a_consistent_store_and_resumes(
        start: Any, photos: Path, tmp_path: Path, embedder: Any) -> None:
    from shared.components import collection_spec
    from shared.config import load_settings
    from shared.images import sha256_hex
    from shared.store.edge import EdgeStore

    good = sorted(photos.rglob("*.jpg"))
    data = tmp_path / "data"
    up = start([photos], data)
    up.wait_ready()
    broker = up.broker_pid
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    # Stop right after the first batch lands (batches are 32 of the 238 photos).
    while count(up.url) == 0:
        assert time.monotonic() < deadline, up.output[-4000:]
        time.sleep(0.1)
    assert up.stop(signal.SIGTERM) == 0, up.output[-4000:]
    assert process_gone(broker)
    assert "indexing interrupted after" in up.output

    # Every point in the store is whole: the right bytes' hash for its file.
    settings = load_settings(qdrant_path=data, model_name=MOBILENET)
    with EdgeStore(data, collection_spec(settings, embedder)) as store:
        stored_n = store.count()
        by_id = {f"photos/{p.relative_to(photos).as_posix()}": p for p in good}
        stored = store.get(list(by_id))
    assert 0 < stored_n < len(good) and len(stored) == stored_n
    for image_id, point in stored.items():
        assert point.payload["sha256"] == sha256_hex(by_id[image_id].read_bytes())

    # The next run indexes exactly the rest.
    again = start([photos], data)
    again.wait_ready()
    again.wait_for_line(rf"{stored_n} already indexed, {len(good) - stored_n} to index", 120)
    again.wait_for_line(rf"^indexed: {len(good) - stored_n} stored, 0 failed",
                        INDEX_TIMEOUT_S)
    assert count(again.url) == len(good)
    assert again.stop(signal.SIGINT) == 0


def process_dead(pid: int) -> bool:
    """Gone, or exited and waiting to be reaped by init (a zombie runs nothing)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_a_failed_start_stops_the_broker(tmp_path: Path, photos: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MODEL_"))}
    env.update(MODEL_NAME="not_a_real_model", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "imgsearch", "up", str(photos), "--data-dir",
         str(tmp_path / "data"), "--port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MODEL_NAME='not_a_real_model' is not a timm model" in result.stderr
    assert "--model MODEL_NAME --weights FILE" in result.stderr
    match = re.search(r"local Tansu, pid (\d+)", result.stdout)
    assert match, result.stdout
    assert process_gone(int(match.group(1)))
    assert "broker:  stopped" in result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_local_broker_dies_with_a_killed_parent() -> None:
    # The parent is killed outright: no finally, no atexit. The kernel must stop the broker.
    script = (
        "import os, signal\n"
        "from imgsearch.local_broker import LocalBroker\n"
        "broker = LocalBroker()\n"
        "broker.start()\n"
        "print(broker.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    parent = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert parent.returncode == -signal.SIGKILL
    pid = int(parent.stdout.strip())
    deadline = time.monotonic() + 10
    while not process_dead(pid):
        assert time.monotonic() < deadline, f"broker {pid} outlived its killed parent"
        time.sleep(0.1)
