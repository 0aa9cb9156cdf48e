"""The ingest pipeline's stages, run concurrently over a stream of events.

    submit ─▶ prepare pool ─▶ embed thread ─▶ write thread ─▶ on_done(result)
              fetch, hash,     batches of up   batches of
              decode,          to BATCH_SIZE   upserts and
              preprocess       or MAX_WAIT:    deletes
                               (detect, crop,)
                               embed

Each stage hides behind the slowest one (on CPU, the model). The stage code is
IngestPipeline's own (shared/pipeline.py); this module only schedules it.

Guarantees:
* Events for one image_id run one at a time, in submission order, so the last event
  decides what is stored even when an earlier one is slow.
* A failing event is reported at once; it never holds back the others.
* ``on_done`` is called for an event only after the store has confirmed its write.
  A store failure is retried (capped exponential backoff with jitter) until it
  passes or the pipeline is closed; meanwhile ``ready`` is cleared.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shared.errors import ImgSearchError
from shared.events import ImageDeleted, ImageUploaded
from shared.pipeline import STAGES, IngestPipeline, ItemResult, Prepared, WorkItem

log = logging.getLogger(__name__)


@dataclass
class _Job:
    item: WorkItem
    submitted_at: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    # This job's share of its embed batch's busy time, per stage ("detect", "embed").
    busy: dict[str, float] = field(default_factory=dict)


@dataclass
class WriteBatch:
    """What one write did: passed to ``on_batch`` for logs and metrics."""

    results: list[ItemResult]
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    latency_s: float = 0.0  # from the oldest event's submission to the confirmed write

    def summary(self) -> str:
        counts = {o: sum(r.outcome == o for r in self.results) for o in ("stored", "deleted")}
        stages = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.stage_seconds.items())
        return f"n={len(self.results)} stored={counts['stored']} deleted={counts['deleted']} {stages}"


_STOP = object()


class StagedPipeline:
    def __init__(
        self,
        pipeline: IngestPipeline,
        *,
        on_done: Callable[[ItemResult], None],
        on_batch: Callable[[WriteBatch], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        batch_size: int = 32,
        max_wait_s: float = 0.05,
        prepare_workers: int = 4,
        retry_max_s: float = 30.0,
        name: str = "pipeline",
    ) -> None:
        self.pipeline = pipeline
        self.on_done = on_done
        self.on_batch = on_batch
        self.on_retry = on_retry
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.retry_max_s = retry_max_s
        self.ready = threading.Event()
        self.ready.set()
        self.stages = pipeline.stages
        self.busy_seconds = dict.fromkeys(self.stages, 0.0)  # cumulative, for benchmarks
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._by_key: dict[str, deque[_Job]] = {}
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(prepare_workers, thread_name_prefix=f"{name}-prepare")
        self._embed_q: queue.Queue[object] = queue.Queue()
        self._write_q: queue.Queue[object] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._embed_loop, name=f"{name}-embed", daemon=True),
            threading.Thread(target=self._write_loop, name=f"{name}-write", daemon=True),
        ]
        self.error: BaseException | None = None  # an unexpected error that stopped a stage
        for t in self._threads:
            t.start()

    # -- intake ------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def submit(self, item: WorkItem) -> None:
        if self.error is not None:
            raise RuntimeError("the ingest pipeline stopped on an error") from self.error
        job = _Job(item)
        key = item.event.image_id
        with self._lock:
            self._in_flight += 1
            waiting = self._by_key.setdefault(key, deque())
            waiting.append(job)
            if len(waiting) > 1:
                return  # an earlier event for this image runs first
        self._start(job)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted event is done; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 1.0)
        return True

    def close(self) -> None:
        """Stop all stages. Events not done by now are abandoned: never reported done."""
        self._closing.set()
        self._embed_q.put(_STOP)
        self._write_q.put(_STOP)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for t in self._threads:
            t.join()

    # -- stages ------------------------------------------------------------------------------

    def _start(self, job: _Job) -> None:
        if isinstance(job.item.event, ImageDeleted):
            self._write_q.put(job)
        else:
            self._pool.submit(self._guard, self._prepare, job)

    def _guard(self, fn: Callable[[_Job], None], job: _Job) -> None:
        try:
            fn(job)
        except BaseException as exc:  # a bug, not a bad event: stop loudly, never lose the job silently
            log.exception("ingest stage failed unexpectedly")
            self.error = exc
            self.ready.clear()

    def _prepare(self, job: _Job) -> None:
        if self._closing.is_set():
            return
        event = job.item.event
        assert isinstance(event, ImageUploaded)
        try:
            job.prepared = self.pipeline.prepare(event, self.pipeline.existing(event.image_id))
        except ImgSearchError as exc:
            self._finish(job, ItemResult(job.item, "failed", exc))
            return
        with self._lock:
            self.busy_seconds["fetch"] += job.prepared.fetch_s
            self.busy_seconds["decode"] += job.prepared.decode_s
        if job.prepared.unchanged:
            self._finish(job, ItemResult(job.item, "unchanged"))
        else:
            self._embed_q.put(job)

    def _gather(self, q: queue.Queue[object], limit: int) -> list[_Job] | None:
        """Block for one job, then take more for up to max_wait_s. None means stop."""
        first = q.get()
        if first is _STOP:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < limit:
            remaining = deadline - time.monotonic()
            try:
                nxt = q.get(timeout=max(0.0, remaining)) if remaining > 0 else q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                q.put(_STOP)
                break
            jobs.append(nxt)
        return jobs  # type: ignore[return-value]

    def _embed_loop(self) -> None:
        while True:
            jobs = self._gather(self._embed_q, self.batch_size)
            if jobs is None or self._closing.is_set():
                return
            try:
                busy = self.pipeline.embed(
                    [(j.item.event, j.prepared) for j in jobs]  # type: ignore[misc]
                )
            except BaseException as exc:
                log.exception("embedding failed unexpectedly")
                self.error = exc
                self.ready.clear()
                return
            with self._lock:
                for stage, seconds in busy.items():
                    if stage in self.busy_seconds:
                        self.busy_seconds[stage] += seconds
            for job in jobs:
                job.busy = {stage: seconds / len(jobs) for stage, seconds in busy.items()}
                self._write_q.put(job)

    def _write_loop(self) -> None:
        while True:
            jobs = self._gather(self._write_q, self.batch_size * 2)
            if jobs is None:
                return
            records = [r for j in jobs if j.prepared is not None for r in j.prepared.records]
            deletes = [j.item.event.image_id for j in jobs if isinstance(j.item.event, ImageDeleted)]
            took = self._write_with_retry(records, deletes)  # type: ignore[arg-type]
            if took is None:
                return  # closing: abandon; nothing of this batch is reported done
            batch = WriteBatch(results=[], stage_seconds=dict.fromkeys(self.stages, 0.0))
            batch.stage_seconds["upsert"] = took
            batch.latency_s = time.monotonic() - min(j.submitted_at for j in jobs)
            for job in jobs:
                if job.prepared is not None:
                    batch.stage_seconds["fetch"] += job.prepared.fetch_s
                    batch.stage_seconds["decode"] += job.prepared.decode_s
                for stage, seconds in job.busy.items():
                    if stage in batch.stage_seconds:
                        batch.stage_seconds[stage] += seconds
                outcome = "deleted" if isinstance(job.item.event, ImageDeleted) else "stored"
                batch.results.append(ItemResult(job.item, outcome))  # type: ignore[arg-type]
            with self._lock:
                self.busy_seconds["upsert"] += took
            if self.on_batch is not None:
                self.on_batch(batch)
            for job, result in zip(jobs, batch.results, strict=True):
                self._finish(job, result)

    def _write_with_retry(self, records: list, deletes: list[str]) -> float | None:
        attempt = 0
        while not self._closing.is_set():
            started = time.perf_counter()
            try:
                self.pipeline.write(records, deletes)
            except ImgSearchError as exc:
                if not exc.retriable:
                    self.error = exc
                    self.ready.clear()
                    log.error("store write failed permanently: %s", exc)
                    return None
                delay = min(self.retry_max_s, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
                attempt += 1
                self.ready.clear()
                if self.on_retry is not None:
                    self.on_retry("store")
                log.warning("store write failed (attempt %d), retrying in %.1fs: %s",
                            attempt, delay, exc)
                self._closing.wait(delay)
                continue
            if attempt:
                log.info("store write recovered after %d retries", attempt)
            self.ready.set()
            return time.perf_counter() - started
        return None

    def _finish(self, job: _Job, result: ItemResult) -> None:
        self.on_done(result)
        key = job.item.event.image_id
        nxt = None
        with self._lock:
            self._in_flight -= 1
            waiting = self._by_key[key]
            waiting.popleft()
            if waiting:
                nxt = waiting[0]
            else:
                del self._by_key[key]
            if not self._in_flight:
                self._idle.notify_all()
        if nxt is not None and not self._closing.is_set():
            self._start(nxt)
