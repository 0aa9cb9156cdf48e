"""Events through a real broker become searchable vectors: the ingest issue's guarantees.

Real Tansu broker, real bird photos, the real mobilenetv2_100 weights, the embedded store.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from imgsearch.files import ImageFile, find_images
from ingest_worker.dead_letters import H_REASON, H_STAGE, headers_dict
from ingest_worker.service import WorkerGroup
from shared.components import Components
from shared.events import delete_event, encode, upload_event
from shared.images import decode_image
from shared.kafka import ensure_topics
from tests.conftest import build_settings
from tests.kafka_helpers import (
    merge,
    publish,
    read_topic,
    send_raw,
    settings_env,
    wait_committed,
)

N_IMAGES = 300


def bird_files(birds: Path, n: int) -> list[ImageFile]:
    files = list(find_images([birds]))
    # Spread over species: every k-th file, so the gallery has many labels.
    step = max(1, len(files) // n)
    return files[::step][:n]


def upload(f: ImageFile) -> dict[str, Any]:
    return upload_event(f.image_id, uri=f.path.as_uri(), metadata={"label": f.label})


class Stack:
    """Settings, loaded components and a running worker group, in this process."""

    def __init__(self, settings: Any, embedder: Any, workers: int = 1) -> None:
        self.settings = settings
        ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
        self.components = Components.load(settings, embedder=embedder)
        self.group = WorkerGroup(self.components, count=workers)

    def __enter__(self) -> Stack:
        self.group.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.group.close()
        self.components.close()

    def drain(self, ends: dict[int, int], timeout_s: float = 180.0) -> None:
        wait_committed(self.settings, ends, timeout_s, alive=lambda: self.group.alive)

    @property
    def store(self) -> Any:
        return self.components.store


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, broker: Any, mobilenet_weights: Path,
            data_dir: Path, birds: Path, embedder: Any) -> Iterator[tuple[Stack, list[ImageFile], dict[int, int]]]:
    """300 birds published through Kafka and ingested by one worker."""
    base = tmp_path_factory.mktemp("gallery")
    settings = build_settings(base / "store", broker, mobilenet_weights, [data_dir])
    files = bird_files(birds, N_IMAGES)
    with Stack(settings, embedder) as stack:
        ends = publish(settings, [upload(f) for f in files])
        stack.drain(ends)
        yield stack, files, ends


def test_every_published_image_is_stored_exactly_once(gallery: Any) -> None:
    stack, files, ends = gallery
    assert len(files) == N_IMAGES
    assert stack.store.count() == len({f.image_id for f in files})
    # Replaying the same events (a producer retry, a re-run) changes nothing.
    again = publish(stack.settings, [upload(f) for f in files])
    stack.drain(merge(ends, again))
    assert stack.store.count() == N_IMAGES


def test_every_image_finds_itself_first(gallery: Any) -> None:
    stack, files, _ = gallery
    embedder = stack.components.embedder
    misses = []
    for start in range(0, len(files), 32):
        chunk = files[start : start + 32]
        images = [decode_image(f.path.read_bytes(), max_pixels=10**8) for f in chunk]
        for f, vector in zip(chunk, embedder.embed_images(images), strict=True):
            hit = stack.store.search(vector, limit=1)[0]
            if hit.image_id != f.image_id or hit.score < 0.99:
                misses.append((f.image_id, hit.image_id, hit.score))
    assert misses == []


def _half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)


def _crop80(image: Image.Image) -> Image.Image:
    w, h = image.size
    dw, dh = int(w * 0.1), int(h * 0.1)
    return image.crop((dw, dh, w - dw, h - dh))


def _jpeg30(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=30)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("edit", [_half, _crop80, _jpeg30], ids=["resize50", "crop80", "jpeg30"])
def test_edited_copies_find_their_original(gallery: Any, edit: Any) -> None:
    stack, files, _ = gallery
    embedder = stack.components.embedder
    found = 0
    for start in range(0, len(files), 32):
        chunk = files[start : start + 32]
        copies = [edit(decode_image(f.path.read_bytes(), max_pixels=10**8)) for f in chunk]
        for f, vector in zip(chunk, embedder.embed_images(copies), strict=True):
            found += stack.store.search(vector, limit=1)[0].image_id == f.image_id
    rate = found / len(files)
    print(f"{edit.__name__}: original first for {rate:.3f} of {len(files)}")
    assert rate >= 0.95


def test_deleted_images_disappear_from_results(gallery: Any) -> None:
    stack, files, ends = gallery
    victims = files[:5]
    deleted = publish(stack.settings, [delete_event(f.image_id) for f in victims])
    stack.drain(merge(ends, deleted))
    embedder = stack.components.embedder
    vectors = embedder.embed_images([decode_image(f.path.read_bytes(), max_pixels=10**8) for f in victims])
    for f, vector in zip(victims, vectors, strict=True):
        assert f.image_id not in [h.image_id for h in stack.store.search(vector, limit=20)]
    assert stack.store.get([f.image_id for f in victims]) == {}
    # Uploading again brings it back (the delete is not sticky).
    back = publish(stack.settings, [upload(victims[0])])
    stack.drain(merge(ends, deleted, back))
    assert stack.store.search(vectors[0], limit=1)[0].image_id == victims[0].image_id


def test_two_workers_split_the_partitions(make_settings: Any, embedder: Any, birds: Path) -> None:
    settings = make_settings()
    files = bird_files(birds, 120)
    with Stack(settings, embedder, workers=2) as stack:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            owned = [w.assignment for w in stack.group.workers]
            if all(owned) and sum(len(o) for o in owned) == 4:
                break
            time.sleep(0.2)
        owned = [w.assignment for w in stack.group.workers]
        assert all(owned), f"both workers must own partitions: {owned}"
        assert not (owned[0] & owned[1])
        ends = publish(settings, [upload(f) for f in files])
        stack.drain(ends)
        assert stack.store.count() == len(files)
        assert sum(w.batches_done for w in stack.group.workers) >= 2
        assert all(w.batches_done for w in stack.group.workers), "each worker processed batches"


def _start_worker(settings: Any, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "ingest_worker"], env=settings_env(settings),
                                stdout=out, stderr=subprocess.STDOUT)


def _batches_logged(log: Path) -> int:
    return log.read_text(errors="replace").count(": batch n=")


def test_a_killed_worker_loses_nothing(make_settings: Any, birds: Path, tmp_path: Path) -> None:
    settings = make_settings(batch_size=16, batch_max_wait_ms=50)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    files = bird_files(birds, 300)
    ends = publish(settings, [upload(f) for f in files])
    log = tmp_path / "worker.log"

    worker = _start_worker(settings, log)
    deadline = time.monotonic() + 120
    while _batches_logged(log) < 3 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
    assert _batches_logged(log) >= 3, log.read_text()
    worker.send_signal(signal.SIGKILL)  # no goodbye: mid-stream, offsets as they are
    worker.wait(10)

    worker = _start_worker(settings, log)
    try:
        wait_committed(settings, ends, 180, alive=lambda: worker.poll() is None)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()[-3000:]

    components = Components.load(settings)
    try:
        assert components.store.count() == len(files)
        stored = components.store.get([f.image_id for f in files])
        assert set(stored) == {f.image_id for f in files}
    finally:
        components.close()


def test_bad_events_never_stop_the_worker(make_settings: Any, embedder: Any, birds: Path,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = make_settings()
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    outside.write_bytes(next(iter(find_images([birds]))).path.read_bytes())
    files = bird_files(birds, 40)
    good = [encode(upload(f)) for f in files]
    bad = {
        "invalid_json": (b"k1", b"this is not json"),
        "invalid_event": (b"no-id", json.dumps(
            {**upload(files[0]), "data": {"uri": files[0].path.as_uri()}}).encode()),
        "undecodable": encode(upload_event("garbage", image_bytes=b"\xff\xd8\xff not really a jpeg")),
        "forbidden_uri": encode(upload_event("escape", uri=outside.as_uri())),
    }
    mixed: list[tuple[bytes | None, bytes | None]] = []
    bad_items = list(bad.values())
    for i, message in enumerate(good):
        mixed.append(message)
        if i % 10 == 5 and bad_items:
            mixed.append(bad_items.pop())

    def failures(reason: str) -> float:
        return REGISTRY.get_sample_value("imgsearch_ingest_failures_total",
                                         {"reason": reason, "stage": stage_of[reason]}) or 0.0

    stage_of = {"invalid_json": "parse", "invalid_event": "parse", "undecodable": "decode",
                "forbidden_uri": "fetch"}
    before = {reason: failures(reason) for reason in bad}
    with Stack(settings, embedder) as stack:
        ends = send_raw(settings, mixed)
        stack.drain(ends)
        assert stack.group.alive
        assert stack.store.count() == len(files)
    for reason in bad:
        assert failures(reason) - before[reason] == 1, reason
    dead = read_topic(settings, settings.kafka_dlq_topic, len(bad))
    reasons = sorted(headers_dict(r.headers)[H_REASON] for r in dead)
    assert reasons == sorted(bad)
    by_reason = {headers_dict(r.headers)[H_REASON]: r for r in dead}
    assert by_reason["invalid_json"].value == b"this is not json"  # kept unchanged
    assert headers_dict(by_reason["undecodable"].headers)[H_STAGE] == "decode"
