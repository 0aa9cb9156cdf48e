"""The one ingest scheduler: every entrance (the Kafka worker, ``imgsearch index`` and
``up``, ``imgsearch eval``, the benchmarks) runs its events through it.

    submit ─▶ prepare pool ─▶ embed thread ─▶ write thread ─▶ on_done(result)
              fetch, hash,     batches of up   batches of
              decode,          to BATCH_SIZE   upserts and
              preprocess       or MAX_WAIT:    deletes
                               (detect, crop,)
                               embed

Each stage hides behind the slowest one (on CPU, the model). What a stage does is
shared/pipeline/stages.py; this module decides when and where.

Guarantees:
* Events for one image_id run one at a time, in submission order, so the last event
  decides what is stored even when an earlier one is slow.
* A failing event is reported at once; it never holds back the others. An unexpected
  exception in a batch stage (embed, write) is narrowed down by splitting the batch
  until the event that causes it fails alone, as ``internal_error`` — unless a probe
  shows the stage itself is broken, which is fatal (shared/pipeline/supervise.py).
* ``on_done`` is called for an event only after the store has confirmed its write. A
  store outage is waited out with backoff (shared/pipeline/retry.py); meanwhile the
  supervisor reports not ready.
* ``cancel`` drops events whose results nobody wants any more (a revoked partition):
  they are never reported, and a write already under way is waited for, so nothing of
  theirs lands after the caller has let them go.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shared.errors import ImgSearchError, InternalError
from shared.events import ImageDeleted, ImageUploaded
from shared.pipeline.report import BatchReport
from shared.pipeline.retry import Backoff, retrying
from shared.pipeline.stages import IngestPipeline, ItemResult, Prepared, WorkItem
from shared.pipeline.supervise import Supervisor

log = logging.getLogger(__name__)

# Store outages: retried from half a second up to STORE_RETRY_MAX_S between tries.
STORE_BACKOFF = Backoff(base_s=0.5, max_s=30.0)
# This many events in a row failing with an unexpected error in one stage means the
# stage is broken, not the events: stop instead of dead-lettering the whole stream.
FAILURE_STREAK_LIMIT = 16
_IDLE_TICK_S = 0.5  # loops wake this often when idle, to show they are alive


class _Closing(Exception):
    """Raised inside a retry wait when the scheduler closes."""


@dataclass(eq=False)
class _Job:
    item: WorkItem
    submitted_at: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    # This job's share of its embed batch's busy time, per stage ("detect", "embed").
    busy: dict[str, float] = field(default_factory=dict)
    stage: str = "queued"
    cancelled: bool = False

    @property
    def is_delete(self) -> bool:
        return isinstance(self.item.event, ImageDeleted)


_STOP = object()


class Scheduler:
    def __init__(
        self,
        pipeline: IngestPipeline,
        *,
        on_done: Callable[[ItemResult], None],
        on_batch: Callable[[BatchReport], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        batch_size: int = 32,
        max_wait_s: float = 0.05,
        prepare_workers: int = 4,
        store_backoff: Backoff = STORE_BACKOFF,
        give_up_after_s: float | None = None,
        max_in_flight: int | None = None,
        supervisor: Supervisor | None = None,
        name: str = "pipeline",
    ) -> None:
        self.pipeline = pipeline
        self.on_done = on_done
        self.on_batch = on_batch
        self.on_retry = on_retry
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.store_backoff = store_backoff
        self.give_up_after_s = give_up_after_s
        self.max_in_flight = max_in_flight or batch_size * 4
        self.name = name
        self.supervisor = supervisor or Supervisor(name)
        self.supervisor.on_fatal(lambda _exc: self._wake_all())
        self.supervisor.watch_work(self.oldest)
        self.stages = pipeline.stages
        self.busy_seconds = dict.fromkeys(self.stages, 0.0)  # cumulative, for reports
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # in_flight moved, or a fatal error
        self._in_flight = 0
        self._by_key: dict[str, deque[_Job]] = {}
        self._streaks: dict[str, int] = {}
        self._closing = threading.Event()
        # Held for each write attempt, so cancel() can wait for one under way.
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(prepare_workers, thread_name_prefix=f"{name}-prepare")
        self._embed_q: queue.Queue[object] = queue.Queue()
        self._write_q: queue.Queue[object] = queue.Queue()
        self._threads = [
            self.supervisor.spawn(f"{name}-embed", self._loop, "embed", self._embed_q,
                                  batch_size, self._embed),
            self.supervisor.spawn(f"{name}-write", self._loop, "write", self._write_q,
                                  batch_size * 2, self._write),
        ]

    # -- intake ------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def error(self) -> BaseException | None:
        return self.supervisor.error

    def submit(self, item: WorkItem, *, block: bool = False) -> None:
        """Queue one event. ``block`` waits while ``max_in_flight`` events are unfinished
        (batch tools; the worker pauses its partitions instead)."""
        job = _Job(item)
        key = item.event.image_id
        with self._changed:
            while True:
                if self.error is not None:
                    raise RuntimeError(f"{self.name}: the ingest pipeline stopped on an "
                                       f"error") from self.error
                if self._closing.is_set():
                    raise RuntimeError(f"{self.name}: the ingest pipeline is closed")
                if not block or self._in_flight < self.max_in_flight:
                    break
                self._changed.wait(_IDLE_TICK_S)
            self._in_flight += 1
            waiting = self._by_key.setdefault(key, deque())
            waiting.append(job)
            if len(waiting) > 1:
                return  # an earlier event for this image runs first
        self._start(job)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted event is done; False on timeout or a fatal error."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._in_flight and self.error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 1.0) if remaining is not None else 1.0)
            return self._in_flight == 0

    def cancel(self, where: Callable[[WorkItem], bool], *, wait_s: float = 3.0) -> int:
        """Drop every unfinished event for which ``where(item)`` holds: none of them will be
        reported. Returns once a write under way (which may hold some of them) is done, or
        after ``wait_s``. Safe from any thread; never calls back into the caller."""
        with self._lock:
            dropped = 0
            for jobs in self._by_key.values():
                for job in jobs:
                    if not job.cancelled and where(job.item):
                        job.cancelled = True
                        dropped += 1
        if dropped and self._write_lock.acquire(timeout=wait_s):
            self._write_lock.release()
        return dropped

    def oldest(self) -> tuple[float, str] | None:
        """The oldest unfinished event's age and where it is, for stall detection."""
        with self._lock:
            heads = [jobs[0] for jobs in self._by_key.values() if jobs]
        live = [j for j in heads if not j.cancelled]
        if not live:
            return None
        job = min(live, key=lambda j: j.submitted_at)
        return time.monotonic() - job.submitted_at, f"event {job.item.key!r} ({job.stage})"

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop all stages. Events not done by now are abandoned: never reported done."""
        self.supervisor.stop()
        self._closing.set()
        self._embed_q.put(_STOP)
        self._write_q.put(_STOP)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                log.warning("%s: thread %s did not stop within %.0fs", self.name, t.name,
                            timeout_s)
        self._wake_all()

    # -- stages ------------------------------------------------------------------------------

    def _start(self, job: _Job) -> None:
        if job.cancelled or self._closing.is_set():
            self._drop(job)
        elif job.is_delete:
            job.stage = "write"
            self._write_q.put(job)
        else:
            job.stage = "prepare"
            try:
                self._pool.submit(self._in_pool, job)
            except RuntimeError:  # the pool shut down: we are closing
                self._drop(job)

    def _in_pool(self, job: _Job) -> None:
        with self.supervisor.guard(f"{self.name}-prepare"):
            self._prepare(job)

    def _prepare(self, job: _Job) -> None:
        if job.cancelled or self._closing.is_set():
            self._drop(job)
            return
        event = job.item.event
        assert isinstance(event, ImageUploaded)
        try:
            try:
                existing = self.pipeline.existing(event.image_id)
            except Exception as exc:  # noqa: BLE001 - a lookup bug fails this event only
                raise InternalError.wrap(exc, "fetch") from exc
            try:
                job.prepared = self.pipeline.prepare(event, existing)
            except ImgSearchError:
                raise
            except Exception as exc:  # noqa: BLE001 - the stage's own wrapping was bypassed
                raise InternalError.wrap(exc, "decode") from exc
        except ImgSearchError as exc:
            self._finish(job, ItemResult(job.item, "failed", exc))
            return
        with self._lock:
            self.busy_seconds["fetch"] += job.prepared.fetch_s
            self.busy_seconds["decode"] += job.prepared.decode_s
        if job.cancelled:
            self._drop(job)
        elif job.prepared.unchanged:
            self._finish(job, ItemResult(job.item, "unchanged"))
        else:
            job.stage = "embed"
            self._embed_q.put(job)

    def _loop(self, stage: str, q: queue.Queue[object], limit: int,
              handle: Callable[[list[_Job]], None]) -> None:
        beat = f"{self.name}-{stage}"
        try:
            while True:
                self.supervisor.beat(beat)
                jobs = self._gather(q, limit)
                if jobs is None:
                    return
                live = self._live(jobs)
                if live and not self._closing.is_set():
                    handle(live)
        finally:
            self.supervisor.forget(beat)

    def _gather(self, q: queue.Queue[object], limit: int) -> list[_Job] | None:
        """Wait for one job, then take more for up to max_wait_s. None means stop; an
        empty list means nothing arrived yet (the loop beats and waits again)."""
        try:
            first = q.get(timeout=_IDLE_TICK_S)
        except queue.Empty:
            return []
        if first is _STOP:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < limit:
            remaining = deadline - time.monotonic()
            try:
                nxt = q.get(timeout=remaining) if remaining > 0 else q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                q.put(_STOP)
                break
            jobs.append(nxt)
        return jobs  # type: ignore[return-value]

    def _live(self, jobs: Iterable[_Job]) -> list[_Job]:
        live = []
        for job in jobs:
            if job.cancelled:
                self._drop(job)
            else:
                live.append(job)
        return live

    # -- embed -----------------------------------------------------------------------------------

    def _embed(self, jobs: list[_Job]) -> None:
        try:
            busy = self.pipeline.embed([(j.item.event, j.prepared) for j in jobs])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - narrowed down below
            self._embed_failed(jobs, exc)
            return
        with self._lock:
            for stage, seconds in busy.items():
                if stage in self.busy_seconds:
                    self.busy_seconds[stage] += seconds
        for job in jobs:
            job.busy = {stage: seconds / len(jobs) for stage, seconds in busy.items()}
            job.stage = "write"
            self._write_q.put(job)

    def _embed_failed(self, jobs: list[_Job], exc: Exception) -> None:
        if len(jobs) == 1:
            self._finish(jobs[0], ItemResult(jobs[0].item, "failed",
                                             InternalError.wrap(exc, "embed")))
            return
        log.warning("%s: embedding %d events failed (%s: %s); checking the model, then "
                    "retrying them in halves to find the event that causes it", self.name,
                    len(jobs), type(exc).__name__, exc)
        self.pipeline.probe()  # raises if the model itself is broken: fatal, nothing lost
        half = len(jobs) // 2
        self._embed(jobs[:half])
        self._embed(jobs[half:])

    # -- write -----------------------------------------------------------------------------------

    def _write(self, jobs: list[_Job]) -> None:
        try:
            self._write_batch(jobs)
        except _Closing:
            return  # abandoned: nothing of this batch is reported done

    def _write_batch(self, jobs: list[_Job]) -> None:
        try:
            took = self._write_retrying(jobs)
        except _Closing:
            raise
        except Exception as exc:  # noqa: BLE001 - the store refused: narrowed down below
            self._write_refused(jobs, exc)
            return
        live = self._live(jobs)
        if not live:
            return
        batch = BatchReport(stage_seconds=dict.fromkeys(self.stages, 0.0))
        batch.stage_seconds["upsert"] = took
        batch.wall_seconds = time.monotonic() - min(j.submitted_at for j in live)
        for job in live:
            if job.prepared is not None:
                batch.stage_seconds["fetch"] += job.prepared.fetch_s
                batch.stage_seconds["decode"] += job.prepared.decode_s
            for stage, seconds in job.busy.items():
                if stage in batch.stage_seconds:
                    batch.stage_seconds[stage] += seconds
            batch.results.append(ItemResult(job.item, "deleted" if job.is_delete else "stored"))
        with self._lock:
            self.busy_seconds["upsert"] += took
        if self.on_batch is not None:
            self.on_batch(batch)
        for job, result in zip(live, batch.results, strict=True):
            self._finish(job, result)

    def _write_retrying(self, jobs: list[_Job]) -> float:
        """Write the jobs' records (those not cancelled meanwhile) until the store takes
        them; returns the seconds the successful attempt took."""

        def attempt() -> float:
            with self._write_lock:
                live = [j for j in jobs if not j.cancelled]
                records = [r for j in live if j.prepared is not None for r in j.prepared.records]
                deletes = [j.item.event.image_id for j in live if j.is_delete]
                started = time.perf_counter()
                self.pipeline.write(records, deletes)
                return time.perf_counter() - started

        def failed(exc: ImgSearchError, attempt_no: int, delay: float) -> None:
            self.supervisor.waiting("store", f"the store is failing, retrying: {exc}")
            if self.on_retry is not None:
                self.on_retry("store")
            log.warning("%s: store write failed (attempt %d), retrying in %.1fs: %s",
                        self.name, attempt_no, delay, exc)

        def recovered(attempts: int) -> None:
            log.info("%s: store write recovered after %d retries", self.name, attempts)

        try:
            return retrying(attempt, backoff=self.store_backoff, wait=self._wait,
                            give_up_after_s=self.give_up_after_s, on_failure=failed,
                            on_recovery=recovered)
        finally:
            self.supervisor.waiting("store", None)

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            if self._closing.wait(min(remaining, _IDLE_TICK_S)):
                raise _Closing()
            self.supervisor.beat(f"{self.name}-write")

    def _write_refused(self, jobs: list[_Job], exc: Exception) -> None:
        """A write failed for a reason retrying will not fix. If the store itself is
        broken, that is fatal; otherwise some event's record is what it refuses."""
        live = self._live(jobs)
        if not live:
            return
        if isinstance(exc, ImgSearchError) and not exc.stage == "store":
            raise exc  # e.g. GaveUp: a batch tool's patience ran out; not about one event
        # A store that is broken (not just refusing this batch) raises here: fatal, nothing
        # lost. One that went down meanwhile is waited for like any outage.
        retrying(self.pipeline.store.ping, backoff=self.store_backoff, wait=self._wait,
                 give_up_after_s=self.give_up_after_s)
        if len(live) == 1:
            self._finish(live[0], ItemResult(live[0].item, "failed",
                                             InternalError.wrap(exc, "upsert")))
            return
        log.warning("%s: the store refused a batch of %d (%s: %s); retrying it in halves to "
                    "find the event it refuses", self.name, len(live), type(exc).__name__, exc)
        half = len(live) // 2
        self._write(live[:half])
        self._write(live[half:])

    # -- bookkeeping -----------------------------------------------------------------------------

    def _drop(self, job: _Job) -> None:
        """A cancelled job leaves without a report."""
        self._release(job)

    def _finish(self, job: _Job, result: ItemResult) -> None:
        self._count_streak(result)
        self.on_done(result)
        self._release(job)

    def _count_streak(self, result: ItemResult) -> None:
        error = result.error
        if result.outcome != "failed" or not isinstance(error, InternalError):
            if self._streaks:
                with self._lock:
                    self._streaks.clear()
            return
        with self._lock:
            streak = self._streaks[error.stage] = self._streaks.get(error.stage, 0) + 1
        if streak >= FAILURE_STREAK_LIMIT:
            raise RuntimeError(f"{streak} events in a row failed in {error.stage} with an "
                               f"unexpected error (last: {error}); the stage looks broken")

    def _release(self, job: _Job) -> None:
        key = job.item.event.image_id
        nxt = None
        with self._changed:
            self._in_flight -= 1
            waiting = self._by_key[key]
            waiting.popleft()
            if waiting:
                nxt = waiting[0]
            else:
                del self._by_key[key]
            self._changed.notify_all()
        if nxt is not None:
            self._start(nxt)

    def _wake_all(self) -> None:
        with self._changed:
            self._changed.notify_all()


