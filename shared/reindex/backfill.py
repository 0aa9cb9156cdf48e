"""Re-embed what the serving collection holds into the migration's target, and check it.

**Where the images come from.** From what the source collection stores, not from Kafka:
a point keeps its ``uri`` (re-fetched through the same pipeline: the scheduler, fetch,
decode, embed, write), and an inline upload has its kept derivative (shared/blobs.py).
Replaying the topic instead would need a log that keeps every image forever: compaction
keyed by image_id and infinite retention, which production topics rarely have and the
embedded stack's broker (Tansu, in memory) never has (docs/migration.md).

**Backfill.** A scan of the source in pages of REINDEX_BATCH, in point-id order; each
image the target lacks, or holds from another event, is re-embedded (at most REINDEX_RATE
per second). The scan's checkpoint (the offset before the first page not wholly done) is
in the migration record, with a heartbeat: a backfill stopped or killed resumes from it,
and an image already in the target from the same event is not embedded again.

**Reconcile.** Workers dual-write every event to both collections while the migration is
active, and the scan races with them on the same images (the scan read v1, a worker wrote
v2 to both, the scan's v1 lands in the target afterwards). So after the scan, both
collections are compared image by image (event id, uri, metadata): what the target lacks
or holds differently is re-embedded from the source's current point, what the source no
longer has is deleted from the target; again, until nothing differs.

**Gate.** The target holds exactly the source's images (nothing missing, stale or extra),
and of a sample of them, each searched with its own stored vector comes back first (a
tie with an identical photo counts) for at least REINDEX_GATE_MIN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.blobs import BlobStore
from shared.components import Components
from shared.config import Settings
from shared.events import ImageUploaded
from shared.pipeline.scheduler import Scheduler
from shared.pipeline.stages import IngestPipeline, ItemResult, Prepared, WorkItem
from shared.reindex.record import owner
from shared.store.base import StoredImage

log = logging.getLogger(__name__)

FIELDS = ("image_id", "uri", "metadata", "sha256", "event_id")
HEARTBEAT_S = 1.0
SOURCE = "imgsearch-reindex"
MAX_LISTED = 50  # image ids kept in the record per kind of problem


def version(payload: dict[str, Any] | None) -> str:
    """What must agree between source and target for an image to count as migrated."""
    if payload is None:
        return ""
    body = json.dumps([payload.get("event_id"), payload.get("uri"),
                       payload.get("metadata") or {}], sort_keys=True, default=str)
    return hashlib.blake2b(body.encode(), digest_size=8).hexdigest()


class ReembedPipeline(IngestPipeline):
    """The target spec's pipeline, for images that are stored already: an image re-embedded
    from its kept derivative keeps its original's sha256, so both collections describe the
    same bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.original_sha: dict[str, str] = {}
        self._lock = threading.Lock()

    def prepare(self, event: ImageUploaded, existing: Any) -> Prepared:
        with self._lock:
            sha = self.original_sha.pop(event.image_id, None)
        prepared = super().prepare(event, existing)
        if sha:
            prepared.sha256 = sha
        return prepared


@dataclass
class Counts:
    total: int = 0  # images in the source when the scan started
    done: int = 0  # images scanned whose re-embedding (if any) is finished
    reembedded: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def failure(self, image_id: str, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.failed_ids) < MAX_LISTED:
            self.failed_ids.append(image_id)


@dataclass
class Diff:
    missing: list[str] = field(default_factory=list)  # in the source, not in the target
    stale: list[str] = field(default_factory=list)  # in both, from different events
    extra: list[str] = field(default_factory=list)  # in the target only
    source_count: int = 0
    target_count: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.stale or self.extra)

    def summary(self) -> dict[str, Any]:
        return {"missing": len(self.missing), "stale": len(self.stale),
                "extra": len(self.extra), "source": self.source_count,
                "target": self.target_count,
                "examples": (self.missing + self.stale + self.extra)[:10]}


