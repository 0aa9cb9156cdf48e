"""The collections a worker writes each event to, and when an event is finished.

Normally one: the collection that serves. During a re-index (shared/reindex/) the new
collection too, so that uploads and deletes that arrive meanwhile reach both. Each
collection has its own scheduler (shared/pipeline/scheduler.py) with that collection's
model; an event is finished, and may be committed, only once every collection it was
given to is done with it. The serving collection's outcome decides (a dead letter, or
not); a failure in the other one is counted and left to the migration's reconciliation.

Changes of the set arrive from any thread (``set``) and are applied by the consume loop
(``apply``); a collection dropped from the set takes no new events and is closed once idle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial

from ingest_worker import metrics
from shared.pipeline.report import BatchReport
from shared.pipeline.retry import Backoff
from shared.pipeline.scheduler import Scheduler
from shared.pipeline.stages import IngestPipeline, ItemResult, WorkItem
from shared.pipeline.supervise import Health, Supervisor
from shared.reindex import metrics as reindex_metrics

log = logging.getLogger(__name__)


@dataclass
class _Target:
    """A collection written through its own scheduler."""

    name: str
    scheduler: Scheduler
    supervisor: Supervisor | None = None  # own, for a collection added later (closable)
    retiring: bool = False  # no new events; closed once idle


@dataclass
class _Fan:
    """A record's progress through every collection it was given to."""

    remaining: int
    authority: str  # the collection whose outcome decides (the serving one)
    result: ItemResult | None = None


@dataclass(frozen=True)
class SchedulerOptions:
    """What every collection's scheduler shares (from the worker's settings)."""

    batch_size: int
    max_wait_s: float
    prepare_workers: int
    backoff: Backoff
    max_in_flight: int