def run_all(
    pipeline: IngestPipeline,
    items: Iterable[WorkItem],
    *,
    batch_size: int,
    prepare_workers: int,
    max_wait_s: float = 0.05,
    give_up_after_s: float | None = 120.0,
    progress: Callable[[ItemResult], None] | None = None,
    name: str = "batch",
) -> BatchReport:
    """Run ``items`` through the scheduler and wait for all of them (batch tools, eval,
    tests). Results come back in submission order. A fatal error, or a store that stays
    down for ``give_up_after_s``, raises (what finished before is stored)."""
    started = time.perf_counter()
    order: list[WorkItem] = []
    results: dict[int, ItemResult] = {}
    lock = threading.Lock()

    def done(result: ItemResult) -> None:
        with lock:
            results[id(result.item)] = result
        if progress is not None:
            progress(result)

    supervisor = Supervisor(name)
    scheduler = Scheduler(pipeline, on_done=done, batch_size=batch_size, max_wait_s=max_wait_s,
                          prepare_workers=prepare_workers, give_up_after_s=give_up_after_s,
                          supervisor=supervisor, name=name)
    try:
        for item in items:
            order.append(item)
            scheduler.submit(item, block=True)
        scheduler.wait_idle()
    finally:
        scheduler.close()
    if supervisor.error is not None:
        raise supervisor.error
    report = BatchReport(results=[results[id(item)] for item in order],
                         stage_seconds=dict(scheduler.busy_seconds))
    report.wall_seconds = time.perf_counter() - started
    return report