@dataclass
class GateResult:
    passed: bool
    diff: dict[str, Any]
    sample: int
    found_first: int
    ratio: float
    min_ratio: float
    missing_allowed: int = 0
    reasons: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    def as_record(self) -> dict[str, Any]:
        return {"passed": self.passed, "diff": self.diff, "sample": self.sample,
                "found_first": self.found_first, "ratio": round(self.ratio, 4),
                "min_ratio": self.min_ratio, "missing_allowed": self.missing_allowed,
                "reasons": self.reasons, "at": self.at}


@dataclass
class _Page:
    no: int
    next_offset: Any
    size: int
    outstanding: int


class Stopped(Exception):
    """The backfill was asked to stop; its checkpoint is saved."""


class Backfill:
    """One migration's backfill, reconciliation and gate, over loaded Components."""

    def __init__(self, source: Components, target: Components, *, settings: Settings,
                 blobs: BlobStore | None = None, stop: threading.Event | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.source = source
        self.target = target
        self.settings = settings
        self.blobs = blobs if blobs is not None else (source.blobs or target.blobs)
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.counts = Counts()
        self._lock = threading.Lock()
        self._pages: deque[_Page] = deque()
        self._checkpoint: Any = None
        self._checkpoint_done = 0
        self._last_beat = 0.0
        self._started = time.monotonic()
        self._reembedded_at_start = 0

    # -- the work items -------------------------------------------------------------------------------

    def _item(self, image: StoredImage, key: Any,
              pipeline: ReembedPipeline) -> WorkItem | None:
        """The upload event that re-embeds ``image`` as it is stored; None when its bytes
        are nowhere (an inline upload from before images were kept)."""
        payload = image.payload
        uri = payload.get("uri")
        data = None
        if not uri:
            data = self.blobs.get(image.image_id) if self.blobs is not None else None
            if data is None:
                return None
            if payload.get("sha256"):
                with pipeline._lock:
                    pipeline.original_sha[image.image_id] = str(payload["sha256"])
        event = ImageUploaded(str(payload.get("event_id") or f"reindex-{image.image_id}"),
                              SOURCE, image.image_id, uri, data,
                              dict(payload.get("metadata") or {}))
        return WorkItem(key, event)

    def _scheduler(self, pipeline: IngestPipeline,
                   on_done: Callable[[ItemResult], None]) -> Scheduler:
        s = self.settings
        return Scheduler(pipeline, on_done=on_done, batch_size=s.batch_size,
                         max_wait_s=s.batch_max_wait_ms / 1000, prepare_workers=s.decode_workers,
                         give_up_after_s=None, max_in_flight=s.batch_size * 4,
                         name="reindex")

    def _pace(self) -> Callable[[], None]:
        """Sleep so that at most REINDEX_RATE images per second are submitted."""
        rate = self.settings.reindex_rate
        next_at = time.monotonic()

        def wait() -> None:
            nonlocal next_at
            if rate <= 0:
                return
            next_at = max(next_at, time.monotonic()) + 1.0 / rate
            while (remaining := next_at - time.monotonic()) > 0:
                if self.stop.wait(min(remaining, 0.5)):
                    raise Stopped()

        return wait

    # -- backfill ---------------------------------------------------------------------------------------

    def run(self, progress: dict[str, Any] | None = None) -> Counts:
        """Scan the source from ``progress``'s checkpoint (None: the start) and re-embed
        what the target lacks. Raises Stopped (checkpoint saved) when asked to stop."""
        progress = dict(progress or {})
        self._checkpoint = progress.get("offset")
        self._checkpoint_done = int(progress.get("done", 0)) if self._checkpoint else 0
        self.counts = Counts(total=self.source.store.count(), done=self._checkpoint_done,
                             reembedded=int(progress.get("reembedded", 0)),
                             failed=0)
        self._reembedded_at_start = self.counts.reembedded
        self._started = time.monotonic()
        pipeline = self.target.pipeline(skip_unchanged=False, keep_blobs=False,
                                        cls=ReembedPipeline)
        assert isinstance(pipeline, ReembedPipeline)
        scheduler = self._scheduler(pipeline, self._done)
        pace = self._pace()
        offset = self._checkpoint
        number = 0
        try:
            while True:
                if self.stop.is_set():
                    raise Stopped()
                images, next_offset = self.source.store.scroll_page(
                    FIELDS, offset=offset, limit=self.settings.reindex_batch)
                have = self.target.store.get([i.image_id for i in images]) if images else {}
                todo = [i for i in images
                        if version(i.payload) != version(getattr(have.get(i.image_id),
                                                                 "payload", None))]
                page = _Page(number, next_offset, len(images), len(todo))
                with self._lock:
                    self._pages.append(page)
                for image in todo:
                    item = self._item(image, (number, image.image_id), pipeline)
                    if item is None:
                        with self._lock:
                            self.counts.failure(image.image_id, "no_source")
                            page.outstanding -= 1
                        continue
                    pace()
                    self._submit(scheduler, item)
                self._advance()
                number += 1
                if next_offset is None or not images:
                    break
                offset = next_offset
            self._wait(scheduler)
        finally:
            scheduler.close()
            pipeline.close()
        self._advance()
        self._beat(force=True)
        return self.counts

    def _submit(self, scheduler: Scheduler, item: WorkItem) -> None:
        while True:  # block while the scheduler is full, but hear a stop and beat meanwhile
            if self.stop.is_set():
                raise Stopped()
            if scheduler.error is not None:
                raise RuntimeError("the re-index pipeline failed") from scheduler.error
            if scheduler.in_flight < scheduler.max_in_flight:
                scheduler.submit(item)
                return
            scheduler.wait_idle(0.2)
            self._advance()

    def _wait(self, scheduler: Scheduler) -> None:
        while not scheduler.wait_idle(0.5):
            if scheduler.error is not None:
                raise RuntimeError("the re-index pipeline failed") from scheduler.error
            if self.stop.is_set():
                raise Stopped()
            self._advance()
        if scheduler.error is not None:
            raise RuntimeError("the re-index pipeline failed") from scheduler.error

    def _done(self, result: ItemResult) -> None:
        number, image_id = result.item.key  # type: ignore[misc]
        with self._lock:
            if result.outcome == "failed":
                reason = result.error.reason if result.error else "failed"
                self.counts.failure(image_id, reason)
                log.warning("re-index: %s could not be re-embedded: %s", image_id,
                            result.error)
            else:
                self.counts.reembedded += 1
            for page in self._pages:
                if page.no == number:
                    page.outstanding -= 1
                    break

    def _advance(self) -> None:
        """Move the checkpoint over pages wholly done; report progress."""
        with self._lock:
            while self._pages and self._pages[0].outstanding <= 0:
                page = self._pages.popleft()
                self._checkpoint_done += page.size
                self._checkpoint = page.next_offset
            in_flight_done = sum(p.size for p in self._pages if p.outstanding <= 0)
            self.counts.done = self._checkpoint_done + in_flight_done
        self._beat()

    def _beat(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < HEARTBEAT_S:
            return
        self._last_beat = now
        if self.on_progress is not None:
            self.on_progress(self.progress())

    def progress(self, phase: str = "backfill") -> dict[str, Any]:
        with self._lock:
            c = self.counts
            elapsed = max(1e-6, time.monotonic() - self._started)
            return {
                "phase": phase, "total": c.total, "done": min(c.done, max(c.total, c.done)),
                "reembedded": c.reembedded, "failed": c.failed, "failed_ids": c.failed_ids,
                "reasons": c.reasons,
                "offset": self._checkpoint, "checkpoint_done": self._checkpoint_done,
                "rate": round((c.reembedded - self._reembedded_at_start) / elapsed, 2),
                "updated_at": time.time(), "owner": owner(),
            }

    # -- reconcile ------------------------------------------------------------------------------------

    def compare(self) -> Diff:
        """Both collections, image by image (payload only)."""
        versions = {i.image_id: version(i.payload)
                    for i in self.source.store.scroll_images(FIELDS)}
        diff = Diff(source_count=len(versions))
        seen = 0
        for image in self.target.store.scroll_images(FIELDS):
            seen += 1
            want = versions.pop(image.image_id, None)
            if want is None:
                diff.extra.append(image.image_id)
            elif want != version(image.payload):
                diff.stale.append(image.image_id)
        diff.missing = sorted(versions)
        diff.target_count = seen
        return diff

    def repair(self, diff: Diff) -> int:
        """Re-embed what is missing or stale, from the source as it is now; delete extras.
        Returns how many images could not be re-embedded."""
        if diff.extra:
            self.target.store.delete(diff.extra)
        ids = diff.missing + diff.stale
        if not ids:
            return 0
        pipeline = self.target.pipeline(skip_unchanged=False, keep_blobs=False,
                                        cls=ReembedPipeline)
        assert isinstance(pipeline, ReembedPipeline)
        failed: list[str] = []
        lock = threading.Lock()

        def done(result: ItemResult) -> None:
            with lock:
                if result.outcome == "failed":
                    failed.append(result.item.event.image_id)
                    log.warning("re-index: %s could not be re-embedded: %s",
                                result.item.event.image_id, result.error)

        scheduler = self._scheduler(pipeline, done)
        try:
            for start in range(0, len(ids), 256):
                stored = self.source.store.get(ids[start:start + 256])
                for image_id, image in stored.items():  # gone from the source: next round
                    item = self._item(image, image_id, pipeline)
                    if item is None:
                        failed.append(image_id)
                        continue
                    self._submit(scheduler, item)
            self._wait(scheduler)
        finally:
            scheduler.close()
            pipeline.close()
        return len(failed)

    def reconcile(self, *, rounds: int, say: Callable[[str], None] = log.info) -> Diff:
        """Compare and repair until nothing differs (or ``rounds`` passes); the last diff."""
        diff = self.compare()
        for number in range(1, rounds + 1):
            if diff.clean:
                return diff
            say(f"reconcile {number}/{rounds}: {len(diff.missing)} missing, {len(diff.stale)} "
                f"stale, {len(diff.extra)} extra in the new collection")
            unfixable = self.repair(diff)
            again = self.compare()
            if unfixable and len(again.missing) + len(again.stale) <= unfixable and \
                    not again.extra:
                return again  # what is left cannot be re-embedded: no use trying again
            diff = again
            self._beat(force=True)
        return diff

    # -- gate -----------------------------------------------------------------------------------------

    def gate(self, *, sample: int, min_ratio: float, rounds: int,
             allow_missing: bool = False) -> GateResult:
        diff = self.reconcile(rounds=rounds)
        reasons = []
        missing_ok = 0
        if diff.missing and allow_missing and not (diff.stale or diff.extra):
            missing_ok = len(diff.missing)
        elif not diff.clean:
            reasons.append(
                f"the new collection does not hold exactly the serving one's images: "
                f"{len(diff.missing)} missing, {len(diff.stale)} stale, {len(diff.extra)} "
                f"extra (e.g. {', '.join((diff.missing + diff.stale + diff.extra)[:5])})")
        found, checked = self.self_search(sample)
        ratio = found / checked if checked else 1.0
        if ratio < min_ratio:
            reasons.append(f"only {found} of {checked} sampled images came back first when "
                           f"searched with their own vector ({ratio:.3f} < {min_ratio})")
        return GateResult(not reasons, diff.summary(), checked, found, ratio, min_ratio,
                          missing_ok, reasons)

    def self_search(self, sample: int) -> tuple[int, int]:
        """Of ``sample`` random images of the target, how many come back first (or tied
        first) when searched with their own stored vector."""
        ids = [i.image_id for i in self.target.store.scroll_images(("image_id",))]
        chosen = random.Random(len(ids)).sample(ids, min(sample, len(ids)))
        found = 0
        for start in range(0, len(chosen), 64):
            stored = self.target.store.get(chosen[start:start + 64], with_vector=True)
            for image_id, image in stored.items():
                if image.vector is not None and _first(self.target, image_id, image.vector):
                    found += 1
        return found, len(chosen)


def _first(components: Components, image_id: str, vector: Any) -> bool:
    hits = components.store.search(vector, limit=5)
    if not hits:
        return False
    if hits[0].image_id == image_id:
        return True
    own = next((h for h in hits if h.image_id == image_id), None)
    return own is not None and hits[0].score - own.score <= 1e-4  # a tie with a duplicate

