"""Run N ingest workers (threads, one consumer each) over one pipeline until stopped.

``python -m ingest_worker`` and ``imgsearch up`` both start workers through here.
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

log = logging.getLogger(__name__)


class WorkerGroup:
    def __init__(self, components: Components, *, count: int | None = None,
                 **consumer_overrides: Any) -> None:
        settings = components.settings
        self.components = components
        self.pipeline = components.pipeline()
        self.producer = make_producer(settings)
        self.workers = [
            IngestWorker(
                settings,
                self.pipeline,
                dead_letters=DeadLetterQueue(self.producer, settings.kafka_dlq_topic),
                consumer_factory=consumer_factory(settings, **consumer_overrides),
                name=f"worker-{i}",
            )
            for i in range(count or settings.worker_concurrency)
        ]
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        info = components.embedder.info
        metrics.MODEL.info({"model": info.name, "dim": str(info.dim),
                            "device": str(components.embedder.device), "weights": info.weights})

    def start(self) -> None:
        for worker in self.workers:
            thread = threading.Thread(target=self._run, args=(worker,), name=worker.name)
            thread.start()
            self._threads.append(thread)

    def _run(self, worker: IngestWorker) -> None:
        try:
            worker.run()
        except BaseException as exc:
            # A worker that cannot go on stops the group: running on with fewer consumers
            # would hide the failure from the operator.
            log.exception("%s failed; stopping all workers", worker.name)
            self.errors.append(exc)
            self.stop()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        self.stop()
        self.join()
        self.pipeline.close()
        self.producer.close()