class Targets:
    def __init__(self, worker: str, options: SchedulerOptions, supervisor: Supervisor, *,
                 on_finished: Callable[[ItemResult], None],
                 on_batch: Callable[[BatchReport], None]) -> None:
        self.worker = worker
        self.options = options
        self.supervisor = supervisor
        self._on_finished = on_finished
        self._on_batch = on_batch
        self._targets: dict[str, _Target] = {}
        self._first = ""
        self._authority = ""
        self._fans: dict[Hashable, _Fan] = {}
        self._fans_lock = threading.Lock()
        self._pending: tuple[dict[str, IngestPipeline], str] | None = None
        self._pending_lock = threading.Lock()

    # -- the set ----------------------------------------------------------------------------

    def start(self, collection: str, pipeline: IngestPipeline) -> Scheduler:
        """The first collection: its scheduler lives as long as the worker, under the
        worker's own supervisor."""
        scheduler = self._scheduler(collection, pipeline, self.supervisor, self.worker,
                                    on_batch=self._on_batch)
        self._targets = {collection: _Target(collection, scheduler)}
        self._first = self._authority = collection
        return scheduler

    def set(self, pipelines: Mapping[str, IngestPipeline], authority: str) -> None:
        """Write every event to each of ``pipelines``' collections from now on; ``authority``
        (the serving one) decides dead letters. Safe from any thread."""
        with self._pending_lock:
            self._pending = (dict(pipelines), authority)

    @property
    def writing(self) -> list[str]:
        """The collections new events go to."""
        return [t.name for t in self._targets.values() if not t.retiring]

    def apply(self) -> None:
        """Take a pending change of the set, and close retired collections that are idle
        (from the consume loop)."""
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._change(*pending)
        for name, target in list(self._targets.items()):
            if target.retiring and target.supervisor is not None and \
                    target.scheduler.in_flight == 0:
                target.supervisor.stop()
                target.scheduler.close(timeout_s=5.0)
                del self._targets[name]

    def _change(self, pipelines: dict[str, IngestPipeline], authority: str) -> None:
        for name, pipeline in pipelines.items():
            target = self._targets.get(name)
            if target is not None:
                target.retiring = False
            else:
                log.info("%s: writing collection %s too", self.worker, name)
                # Its own supervisor, so that closing it later is no failure; a fatal error
                # in it is the worker's all the same.
                own = Supervisor(f"{self.worker}@{name}", stall_s=self.supervisor.stall_s,
                                 on_fatal=partial(self.supervisor.fatal, f"{self.worker}@{name}"))
                self._targets[name] = _Target(
                    name, self._scheduler(name, pipeline, own, f"{self.worker}@{name}"), own)
        for name, target in self._targets.items():
            if name not in pipelines and not target.retiring:
                target.retiring = True
                log.info("%s: no longer writing collection %s", self.worker, name)
        live = self.writing
        self._authority = authority if authority in live else (live[0] if live else self._first)
        if not live:  # never write nowhere: keep the first collection
            self._targets[self._first].retiring = False
            self._authority = self._first

    def _scheduler(self, name: str, pipeline: IngestPipeline, supervisor: Supervisor,
                   label: str, on_batch: Callable[[BatchReport], None] | None = None
                   ) -> Scheduler:
        """Batches of the serving collection are what the worker's metrics and log show."""
        o = self.options
        return Scheduler(
            pipeline,
            on_done=partial(self._done, name),
            on_batch=on_batch,
            on_retry=lambda stage: metrics.RETRIES.labels(stage).inc(),
            batch_size=o.batch_size, max_wait_s=o.max_wait_s,
            prepare_workers=o.prepare_workers, store_backoff=o.backoff,
            max_in_flight=o.max_in_flight, supervisor=supervisor, name=label,
        )

    # -- events -----------------------------------------------------------------------------

    def submit(self, item: WorkItem) -> None:
        live = [t for t in self._targets.values() if not t.retiring]
        with self._fans_lock:
            self._fans[item.key] = _Fan(len(live), self._authority)
        for target in live:
            target.scheduler.submit(item)

    def _done(self, collection: str, result: ItemResult) -> None:
        # Runs on scheduler threads: only thread-safe things here.
        key = result.item.key
        with self._fans_lock:
            fan = self._fans.get(key)
            if fan is None:
                return  # its partition was revoked meanwhile
            if collection == fan.authority:
                fan.result = result
            fan.remaining -= 1
            finished = fan.remaining <= 0
            if finished:
                del self._fans[key]
        if collection == fan.authority:
            metrics.EVENTS.labels(result.outcome).inc()
        else:
            reindex_metrics.DUAL_WRITES.labels(result.outcome).inc()
            if result.outcome == "failed":
                log.warning("%s: event %r failed in collection %s (not the serving one; the "
                            "migration's reconciliation repairs it): %s", self.worker,
                            result.item.event.image_id, collection, result.error)
        if finished:
            self._on_finished(fan.result or result)

    def cancel(self, where: Callable[[WorkItem], bool], *, wait_s: float) -> int:
        """Drop unfinished events ``where`` selects, in every collection (a revocation)."""
        targets = list(self._targets.values())
        dropped = 0
        for target in targets:
            dropped = max(dropped, target.scheduler.cancel(where, wait_s=wait_s / max(1, len(targets))))
        return dropped

    def forget(self, keep: Callable[[Hashable], bool]) -> None:
        """Drop the progress records of events whose key ``keep`` rejects."""
        with self._fans_lock:
            self._fans = {k: f for k, f in self._fans.items() if keep(k)}

    # -- state --------------------------------------------------------------------------------

    @property
    def busiest(self) -> int:
        return max((t.scheduler.in_flight for t in self._targets.values()), default=0)

    @property
    def in_flight(self) -> int:
        return sum(t.scheduler.in_flight for t in self._targets.values())

    @property
    def busy_seconds(self) -> dict[str, float]:
        first = self._targets.get(self._first)
        return dict(first.scheduler.busy_seconds) if first else {}

    def health(self) -> list[Health]:
        """The health of the later collections' own supervisors."""
        return [t.supervisor.health() for t in self._targets.values() if t.supervisor is not None]

    def close(self, *, abort: bool) -> None:
        # After a fatal error a stage thread may be stuck: do not wait long for it.
        for target in self._targets.values():
            if target.supervisor is not None:
                target.supervisor.stop()
            target.scheduler.close(timeout_s=1.0 if abort else 10.0)

    def __repr__(self) -> str:
        return f"Targets({self.writing}, serving={self._authority})"

