"""No event, image or rebalance can stop ingest (issue: robustness).

Real Tansu broker, real photos, the real model and the real embedded store:

1. a seeded Hypothesis corpus of 2,000 hostile messages mixed into 300 good events;
2. group changes during a 3,000-event stream: consumers join and leave 10 times, and a
   worker process receives SIGTERM;
3. a fault injected into each thread of a real worker process: a dead letter or a
   non-zero exit follows within 10 s, and the worker never says ready while stalled.

Sizes are the issue's; ``IMGSEARCH_ROBUSTNESS_SCALE`` multiplies them for a longer soak.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from imgsearch.files import ImageFile, find_images
from ingest_worker.dead_letters import H_OFFSET, H_PARTITION, H_REASON, H_STAGE, headers_dict
from ingest_worker.service import WorkerGroup
from shared.components import Components
from shared.events import encode, upload_event
from shared.kafka import ensure_topics
from tests.conftest import REPO, free_port
from tests.hostile_events import STORED, Hostile, hostile_events, odd_but_valid
from tests.kafka_helpers import publish, settings_env, wait_committed

pytestmark = pytest.mark.slow

SCALE = float(os.environ.get("IMGSEARCH_ROBUSTNESS_SCALE", "1"))
Position = tuple[int, int]  # partition, offset


def generate(strategy: st.SearchStrategy[Any], count: int, at_seed: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same ones on every run (seeded)."""
    out: list[Any] = []

    @seed(at_seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    while len(out) < count:
        collect()
    return out[:count]


def send_tracked(settings: Any, messages: list[tuple[bytes | None, bytes | None]]) -> list[Position]:
    """Send as a plain producer would; return each message's (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all",
                             linger_ms=5, max_request_size=64 * 1024 * 1024)
    try:
        futures = [producer.send(settings.kafka_topic, key=k, value=v) for k, v in messages]
        producer.flush()
        return [(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
    finally:
        producer.close()


def ends_of(positions: list[Position]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for partition, offset in positions:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def read_all(settings: Any, topic: str, at_least: int, timeout_s: float = 90.0) -> list[Any]:
    """Every record of ``topic``: at least ``at_least``, then until 3 s pass with no more."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        consumer.seek_to_beginning()
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
            records += batch
            if batch:
                quiet_since = time.monotonic()
            elif len(records) >= at_least and time.monotonic() - quiet_since > 3.0:
                break
        return records
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def photos(data_dir: Path) -> list[ImageFile]:
    return list(find_images([data_dir / "birds"])) + list(find_images([data_dir / "imagenet-sample"]))


# -- 1. a hostile corpus -------------------------------------------------------------------------


def test_a_generated_hostile_corpus_never_stops_the_worker(
        make_settings: Any, embedder: Any, photos: list[ImageFile], tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> None:
    inside = tmp_path / "uploads"
    inside.mkdir()
    outside = tmp_path_factory.mktemp("not-a-root")
    good_b64 = base64.b64encode(photos[0].path.read_bytes()).decode()
    n_hostile, n_good = int(2000 * SCALE), int(300 * SCALE)
    hostile: list[Hostile] = generate(hostile_events(inside, outside, good_b64), n_hostile, 20261129)
    odd = generate(odd_but_valid(), max(1, n_good // 4), 20261130)
    birds = photos[100:100 + n_good - len(odd)]

    good: list[tuple[str, tuple[bytes | None, bytes | None]]] = []
    for n, data in enumerate(odd):
        image_id = f"odd/{n}"
        good.append((image_id, encode(upload_event(image_id, image_bytes=data))))
    for f in birds:
        good.append((f.image_id, encode(upload_event(f.image_id, uri=f.path.as_uri(),
                                                     metadata={"label": f.label}))))
    rng = random.Random(20261129)
    stream: list[tuple[Hostile | str, tuple[bytes | None, bytes | None]]] = (
        [(h, (h.key, h.value)) for h in hostile] + [(image_id, msg) for image_id, msg in good])
    rng.shuffle(stream)
    assert len(hostile) >= 2000 * SCALE and len(good) == n_good
    print(f"\ncategories: {dict(Counter(h.category for h in hostile))}")

    settings = make_settings(image_file_roots=[data_dir, inside], fetch_retries=0,
                             fetch_timeout_s=2.0, batch_size=32)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    components = Components.load(settings, embedder=embedder)
    group = WorkerGroup(components, count=1)
    started = time.monotonic()
    try:
        group.start()
        positions = send_tracked(settings, [message for _, message in stream])
        wait_committed(settings, ends_of(positions), 600 * SCALE,
                       alive=lambda: group.alive and not group.errors)
        elapsed = time.monotonic() - started
        assert group.alive and not group.errors, f"the worker stopped: {group.errors}"
        assert group.health().ready, group.health().reason
        ids = [image_id for image_id, _ in good]
        stored = components.store.get(ids)
        assert sorted(set(ids) - set(stored)) == [], "good images lost"
        assert components.store.count() == len(set(ids)), "every good image is stored once"
    finally:
        group.close()
        components.close()

    expected = {pos: item.outcome for (item, _), pos in zip(stream, positions, strict=True)
                if isinstance(item, Hostile)}
    letters = read_all(settings, settings.kafka_dlq_topic, len(expected))
    got: dict[Position, list[str]] = {}
    for record in letters:
        errors = headers_dict(record.headers)
        got.setdefault((int(errors[H_PARTITION]), int(errors[H_OFFSET])), []).append(errors[H_REASON])
    doubled = {pos: reasons for pos, reasons in got.items() if len(reasons) > 1}
    assert doubled == {}, "each bad event is dead-lettered once"
    assert set(got) == set(expected), "exactly the bad events are dead-lettered"
    category = {pos: item.category for (item, _), pos in zip(stream, positions, strict=True)
                if isinstance(item, Hostile)}
    wrong = Counter((category[pos], want, got[pos][0]) for pos, want in expected.items()
                    if got[pos][0] != want)
    assert not wrong, f"(category, expected, got): {wrong}"
    assert STORED not in expected.values()
    reasons = Counter(expected.values())
    print(f"{len(hostile)} hostile + {len(good)} good events in {elapsed:.0f}s; dead letters by "
          f"reason: {dict(reasons)}")


# -- 2. group changes ----------------------------------------------------------------------------


def start_worker_process(settings: Any, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ingest_worker"],
                                env={**settings_env(settings), **env}, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


def test_group_changes_lose_nothing_and_double_nothing(
        make_settings: Any, embedder: Any, photos: list[ImageFile], tmp_path: Path) -> None:
    settings = make_settings(batch_size=16, batch_max_wait_ms=50, worker_shutdown_timeout_s=20)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=6)
    rng = random.Random(20261129)
    n_images = int(2700 * SCALE)
    originals = photos[:n_images] if n_images <= len(photos) else photos
    updated = rng.sample(originals, len(originals) // 9)
    v1 = [upload_event(f.image_id, uri=f.path.as_uri(), metadata={"version": 1}) for f in originals]
    v2 = [upload_event(f.image_id, uri=f.path.as_uri(), metadata={"version": 2}) for f in updated]
    half = len(v1) // 2
    stream = v1[:half] + v2[: len(v2) // 2] + v1[half:] + v2[len(v2) // 2:]
    assert len(stream) >= 3000 * min(SCALE, 1)
    last_event = {e["data"]["image_id"]: e["id"] for e in stream}
    chunks = [stream[i:i + 100] for i in range(0, len(stream), 100)]
    ends: dict[int, int] = {}

    # Phase 1: a worker process takes the first part of the stream and gets SIGTERM mid-way.
    log = tmp_path / "worker.log"
    process = start_worker_process(settings, log)
    for chunk in chunks[:8]:
        for p, o in publish(settings, chunk).items():
            ends[p] = max(ends.get(p, 0), o)
    deadline = time.monotonic() + 120
    while log.read_text(errors="replace").count(": batch n=") < 4 and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-3000:]

    # Phase 2: one steady consumer, and ten others that join and leave while the rest arrives.
    components = Components.load(settings, embedder=embedder)
    anchor = WorkerGroup(components, count=1, name="steady")
    joiners: list[WorkerGroup] = []
    changes = 0
    publishing_done = threading.Event()

    def produce() -> None:
        for chunk in chunks[8:]:
            for p, o in publish(settings, chunk).items():
                ends[p] = max(ends.get(p, 0), o)
            time.sleep(0.3)
        publishing_done.set()

    def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert anchor.alive and not anchor.errors, anchor.errors
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    steady = anchor.workers[0]
    try:
        anchor.start()
        producer = threading.Thread(target=produce, name="produce")
        producer.start()
        while changes < 10:
            # The steady worker holds every partition, with work in flight; a peer joins
            # and takes some of them away mid-stream, then leaves (every third one
            # abruptly, abandoning its own work in flight) and they come back.
            wait_until(lambda: len(steady.assignment) == 6, "the steady worker to own all")
            joiner = WorkerGroup(components, count=1, name=f"joiner{changes}")
            joiner.start()
            joiners.append(joiner)
            wait_until(lambda: bool(joiner.workers[0].assignment), "the joiner's partitions")
            time.sleep(rng.uniform(1.0, 3.0))
            if changes % 3 == 2:
                for worker in joiner.workers:
                    worker.abort()
            joiner.close()
            assert not joiner.errors, joiner.errors
            changes += 1
        producer.join(300)
        assert publishing_done.is_set()
        wait_committed(settings, ends, 900 * SCALE, alive=lambda: anchor.alive and not anchor.errors)
        revocations = steady.revocations
        assert revocations >= 10, "each join took partitions from the steady worker"
        ids = [f.image_id for f in originals]
        assert components.store.count() == len(ids), "lost or doubled points"
        stored = components.store.get(ids)
        lost = sorted(set(ids) - set(stored))
        stale = sorted(i for i, s in stored.items() if s.payload["event_id"] != last_event[i])
        print(f"\n{len(stream)} events, {changes} joins and leaves ({revocations} revocations of "
              f"the steady worker), 1 SIGTERM: lost={len(lost)} stale={len(stale)}")
        assert lost == [] and stale == [], f"lost {lost[:5]}, stale {stale[:5]}"
    finally:
        for joiner in joiners:
            joiner.close()
        anchor.close()
        components.close()
    assert not anchor.errors and all(not j.errors for j in joiners)
    letters = read_all(settings, settings.kafka_dlq_topic, 0, timeout_s=10)
    assert letters == [], "no good event was dead-lettered"


# -- 3. injected faults ------------------------------------------------------------------------


class FaultWorker:
    """``tests/fault_worker.py FAULT``: the real worker process with one fault injected."""

    def __init__(self, settings: Any, fault: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "fault_worker.py"), fault],
                env={**settings_env(settings), "WORKER_METRICS_HOST": "127.0.0.1",
                     "WORKER_METRICS_PORT": str(self.port), **env},
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def probe(self, path: str = "/readyz") -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Ready, and holding its partitions (the group join has completed)."""
        deadline = time.monotonic() + timeout_s
        while self.probe() != 200 or ": assigned " not in self.output():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"never ready:\n{self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def _events(n: int, photos: list[ImageFile], prefix: str = "") -> list[dict[str, Any]]:
    return [upload_event(prefix + f.image_id, uri=f.path.as_uri()) for f in photos[:n]]


def _poison(photo: ImageFile) -> dict[str, Any]:
    return upload_event("poison-1", uri=photo.path.as_uri())


@pytest.fixture
def fault_settings(make_settings: Any) -> Callable[..., Any]:
    def build(**overrides: Any) -> Any:
        settings = make_settings(batch_size=8, batch_max_wait_ms=50, **overrides)
        ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=2)
        return settings
    return build


EVENT_FAULTS = {"prepare-event": "decode", "embed-event": "embed", "write-event": "upsert"}


@pytest.mark.parametrize("fault", sorted(EVENT_FAULTS))
def test_a_fault_about_one_event_dead_letters_it_and_the_worker_goes_on(
        fault: str, fault_settings: Callable[..., Any], photos: list[ImageFile],
        tmp_path: Path) -> None:
    settings = fault_settings()
    worker = FaultWorker(settings, fault, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        before = _events(10, photos[200:])
        publish(settings, before)
        poisoned_at = time.monotonic()
        ends = publish(settings, [_poison(photos[0])] + _events(10, photos[300:]))
        letters = read_all(settings, settings.kafka_dlq_topic, 1, timeout_s=10)
        took = time.monotonic() - poisoned_at
        assert len(letters) == 1, worker.output()
        errors = headers_dict(letters[0].headers)
        assert letters[0].key == b"poison-1" and errors[H_REASON] == "internal_error"
        assert errors[H_STAGE] == EVENT_FAULTS[fault]
        assert "injected" in errors["__connect.errors.exception.message"]
        assert "Traceback" in errors["__connect.errors.exception.stacktrace"]
        assert took < 10, f"dead letter after {took:.1f}s"
        wait_committed(settings, ends, 60, alive=lambda: worker.process.poll() is None)
        assert worker.probe() == 200 and worker.probe("/healthz") == 200
    finally:
        code = worker.stop()
    assert code == 0, worker.output()
    print(f"\n{fault}: dead-lettered in {took:.1f}s as internal_error ({errors[H_STAGE]}), "
          "worker carried on")


THREAD_FAULTS = ["prepare-thread", "embed-thread", "write-thread", "consume-loop",
                 "dead-letters", "rebalance", "probes"]


@pytest.mark.parametrize("fault", THREAD_FAULTS)
def test_a_fault_in_a_thread_exits_the_worker_non_zero(
        fault: str, fault_settings: Callable[..., Any], photos: list[ImageFile],
        tmp_path: Path) -> None:
    settings = fault_settings()
    worker = FaultWorker(settings, fault, tmp_path / "worker.log")
    intruder = None
    try:
        worker.wait_ready()
        started = time.monotonic()
        if fault == "rebalance":
            from shared.kafka import make_consumer

            # A peer joins and partitions move; the broker completes the join in a few
            # seconds (Tansu: about half the session timeout), so this one gets longer.
            intruder = make_consumer(settings)
            deadline = time.monotonic() + 30
            while worker.process.poll() is None and time.monotonic() < deadline:
                intruder.poll(timeout_ms=200)
        elif fault != "probes":  # probes: the metrics server dies 8 s after start-up
            publish(settings, _events(4, photos[400:]) + [_poison(photos[1])])
        code = worker.process.wait(40)
        took = time.monotonic() - started
    finally:
        if intruder is not None:
            intruder.close(autocommit=False)
        worker.stop()
    assert code == 1, worker.output()
    assert took < (25 if fault == "rebalance" else 10), f"exited after {took:.1f}s"
    assert "must restart" in worker.output()
    print(f"\n{fault}: exit status {code} {took:.1f}s after the fault")


def test_a_stalled_worker_is_never_ready_and_exits(
        fault_settings: Callable[..., Any], photos: list[ImageFile], tmp_path: Path) -> None:
    settings = fault_settings()
    worker = FaultWorker(settings, "stall", tmp_path / "worker.log",
                         WORKER_STALL_TIMEOUT_S="2")
    try:
        worker.wait_ready()
        publish(settings, [_poison(photos[2])])
        stalled_at = time.monotonic()
        samples: list[tuple[float, int | None]] = []
        while worker.process.poll() is None and time.monotonic() - stalled_at < 30:
            samples.append((time.monotonic() - stalled_at, worker.probe()))
            time.sleep(0.1)
        code = worker.process.wait(30)
        took = time.monotonic() - stalled_at
    finally:
        worker.stop()
    print(f"\nreadiness samples (s after publishing, status): {samples[::5]}")
    first_unready = next(t for t, status in samples if status != 200)
    assert all(status != 200 for t, status in samples if t >= first_unready), \
        "ready again while still stalled"
    assert first_unready < 2 + 1.5, f"still ready {first_unready:.1f}s into a 2 s stall bound"
    assert code == 1 and took < 10, (code, took, worker.output())
    print(f"\nstall: unready after {first_unready:.1f}s, exit {code} after {took:.1f}s")
