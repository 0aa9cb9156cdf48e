"""Changing the model of a live index (issue 16): versioned collections, a background
re-index with dual-writes, a gated atomic swap, rollback. Real broker (Tansu), real embedded
store, real photos, the real mobilenetv2_100.

1. **A live migration.** 1,500 bird photos indexed with spec A (mobilenetv2_100, full
   float32 vectors) are migrated to spec B (the same model through a 320-d random rotation,
   int8) while 16 clients query the API and a producer uploads 150 images and deletes 50.
   No query fails; answers come from A before the swap and from B after it, with no gap; B
   then holds exactly the 1,600 live images.
2. **Crash and resume.** `imgsearch reindex start` is SIGKILLed halfway; started again, it
   resumes from its checkpoint and ends in the same state an uninterrupted run gives.
3. **Rollback.** Rolling back makes A serve again, with the uploads and deletes made during
   the migration.
4. **The embedded stack.** `imgsearch up` with a new spec on A's data directory serves
   throughout, swaps, and the next start serves B; the operator commands work beside it.

Also: a migration to another architecture (random weights), after which a process still
configured for the old model follows the index instead of refusing to start.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shared.events import ImageUploaded, delete_event, upload_event
from shared.pipeline.stages import WorkItem
from tests.conftest import MOBILENET, REPO, build_settings, free_port
from tests.kafka_helpers import merge, publish, wait_committed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GALLERY = 1500
INLINE_IN_GALLERY = 20  # indexed from inline bytes: the backfill needs their kept copies
UPLOADS_URI, UPLOADS_INLINE, DELETES = 100, 50, 50
CLIENTS, SEARCHING_CLIENTS = 16, 4  # of which this many POST photos; the rest ask /similar
SPEC_B = "random:320+int8"


@dataclass
class Photo:
    image_id: str
    path: Path
    label: str


def bird_photos(birds: Path) -> list[Photo]:
    photos = [Photo(f"b/{p.parent.name}/{p.name}", p, p.parent.name)
              for p in sorted(birds.glob("*/*.jpg"))]
    random.Random(16).shuffle(photos)
    return photos


@dataclass
class Answer:
    client: int
    kind: str
    started: float
    ended: float
    status: int
    spec: str | None
    image_id: str | None = None


@dataclass
class Live:
    settings: Any
    url: str
    spec_a: str
    spec_b: str
    live_ids: set[str]
    uploads: list[Photo]
    inline_uploads: list[Photo]
    deleted: list[str]
    answers: list[Answer]
    swap_called: float
    swap_returned: float
    migration_started: float
    backfill: dict[str, Any]
    counts: dict[str, int]
    ids: dict[str, set[str]]
    reindex: Any
    components: Any
    timings: dict[str, float] = field(default_factory=dict)


class Clients:
    """``CLIENTS`` threads querying the API continuously, each request recorded."""

    def __init__(self, url: str, stable: list[Photo]) -> None:
        self.url = url
        self.stable = stable
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(CLIENTS)]

    def start(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        searching = n < SEARCHING_CLIENTS
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                photo = rng.choice(self.stable)
                started = time.monotonic()
                try:
                    if searching:
                        r = client.post("/search", params={"limit": 5},
                                        content=photo.path.read_bytes(),
                                        headers={"Content-Type": "image/jpeg"})
                    else:
                        r = client.get(f"/images/{photo.image_id}/similar",
                                       params={"limit": 5})
                    status, spec = r.status_code, r.headers.get("x-imgsearch-spec")
                    body_spec = r.json().get("spec") if status == 200 else None
                    assert body_spec == spec or status != 200, (body_spec, spec)
                except httpx.HTTPError:
                    status, spec = 0, None
                answer = Answer(n, "search" if searching else "similar", started,
                                time.monotonic(), status, spec, photo.image_id)
                with self._lock:
                    self.answers.append(answer)
                self.stop.wait(0.1 if searching else 0.03)

    def finish(self) -> list[Answer]:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return list(self.answers)


def _latency(answers: list[Answer], start: float, end: float) -> str:
    took = sorted((a.ended - a.started) * 1000 for a in answers if start <= a.started < end)
    if not took:
        return "no queries"
    p95 = took[int(0.95 * (len(took) - 1))]
    return (f"{len(took)} queries, {len(took) / max(end - start, 1e-9):.0f}/s, p50 "
            f"{statistics.median(took):.0f} ms, p95 {p95:.0f} ms, max {took[-1]:.0f} ms")


@pytest.fixture(scope="module")
def live(broker: Any, mobilenet_weights: Path, birds: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from ingest_worker.service import WorkerGroup
    from query_api.app import create_app
    from query_api.server import BackgroundServer
    from shared.components import Components
    from shared.kafka import EventPublisher, ensure_topics
    from shared.reindex.controller import Reindex
    from shared.reindex.runner import Runner
    from shared.reindex.spec import spec_overrides
    from shared.reindex.specs import SpecSet

    tmp = tmp_path_factory.mktemp("live")
    settings = build_settings(tmp / "store", broker, mobilenet_weights, [birds],
                              api_port=free_port(), api_warmup=False, reindex_poll_s=0.5,
                              reindex_finish_grace_s=1.0, batch_max_wait_ms=50)
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
    photos = bird_photos(birds)
    gallery = photos[:GALLERY]
    uploads = photos[GALLERY:GALLERY + UPLOADS_URI]
    inline_uploads = photos[GALLERY + UPLOADS_URI:GALLERY + UPLOADS_URI + UPLOADS_INLINE]
    rng = random.Random(50)
    deleted = [p.image_id for p in rng.sample(gallery[INLINE_IN_GALLERY:], DELETES)]
    stable = [p for p in gallery if p.image_id not in set(deleted)]

    components = Components.load(settings)
    timings: dict[str, float] = {}
    started = time.monotonic()
    report = components.ingest([
        WorkItem(p.image_id, ImageUploaded(
            f"a-{n}", "tests", p.image_id, None if n < INLINE_IN_GALLERY else p.path.as_uri(),
            p.path.read_bytes() if n < INLINE_IN_GALLERY else None, {"label": p.label}))
        for n, p in enumerate(gallery)])
    assert report.count("stored") == GALLERY, report.summary()
    components.store.optimize()
    timings["index_a_img_s"] = GALLERY / (time.monotonic() - started)

    specs = SpecSet(components)
    specs.start()
    group = WorkerGroup(components, count=2, specs=specs)
    group.start()
    publisher = EventPublisher(settings)
    server = BackgroundServer(create_app(components, settings=settings, publisher=publisher,
                                         specs=specs), port=settings.api_port).start()
    try:
        spec_a = httpx.get(f"{server.url}/readyz", timeout=30).json()["spec"]
        clients = Clients(server.url, stable).start()
        time.sleep(3.0)  # the baseline: queries before any migration
        reindex = Reindex(specs, say=print)
        migration_started = time.monotonic()
        migration = reindex.start(spec_overrides(variant=SPEC_B))
        runner = Runner(reindex, swap=False)
        runner.start(None)

        # The producer: uploads (by uri and inline) and deletes while the backfill runs.
        envelopes = (
            [upload_event(p.image_id, uri=p.path.as_uri(), metadata={"label": p.label})
             for p in uploads]
            + [upload_event(p.image_id, image_bytes=p.path.read_bytes(),
                            metadata={"label": p.label}) for p in inline_uploads]
            + [delete_event(i) for i in deleted])
        random.Random(7).shuffle(envelopes)
        ends: dict[int, int] = {}
        for start in range(0, len(envelopes), 25):
            ends = merge(ends, publish(settings, envelopes[start:start + 25]))
            time.sleep(1.0)
        wait_committed(settings, ends, timeout_s=300, alive=lambda: group.alive)
        runner.thread.join(600)  # type: ignore[union-attr]
        assert runner.error is None, runner.error
        assert runner.result is not None, "the backfill stopped"
        backfill = dict(reindex.migration().progress)  # type: ignore[union-attr]

        swap_called = time.monotonic()
        reindex.swap()
        swap_returned = time.monotonic()
        time.sleep(3.0)
        answers = clients.finish()
        timings.update(swap_s=swap_returned - swap_called,
                       migration_s=swap_returned - migration_started)
        spec_b = httpx.get(f"{server.url}/readyz", timeout=30).json()["spec"]
        source = specs.components(migration.source)
        target = specs.components(migration.target)
        assert source is not None and target is not None
        ids = {name: {i.image_id for i in c.store.scroll_images(("image_id",))}
               for name, c in (("a", source), ("b", target))}
        live_ids = {p.image_id for p in stable} | {p.image_id for p in uploads + inline_uploads}
        yield Live(settings, server.url, spec_a, spec_b, live_ids, uploads, inline_uploads,
                   deleted, answers, swap_called, swap_returned, migration_started, backfill,
                   {"a": source.store.count(), "b": target.store.count()}, ids, reindex,
                   components, timings)
    finally:
        server.stop()
        group.close()
        publisher.close()
        specs.close()
        components.close()


def test_a_live_migration_fails_no_query(live: Live) -> None:
    failed = [a for a in live.answers if a.status != 200]
    searched = sum(a.kind == "search" for a in live.answers)
    print(f"\n{len(live.answers)} queries ({searched} by photo, the rest /similar), "
          f"{len(failed)} failed")
    assert not failed, failed[:5]
    assert len(live.answers) > 1000 and searched > 100


def test_answers_come_from_a_until_the_swap_and_from_b_after_it_without_a_gap(
        live: Live) -> None:
    assert live.spec_a != live.spec_b and live.spec_b
    assert {a.spec for a in live.answers} == {live.spec_a, live.spec_b}
    before = [a for a in live.answers if a.ended < live.swap_called]
    after = [a for a in live.answers if a.started > live.swap_returned]
    assert before and after
    assert all(a.spec == live.spec_a for a in before)
    assert all(a.spec == live.spec_b for a in after)
    for n in range(CLIENTS):  # each client sees A, then B, never back
        seen = [a.spec for a in live.answers if a.client == n]
        assert seen == sorted(seen, key=lambda s: s == live.spec_b), n
    # No gap: queries kept completing through the swap.
    ends = sorted(a.ended for a in live.answers
                  if live.swap_called - 5 < a.ended < live.swap_returned + 3)
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    assert ends and max(gaps) < 1.0, max(gaps)
    t0 = min(a.started for a in live.answers)
    print(f"\nbefore the migration: {_latency(live.answers, t0, live.migration_started)}"
          f"\nduring the backfill:  {_latency(live.answers, live.migration_started, live.swap_called)}"
          f"\naround the swap (±2 s): {_latency(live.answers, live.swap_called - 2, live.swap_returned + 2)}"
          f"\nafter the swap:       {_latency(live.answers, live.swap_returned, live.swap_returned + 3)}"
          f"\nthe swap took {live.timings['swap_s']:.2f}s (gate included); the migration "
          f"{live.timings['migration_s']:.0f}s; spec A indexed at "
          f"{live.timings['index_a_img_s']:.0f} img/s; the backfill re-embedded "
          f"{live.backfill.get('reembedded')} at {live.backfill.get('rate')} img/s "
          f"while serving")


def test_after_the_swap_b_holds_exactly_the_live_set(live: Live) -> None:
    assert len(live.live_ids) == GALLERY + UPLOADS_URI + UPLOADS_INLINE - DELETES == 1600
    assert live.counts["b"] == 1600
    assert live.ids["b"] == live.live_ids
    assert not set(live.deleted) & live.ids["b"]
    assert live.backfill.get("failed") == 0
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for photo in live.uploads[:5] + live.inline_uploads[:5]:
            r = client.post("/search", params={"limit": 3}, content=photo.path.read_bytes(),
                            headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200 and r.headers["x-imgsearch-spec"] == live.spec_b
            top = r.json()["hits"][0]
            assert top["score"] > 0.99 and (top["image_id"] == photo.image_id or any(
                h["image_id"] == photo.image_id for h in r.json()["hits"])), r.json()
        for image_id in live.deleted[:10]:
            assert client.get(f"/images/{image_id}").status_code == 404
        ready = client.get("/readyz").json()
        assert ready["spec"] == live.spec_b and ready["migration"]["state"] == "swapped"


def test_rollback_restores_a_with_the_uploads_and_deletes_made_meanwhile(live: Live) -> None:
    # A was written by the workers throughout: it already holds the live set.
    assert live.counts["a"] == 1600 and live.ids["a"] == live.live_ids
    live.reindex.rollback()
    with httpx.Client(base_url=live.url, timeout=60) as client:
        ready = client.get("/readyz").json()
        assert ready["spec"] == live.spec_a and ready["migration"]["state"] == "rolled_back"
        for photo in live.inline_uploads[:3] + live.uploads[:3]:
            r = client.post("/search", params={"limit": 3}, content=photo.path.read_bytes(),
                            headers={"Content-Type": "image/jpeg"})
            assert r.headers["x-imgsearch-spec"] == live.spec_a
            assert photo.image_id in [h["image_id"] for h in r.json()["hits"]]
        for image_id in live.deleted[:10]:
            assert client.get(f"/images/{image_id}").status_code == 404
        assert client.get("/count").json()["count"] == 1600
    # Finishing after a rollback cancels the migration: the new collection goes.
    finished = live.reindex.finish(wait=lambda _s: time.sleep(1.5))
    assert not finished.active and finished.state == "finished"
    assert live.reindex.catalog.collections(live.settings.qdrant_collection) == ["images"]
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.get("/readyz").json()["migration"] is None


# -- 2. crash and resume ----------------------------------------------------------------------


def _index_a(settings: Any, photos: list[Photo]) -> None:
    from shared.components import Components

    components = Components.load(settings)
    try:
        report = components.ingest([
            WorkItem(p.image_id, ImageUploaded(f"a-{n}", "tests", p.image_id,
                                               p.path.as_uri(), None, {"label": p.label}))
            for n, p in enumerate(photos)])
        assert report.count("stored") == len(photos), report.summary()
    finally:
        components.close()


def _cli_env(settings: Any, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "QDRANT_", "MODEL_", "VECTOR_", "REINDEX_"))}
    env.update(MODEL_NAME=MOBILENET, MODEL_WEIGHTS=str(settings.model_weights), DEVICE="cpu",
               QDRANT_PATH=str(settings.qdrant_path), PYTHONUNBUFFERED="1",
               IMAGE_FILE_ROOTS=":".join(str(r) for r in settings.image_file_roots), **extra)
    return env


def _record(settings: Any) -> dict[str, Any]:
    from shared.store.aliases import FileCatalog

    return FileCatalog(settings.qdrant_path).read_record("images") or {}


def test_a_killed_reindex_resumes_and_ends_as_an_uninterrupted_one(
        broker: Any, mobilenet_weights: Path, birds: Path, tmp_path: Path,
        embedder: Any) -> None:
    from shared.reduction import Reduction
    from shared.store.aliases import FileCatalog
    from shared.store.base import CollectionSpec
    from shared.store.edge import EdgeStore

    settings = build_settings(tmp_path / "store", broker, mobilenet_weights, [birds])
    photos = bird_photos(birds)[:400]
    _index_a(settings, photos)
    env = _cli_env(settings, REINDEX_RATE="60", REINDEX_BATCH="50")
    command = [sys.executable, "-m", "imgsearch", "reindex", "start", "--variant", SPEC_B]
    log = (tmp_path / "reindex.log").open("w")
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child has its own copy
    deadline = time.monotonic() + 180
    while (_record(settings).get("progress") or {}).get("done", 0) < 200:
        assert first.poll() is None, (tmp_path / "reindex.log").read_text()[-3000:]
        assert time.monotonic() < deadline, _record(settings)
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    killed = _record(settings)
    assert killed["state"]["name"] == "backfilling"  # nobody said it stopped: it was killed
    done_before = killed["progress"]["checkpoint_done"]
    assert 0 < done_before < 400 and killed["progress"]["offset"] is not None
    print(f"\nkilled after {killed['progress']['done']} of 400 (checkpoint {done_before})")

    second = subprocess.run([*command, "--swap"], cwd=REPO,
                            env=_cli_env(settings, REINDEX_BATCH="50"),
                            capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stderr, second.stderr
    record = _record(settings)
    progress = record["progress"]
    # Resumed: the second run re-embedded only what the first had not finished.
    assert progress["reembedded"] - killed["progress"]["reembedded"] <= 400 - done_before + 64
    assert record["state"]["name"] == "swapped" and record["gate"]["passed"]

    catalog = FileCatalog(settings.qdrant_path)
    target = record["migration"]["target"]
    assert catalog.resolve("images") == target
    status = subprocess.run([sys.executable, "-m", "imgsearch", "reindex", "status", "--json"],
                            cwd=REPO, env=_cli_env(settings), capture_output=True, text=True,
                            timeout=120, check=False)
    assert json.loads(status.stdout)["migration"]["state"] == "swapped", status.stderr
    # The end state is an uninterrupted migration's: every image once, from its event,
    # with exactly the vector a fresh embedding and the stored projection give.
    meta = catalog.stored_metadata(target)
    info = meta["imgsearch"]  # type: ignore[index]
    spec = CollectionSpec(target, info["dim"], info, quantization=info["quantization"],
                          reduction={"identity": info["reduction"]["identity"]})
    with EdgeStore(settings.qdrant_path, spec) as store:
        stored = {i.image_id: i.payload for i in store.scroll_images(("event_id", "uri"))}
        assert len(stored) == 400 and store.count() == 400
        assert {pid: p["event_id"] for pid, p in stored.items()} == {
            p.image_id: f"a-{n}" for n, p in enumerate(photos)}
        reduction = Reduction.from_metadata(info["reduction"])
        sample = photos[::40]
        from shared.images import decode

        fresh = embedder.embed([embedder.preprocess(decode(p.path.read_bytes(),
                                                           max_pixels=10**8).image)
                                for p in sample])
        want = reduction.apply(np.asarray(fresh))
        got = store.get([p.image_id for p in sample], with_vector=True)
        for p, w in zip(sample, want, strict=True):
            v = got[p.image_id].vector
            assert v is not None and float(np.dot(v, w)) > 0.999, p.image_id


# -- another architecture; a process configured for the old spec follows ----------------------


def test_a_migration_to_another_model_and_a_stale_process_follows_it(
        broker: Any, mobilenet_weights: Path, birds: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from shared.components import Components
    from shared.config import load_settings
    from shared.reindex.controller import Reindex
    from shared.reindex.spec import spec_overrides
    from shared.reindex.specs import SpecSet

    settings = build_settings(tmp_path / "store", broker, mobilenet_weights, [birds],
                              embed_engine="torch")
    photos = bird_photos(birds)[:40]
    _index_a(settings, photos)
    components = Components.load(settings)
    specs = SpecSet(components, poll_s=0)
    specs.start()
    reindex = Reindex(specs, say=print)
    try:
        reindex.start(spec_overrides(model="resnet10t", random_weights=True))
        result = reindex.run(swap=True)
        assert result is not None and result.passed, result
        serving = reindex.catalog.resolve("images")
        target = specs.components(serving)  # type: ignore[arg-type]
        assert target is not None and target.embedder.info.name == "resnet10t"
        assert target.store.count() == 40 and target.store.spec.dim == 512
        reindex.finish(wait=lambda _s: None)
    finally:
        specs.close()
        components.close()
    # A worker restarted with the old MODEL_NAME: it serves the index's spec, and says so.
    stale = Components.load(load_settings(**{**settings.model_dump(), "model_name": MOBILENET}))
    try:
        assert stale.embedder.info.name == "resnet10t" and stale.store.count() == 40
        assert "migrated away from" in caplog.text
    finally:
        stale.close()


# -- 4. the embedded stack ---------------------------------------------------------------------


class Up:
    def __init__(self, photos: Path, data: Path, weights: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("KAFKA_", "QDRANT_", "MODEL_", "VECTOR_", "QUANTIZATION",
                                      "API_", "REINDEX_"))}
        clean.update(MODEL_NAME=MOBILENET, MODEL_WEIGHTS=str(weights), DEVICE="cpu",
                     PYTHONUNBUFFERED="1", REINDEX_POLL_S="0.5", **env)
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgsearch", "up", str(photos), "--data-dir", str(data),
             "--port", str(self.port)], cwd=REPO, env=clean, stdout=self._out,
            stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace").replace("\r", "\n")

    def ready(self, timeout_s: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()[-4000:]
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200 and "ready:" in self.output():
                    return r.json()  # type: ignore[no-any-return]
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"`up` not ready:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        try:
            self.process.send_signal(signal.SIGINT)
            assert self.process.wait(90) == 0, self.output()[-4000:]
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._out.close()


def test_up_with_a_new_spec_serves_throughout_swaps_and_the_next_start_serves_it(
        tmp_path: Path, birds: Path, mobilenet_weights: Path) -> None:
    photos = tmp_path / "photos"
    for species in ("Blue_Jay", "Painted_Bunting"):
        (photos / species).mkdir(parents=True)
        for p in sorted((birds / species).glob("*.jpg")):
            (photos / species / p.name).write_bytes(p.read_bytes())
    count = len(list(photos.rglob("*.jpg")))
    data = tmp_path / "data"
    first = Up(photos, data, mobilenet_weights, tmp_path / "a.log")
    spec_a = first.ready()["spec"]
    first.stop()

    new = {"VECTOR_REDUCTION": "random", "VECTOR_DIM": "320", "QUANTIZATION": "int8"}
    second = Up(photos, data, mobilenet_weights, tmp_path / "b.log", **new)
    probe = sorted(photos.rglob("*.jpg"))[3]
    specs: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while True:  # search all through the migration
            assert time.monotonic() < deadline, second.output()[-4000:]
            try:
                r = httpx.post(f"{second.url}/search", content=probe.read_bytes(),
                               headers={"Content-Type": "image/jpeg"}, timeout=30)
            except httpx.HTTPError:
                assert not specs, "the API stopped answering during the migration"
                time.sleep(0.25)
                continue
            assert r.status_code == 200, r.text
            specs.append(r.json()["spec"])
            assert r.json()["hits"][0]["score"] > 0.99
            if r.json()["spec"] != spec_a:
                break
            time.sleep(0.2)
        spec_b = specs[-1]
        assert specs[0] == spec_a, "it served the old spec until the swap"
        output = second.output()
        assert "reindex: started" in output and "re-indexing" in output
        assert "reindex: gate passed" in output and "reindex: swapped" in output
        ready = second.ready()
        assert ready["spec"] == spec_b and ready["migration"]["state"] == "swapped"
        assert httpx.get(f"{second.url}/count", timeout=30).json()["count"] == count

        # The operator commands, beside the running `up`.
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "imgsearch", "reindex", *args,
                                   "--data-dir", str(data)], cwd=tmp_path,
                                  env={k: v for k, v in os.environ.items()
                                       if not k.startswith(("QDRANT_", "KAFKA_"))},
                                  capture_output=True, text=True, timeout=180, check=False)

        status = cli("status")
        assert status.returncode == 0 and "swapped" in status.stdout, status.stderr
        assert cli("rollback").returncode == 0
        assert httpx.get(f"{second.url}/readyz", timeout=30).json()["spec"] == spec_a
        swapped = cli("swap")
        assert swapped.returncode == 0, swapped.stderr
        assert httpx.get(f"{second.url}/readyz", timeout=30).json()["spec"] == spec_b
    finally:
        second.stop()

    # The next start serves B at once, with no migration to run; so does a start without
    # any model option (the data directory says what it serves).
    third = Up(photos, data, mobilenet_weights, tmp_path / "c.log", **new)
    try:
        ready = third.ready()
        assert ready["spec"] == spec_b and "re-indexing" not in third.output()
        finished = subprocess.run(
            [sys.executable, "-m", "imgsearch", "reindex", "finish", "--yes", "--data-dir",
             str(data)], cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
        assert finished.returncode == 0, finished.stderr
        assert sorted(p.name for p in data.iterdir() if p.name.startswith("images")) == [
            ready["serving_collection"]]
        assert httpx.get(f"{third.url}/count", timeout=30).json()["count"] == count
    finally:
        third.stop()


# -- the server backend (qdrant-client's local mode stands in for a Qdrant server) ------------


@pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning")
def test_backfill_gate_and_alias_swap_on_the_server_backend(
        tmp_path: Path, embedder: Any, mobilenet_weights: Path, birds: Path) -> None:
    from qdrant_client import QdrantClient

    from shared.components import Components, collection_spec
    from shared.config import load_settings
    from shared.fetch import ImageFetcher
    from shared.reindex.backfill import Backfill
    from shared.reindex.spec import with_spec
    from shared.store.aliases import physical_name
    from shared.store.projected import ProjectedStore
    from shared.store.qdrant import QdrantCatalog, QdrantStore

    client = QdrantClient(path=str(tmp_path / "local"))
    settings = load_settings(qdrant_path=tmp_path / "unused", model_name=MOBILENET,
                             model_weights=mobilenet_weights, device="cpu",
                             image_file_roots=[birds], reindex_batch=16)
    b_settings = with_spec(settings, {"vector_reduction": "random", "vector_dim": 320,
                                      "quantization": "int8"})
    spec_b = collection_spec(b_settings, embedder)
    source = Components(settings, embedder,
                        QdrantStore(client, collection_spec(settings, embedder)),
                        ImageFetcher.from_settings(settings))
    target_name = physical_name("images", spec_b.metadata())
    target = Components(b_settings, embedder,
                        ProjectedStore.around(QdrantStore(client, replace(spec_b,
                                                                          name=target_name))),
                        ImageFetcher.from_settings(settings))
    photos = bird_photos(birds)[:60]
    report = source.ingest([WorkItem(p.image_id, ImageUploaded(
        f"a-{n}", "tests", p.image_id, p.path.as_uri(), None, {"label": p.label}))
        for n, p in enumerate(photos)])
    assert report.count("stored") == 60
    # An image only the new collection has: the reconciliation must remove it.
    target.ingest([WorkItem("gone", ImageUploaded("x", "t", "gone", photos[0].path.as_uri(),
                                                  None, {}))])
    backfill = Backfill(source, target, settings=settings)
    counts = backfill.run()
    assert counts.reembedded == 60 and counts.failed == 0
    result = backfill.gate(sample=30, min_ratio=0.99, rounds=3)
    assert result.passed, result.reasons
    assert target.store.count() == 60 and target.store.get(["gone"]) == {}
    catalog = QdrantCatalog(client)
    catalog.switch("images", target_name)
    assert catalog.resolve("images") == target_name
    assert {a.alias_name for a in client.get_aliases().aliases} == {"images--live"}
    client.close()
