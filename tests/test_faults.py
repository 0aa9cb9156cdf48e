"""Nothing lost, nothing doubled: crashes, a store outage, bad input, shutdown, a soak.

Real Tansu broker, real photos, the real model and the real embedded store. Figures
(counts per kind, kill points, RSS) are printed; run with -s to see them.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgsearch.files import ImageFile, find_images
from ingest_worker import metrics
from ingest_worker.dead_letters import H_OFFSET, H_REASON, H_TOPIC, headers_dict
from ingest_worker.service import WorkerGroup
from shared.components import Components
from shared.events import encode, upload_event
from shared.kafka import ensure_topics
from tests.bad_inputs import build_corpus
from tests.faults import FlakyStore
from tests.http_fixtures import image_server
from tests.kafka_helpers import committed, publish, read_topic, send_raw, settings_env, wait_committed

pytestmark = pytest.mark.slow


def upload(f: ImageFile, **meta: Any) -> dict[str, Any]:
    return upload_event(f.image_id, uri=f.path.as_uri(), metadata={"label": f.label, **meta})


def start_worker(settings: Any, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ingest_worker"], env=settings_env(settings),
                                stdout=out, stderr=subprocess.STDOUT)


def batches_logged(log: Path) -> int:
    return log.read_text(errors="replace").count(": batch n=")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def all_photos(data_dir: Path) -> list[ImageFile]:
    return list(find_images([data_dir / "birds"])) + list(find_images([data_dir / "imagenet-sample"]))


def test_twenty_kills_lose_nothing_and_keep_the_last_version(
        make_settings: Any, all_photos: list[ImageFile], tmp_path: Path) -> None:
    settings = make_settings(batch_size=32, batch_max_wait_ms=50, kafka_session_timeout_ms=3000,
                             kafka_heartbeat_interval_ms=300)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    rng = random.Random(20261121)
    originals = all_photos[:2800]
    updated = rng.sample(originals, 300)  # a second version of these comes later in the stream
    events = [upload(f, version=1) for f in originals]
    v2 = [upload(f, version=2) for f in updated]
    stream = events[:1500] + v2[:150] + events[1500:] + v2[150:]
    assert len(stream) >= 3000
    # What each image must end as: its last event in stream order (some v2 precede their v1).
    last_event = {e["data"]["image_id"]: e for e in stream}
    ends = publish(settings, stream)

    log = tmp_path / "worker.log"
    kills = []
    for _ in range(20):
        worker = start_worker(settings, log)
        before = batches_logged(log)
        deadline = time.monotonic() + 90
        while batches_logged(log) <= before and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(rng.uniform(0.0, 2.0))  # a random point: mid-batch, mid-commit, idle
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        kills.append(batches_logged(log))
    print(f"\n20 SIGKILLs after batch counts {kills}")

    worker = start_worker(settings, log)
    try:
        wait_committed(settings, ends, 600, alive=lambda: worker.poll() is None)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0

    components = Components.load(settings)
    try:
        ids = [f.image_id for f in originals]
        assert components.store.count() == len(ids), "lost or duplicate points"
        stored = components.store.get(ids)
        lost = sorted(set(ids) - set(stored))
        stale = sorted(i for i, s in stored.items() if s.payload["event_id"] != last_event[i]["id"])
        print(f"events={len(stream)} images={len(ids)} lost={len(lost)} stale={len(stale)}")
        assert lost == [] and stale == []
        for f in updated:
            want = last_event[f.image_id]["data"]["metadata"]["version"]
            assert stored[f.image_id].payload["metadata"]["version"] == want
    finally:
        components.close()


def test_a_sixty_second_store_outage_delays_but_loses_nothing(
        make_settings: Any, embedder: Any, all_photos: list[ImageFile]) -> None:
    settings = make_settings(batch_size=16, store_retry_max_s=5.0)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    components = Components.load(settings, embedder=embedder)
    flaky = FlakyStore(components.store)
    components.store = flaky
    group = WorkerGroup(components, count=1)
    worker = group.workers[0]
    files = all_photos[100:700]
    try:
        group.start()
        ends = publish(settings, [upload(f) for f in files])
        deadline = time.monotonic() + 120
        while worker.batches_done < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assignment = worker.assignment
        retries_before = metrics.RETRIES.labels("store")._value.get()
        flaky.fail_for(60)
        outage_end = time.monotonic() + 60
        samples = []
        while time.monotonic() < outage_end:
            samples.append((worker.ready, worker.assignment == assignment, group.alive))
            time.sleep(1)
        assert all(alive for _, _, alive in samples), "the worker thread died"
        assert all(same for _, same, _ in samples), "the worker lost its partitions during the outage"
        assert not any(ready for ready, _, _ in samples[5:]), "the worker claimed readiness while the store was down"
        assert metrics.RETRIES.labels("store")._value.get() > retries_before
        assert committed(settings) != ends  # nothing committed past the failing batch
        wait_committed(settings, ends, 300, alive=lambda: group.alive)
        assert worker.ready
        assert worker.revocations == 0, "the worker left its group (max.poll.interval expired)"
        assert flaky.count() == len(files)
        print(f"\noutage: {flaky.refused_calls} store calls refused, worker kept "
              f"{len(assignment)} partitions, then stored all {len(files)}")
    finally:
        group.close()
        components.close()


@pytest.fixture
def corpus_dirs(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    inside = tmp_path / "uploads"
    inside.mkdir()
    outside = tmp_path_factory.mktemp("not-a-root")
    yield inside, outside


def test_bad_input_corpus_lands_in_the_dlq_with_reasons(
        make_settings: Any, embedder: Any, all_photos: list[ImageFile],
        corpus_dirs: tuple[Path, Path]) -> None:
    inside, outside = corpus_dirs
    good_files = all_photos[1000:1100]
    good_jpeg = good_files[0].path.read_bytes()
    with image_server({"good.jpg": good_jpeg}) as server:
        settings = make_settings(
            image_file_roots=[all_photos[0].path.parents[2], inside],
            fetch_allowed_networks=["127.0.0.1/32"], fetch_timeout_s=1.0, fetch_retries=1,
            batch_size=16,
        )
        corpus = build_corpus(inside, outside, server, good_jpeg)
        kinds = {c.kind for c in corpus}
        assert len(kinds) >= 30
        good = [encode(upload(f)) for f in good_files]
        good.append(encode(upload_event("from-http", uri=f"{server}/img/good.jpg")))
        mixed: list[tuple[bytes | None, bytes | None]] = []
        bad_iter = iter(corpus)
        for i, message in enumerate(good):
            mixed.append(message)
            if i % 2 == 1:
                bad = next(bad_iter, None)
                if bad is not None:
                    mixed.append((bad.key, bad.value))
        mixed.extend((b.key, b.value) for b in bad_iter)

        ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
        components = Components.load(settings, embedder=embedder)
        group = WorkerGroup(components, count=1)
        try:
            group.start()
            ends = send_raw(settings, mixed)
            wait_committed(settings, ends, 300, alive=lambda: group.alive)
            assert group.alive and not group.errors
            assert components.store.count() == len(good)
        finally:
            group.close()
            components.close()

    dead = read_topic(settings, settings.kafka_dlq_topic, len(corpus), timeout_s=60)
    got = {r.key.decode(): headers_dict(r.headers) for r in dead}
    expected = {c.key.decode(): c.reason for c in corpus}
    assert len(dead) == len(corpus), "each bad event is dead-lettered exactly once"
    wrong = {k: (got.get(k, {}).get(H_REASON), want) for k, want in expected.items()
             if got.get(k, {}).get(H_REASON) != want}
    assert wrong == {}
    for record in dead:
        errors = headers_dict(record.headers)
        assert errors[H_TOPIC] == settings.kafka_topic and errors[H_OFFSET].isdigit()
    by_value = {c.key: c.value for c in corpus}
    assert all(r.value == by_value[r.key] for r in dead), "dead letters are kept unchanged"
    per_reason: dict[str, int] = {}
    for c in corpus:
        per_reason[c.reason] = per_reason.get(c.reason, 0) + 1
    print(f"\n{len(corpus)} bad kinds, all dead-lettered; {len(good)} good stored. Per reason: {per_reason}")


def test_one_poison_pill_does_not_hold_back_its_batch(
        make_settings: Any, embedder: Any, all_photos: list[ImageFile]) -> None:
    settings = make_settings(batch_size=64, batch_max_wait_ms=2000)
    components = Components.load(settings, embedder=embedder)
    try:
        from shared.events import parse_event
        from shared.pipeline.stages import WorkItem

        files = all_photos[2000:2063]
        messages = [encode(upload(f))[1] for f in files]
        messages.insert(31, encode(upload_event("poison", image_bytes=b"\xff\xd8\xffgarbage"))[1])
        items = [WorkItem(i, parse_event(m)) for i, m in enumerate(messages)]
        report = components.ingest(items)
        assert len(items) == 64
        assert report.count("stored") == 63 and report.count("failed") == 1
        assert report.failures[0].item.event.image_id == "poison"
        assert components.store.count() == 63
    finally:
        components.close()


def test_sigterm_under_load_stops_quickly_and_loses_nothing(
        make_settings: Any, all_photos: list[ImageFile], tmp_path: Path) -> None:
    settings = make_settings(batch_size=32)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    files = all_photos[:800]
    ends = publish(settings, [upload(f) for f in files])
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    deadline = time.monotonic() + 120
    while batches_logged(log) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    asked = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(30)
    took = time.monotonic() - asked
    print(f"\nSIGTERM -> exit {code} in {took:.1f}s")
    assert code == 0 and took < 20, log.read_text()[-2000:]

    # Everything committed is stored; the rest follows on restart.
    done = committed(settings)
    components = Components.load(settings)
    try:
        stored = set(components.store.get([f.image_id for f in files]))
    finally:
        components.close()
    assert sum(done.values()) <= len(stored)
    worker = start_worker(settings, log)
    try:
        wait_committed(settings, ends, 300, alive=lambda: worker.poll() is None)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    components = Components.load(settings)
    try:
        assert components.store.count() == len(files)
    finally:
        components.close()


@pytest.mark.parametrize("after_s", [0.3, 2.0])
def test_sigterm_while_starting_is_a_clean_stop(make_settings: Any, tmp_path: Path,
                                                after_s: float) -> None:
    """A scale-down right after a scale-up stops workers that are still importing torch or
    loading the model: that is a clean stop (status 0), not death by signal (-15)."""
    settings = make_settings()
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    time.sleep(after_s)
    assert worker.poll() is None, log.read_text()[-2000:]
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(60)
    assert code == 0, log.read_text()[-2000:]


def test_soak_ten_thousand_events_memory_stays_flat(
        make_settings: Any, all_photos: list[ImageFile], tmp_path: Path) -> None:
    settings = make_settings(batch_size=32)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    stream = [upload(f, round=r) for r in range(3) for f in all_photos]  # metadata changes: re-embed
    stream = stream[:10_000]
    assert len(stream) == 10_000
    ends = publish(settings, stream)
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    samples: list[tuple[float, int, int]] = []  # (time, batches, rss)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and worker.poll() is None:
            try:
                samples.append((time.monotonic(), batches_logged(log), rss_bytes(worker.pid)))
            except (FileNotFoundError, RuntimeError):
                return
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        wait_committed(settings, ends, 1200, alive=lambda: worker.poll() is None)
    finally:
        stop.set()
        sampler.join()
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    total_batches = samples[-1][1]
    warm = [rss for _, b, rss in samples if b >= total_batches * 0.1]
    start, peak, end = warm[0], max(warm), warm[-1]
    mib = 1024 * 1024
    print(f"\nsoak: 10,000 events in {samples[-1][0] - samples[0][0]:.0f}s; RSS after warm-up "
          f"{start / mib:.0f} MiB, peak {peak / mib:.0f} MiB, end {end / mib:.0f} MiB "
          f"({len(samples)} samples)")
    third = max(1, len(warm) // 3)
    first, last = sorted(warm[:third])[third // 2], sorted(warm[-third:])[third // 2]
    print(f"soak: median RSS first third {first / mib:.0f} MiB, last third {last / mib:.0f} MiB")
    assert end - start < 150 * mib, "RSS grew by more than 150 MiB over the soak"
    assert last - first < 100 * mib, "RSS trends upwards: a leak"
    # Transient peaks come from batches of large photos in flight; they must stay bounded.
    assert peak - start < 512 * mib
