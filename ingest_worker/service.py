"""Run N ingest workers (threads, one consumer each) over one pipeline until stopped.

``python -m ingest_worker`` and ``imgsearch up`` both start workers through here. One
supervisor watches every thread of the group (consume loops, stage threads): a fatal
error anywhere aborts all workers, and ``errors`` says why, so the process exits
non-zero and its orchestrator restarts it. Running on with fewer consumers would hide
the failure.

The group follows its index (shared/reindex/specs.py): while a migration is active, every
worker writes each event to both of its collections, and after a swap the new serving
collection decides dead letters. It learns of both from the catalog, without a restart.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ingest_worker import metrics
from ingest_worker.dead_letters import DeadLetterQueue
from ingest_worker.worker import IngestWorker, consumer_factory
from shared.components import Components
from shared.kafka import make_producer
from shared.pipeline.stages import IngestPipeline
from shared.pipeline.supervise import Health, Supervisor
from shared.reindex.specs import IndexState, SpecSet

log = logging.getLogger(__name__)


class WorkerGroup:
    def __init__(self, components: Components, *, count: int | None = None,
                 name: str = "worker", specs: SpecSet | None = None,
                 **consumer_overrides: Any) -> None:
        settings = components.settings
        self.components = components
        self.pipeline = components.pipeline()
        # --- Re-index: the collections of the index this group writes (one SpecSet per
        # process; `imgsearch up` shares its own with the API) ---
        self.specs = specs if specs is not None else SpecSet(components)
        self._own_specs = specs is None
        self.collection = components.store.spec.name
        self._pipelines: dict[str, IngestPipeline] = {self.collection: self.pipeline}
        self._following = threading.Lock()
        self.producer = make_producer(settings)
        self.supervisor = Supervisor("ingest", stall_s=settings.worker_stall_timeout_s,
                                     on_fatal=self._on_fatal)
        self.workers = [
            IngestWorker(
                settings,
                self.pipeline,
                dead_letters=DeadLetterQueue(self.producer, settings.kafka_dlq_topic),
                consumer_factory=consumer_factory(settings, **consumer_overrides),
                supervisor=self.supervisor,
                name=f"{name}-{i}",
                collection=self.collection,
            )
            for i in range(count or settings.worker_concurrency)
        ]
        self._threads: list[Any] = []
        self._stopped = False
        info = components.embedder.info
        metrics.MODEL.info({"model": info.name, "dim": str(info.dim),
                            "device": str(components.embedder.device), "weights": info.weights})
        metrics.READY.set_function(lambda: 1.0 if self.health().ready else 0.0)

    @property
    def errors(self) -> list[BaseException]:
        return [self.supervisor.error] if self.supervisor.error is not None else []

    def _on_fatal(self, _exc: BaseException) -> None:
        for worker in self.workers:
            worker.abort()

    def start(self) -> None:
        # Know what to write before the first event is consumed.
        self.specs.subscribe(self._follow)
        state = self.specs.start() if self._own_specs else self.specs.state
        if state is not None:
            self._follow(state)
        for worker in self.workers:
            self._threads.append(self.supervisor.spawn(worker.name, worker.run))

    def _follow(self, state: IndexState) -> None:
        """Point every worker at the collections ``state`` needs (called on the watch thread)."""
        with self._following:
            self._follow_locked(state)

    def _follow_locked(self, state: IndexState) -> None:
        pipelines: dict[str, IngestPipeline] = {}
        for physical in state.needed:
            components = self.specs.components(physical)
            if components is None:
                log.error("index %r needs collection %r, which this process could not load "
                          "(%s): events are not written to it; the migration's "
                          "reconciliation catches up once it can", self.specs.logical,
                          physical, self.specs.errors.get(physical, "not loaded"))
                continue
            if physical not in self._pipelines:
                self._pipelines[physical] = components.pipeline()
            pipelines[physical] = self._pipelines[physical]
        if not pipelines:
            return
        authority = state.serving if state.serving in pipelines else next(iter(pipelines))
        for physical, pipeline in pipelines.items():
            # One pipeline keeps the blobs of inline uploads: several would race on them.
            if hasattr(pipeline, "keeping"):
                pipeline.keeping = physical == authority
        if set(pipelines) != {self.collection} or authority != self.collection:
            log.info("ingest writes %s; %s decides dead letters", ", ".join(pipelines),
                     authority)
        for worker in self.workers:
            worker.set_targets(pipelines, authority)

    def health(self) -> Health:
        health = self.supervisor.health()
        if not health.ready:
            return health
        for extra in (h for w in self.workers for h in w.extra_health()):
            if not extra.ready:
                return extra
        if self._stopped:
            return Health(True, False, "stopping")
        starting = [w.name for w in self.workers if not w.consuming]
        if not self._threads or starting:
            return Health(True, False, f"starting: {', '.join(starting) or 'workers'}")
        return health

    def stop(self) -> None:
        self._stopped = True
        self.supervisor.stop()
        for worker in self.workers:
            worker.stop()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop, wait for the workers (bounded: a thread stuck after a fatal error must not
        keep the process), then release the pipeline and the producer."""
        self.stop()
        settings = self.components.settings
        self.join(timeout_s if timeout_s is not None else settings.worker_shutdown_timeout_s + 15)
        if self.alive:
            log.warning("ingest workers did not stop in time; leaving them behind")
        for pipeline in self._pipelines.values():
            pipeline.close()
        if self._own_specs:
            self.specs.close()
        self.producer.close(timeout=5)
