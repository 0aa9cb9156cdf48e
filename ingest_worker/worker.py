"""The consume, process, commit loop.

Delivery is at-least-once with idempotent writes, which makes it effectively once:

1. poll records and parse them; hand each event to the staged pipeline
   (fetch/decode pool, batched embedding, batched writes: shared/staged.py);
2. an event that can never succeed goes to the dead-letter topic;
3. an offset is committed only once its record, *and every record before it in its
   partition*, is stored or dead-lettered (ingest_worker/offsets.py).

So a crash at any point replays from the last commit, and replays overwrite the same
point ids. While the store is down, the pipeline retries and fills up; the worker then
pauses its partitions but keeps polling, so it stays in its consumer group.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from ingest_worker import metrics
from ingest_worker.dead_letters import DeadLetterQueue
from ingest_worker.lag import LagReporter
from ingest_worker.offsets import OffsetTracker
from shared.config import Settings
from shared.errors import BrokerError, EventError, ImgSearchError
from shared.events import parse_event
from shared.pipeline import IngestPipeline, ItemResult, WorkItem
from shared.staged import StagedPipeline, WriteBatch

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.5
REVOKE_DRAIN_S = 10.0


class _Stopping(Exception):
    """Raised inside the loop when a stop was asked for while waiting out a failure."""


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.worker._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            log.info("%s: assigned %s", self.worker.name, _fmt(assigned))


def _fmt(partitions: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))


class IngestWorker:
    def __init__(
        self,
        settings: Settings,
        pipeline: IngestPipeline,
        *,
        dead_letters: DeadLetterQueue,
        consumer_factory: Callable[[ConsumerRebalanceListener], KafkaConsumer],
        name: str = "worker",
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.dead_letters = dead_letters
        self.name = name
        self._consumer_factory = consumer_factory
        self._consumer: KafkaConsumer | None = None
        self._stop = threading.Event()
        self._offsets = OffsetTracker()
        self._done: queue.Queue[ItemResult] = queue.Queue()  # from pipeline threads
        self._records: dict[tuple[str, int, int], Any] = {}  # in flight, by key
        self._dlq_unconfirmed: list[tuple[TopicPartition, int]] = []
        self._staged: StagedPipeline | None = None
        self._lag: LagReporter | None = None
        self.ready = threading.Event()
        self.batches_done = 0
        self.revocations = 0  # rebalances that took partitions away from this worker
        self._last_commit = 0.0
        # Keep at most a few batches in flight: enough to overlap stages, bounded memory.
        self.max_in_flight = settings.batch_size * 4

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish in-flight work and exit. Safe from signal handlers."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def busy_seconds(self) -> dict[str, float]:
        """Cumulative busy time of each pipeline stage (for benchmarks)."""
        return dict(self._staged.busy_seconds) if self._staged else {}

    @property
    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment()) if self._consumer else set()

    def run(self) -> None:
        self._staged = StagedPipeline(
            self.pipeline,
            on_done=self._done.put,
            on_batch=self._on_batch,
            on_retry=lambda stage: metrics.RETRIES.labels(stage).inc(),
            batch_size=self.settings.batch_size,
            max_wait_s=self.settings.batch_max_wait_ms / 1000,
            prepare_workers=self.settings.decode_workers,
            retry_max_s=self.settings.store_retry_max_s,
            name=self.name,
        )
        self._consumer = self._consumer_factory(_Listener(self))
        self._lag = LagReporter(self._consumer)
        self.ready.set()
        metrics.READY.set(1)
        log.info("%s: consuming %s as group %r", self.name, self.settings.kafka_topic,
                 self.settings.kafka_group_id)
        try:
            while not self._stop.is_set():
                self._step()
            self._drain(self.settings.worker_shutdown_timeout_s)
        except _Stopping:
            log.info("%s: stopped while waiting; uncommitted work will be redelivered", self.name)
        finally:
            self.ready.clear()
            if self._lag is not None:
                self._lag.clear()
            self._staged.close()
            if self._consumer is not None:
                # autocommit=False: closing must never commit what was not stored.
                self._consumer.close(autocommit=False)
                self._consumer = None
            log.info("%s: consumer closed", self.name)

    def _step(self) -> None:
        assert self._consumer is not None and self._staged is not None
        if self._staged.error is not None:
            raise RuntimeError(f"{self.name}: ingest pipeline failed") from self._staged.error
        self._settle()
        self._set_ready(self._staged.ready.is_set())
        assignment = self._consumer.assignment()
        full = self._staged.in_flight >= self.max_in_flight
        if full:
            # Backpressure: stay in the group (keep polling) without taking more records.
            self._consumer.pause(*assignment)
        else:
            self._consumer.resume(*assignment)
        polled = self._consumer.poll(timeout_ms=100 if full else 200,
                                     max_records=self.settings.batch_size)
        records = [r for batch in polled.values() for r in batch]
        for record in records:
            self._accept(record)
        self._lag.maybe_report()  # type: ignore[union-attr]

    # -- records in, results out -----------------------------------------------------------------

    def _accept(self, record: Any) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self._offsets.submitted(tp, record.offset)
        try:
            event = parse_event(record.value)
        except EventError as exc:
            metrics.EVENTS.labels("invalid").inc()
            self._failed(record, exc)
            return
        key = (record.topic, record.partition, record.offset)
        self._records[key] = record
        self._staged.submit(WorkItem(key, event))  # type: ignore[union-attr]

    def _failed(self, record: Any, error: ImgSearchError) -> None:
        log.warning("%s: bad event at %s[%d]@%d key=%r: %s: %s", self.name, record.topic,
                    record.partition, record.offset, record.key, error.reason, error)
        metrics.FAILURES.labels(error.reason, error.stage).inc()
        self.dead_letters.send(record, error)
        metrics.DEAD_LETTERS.labels(error.reason).inc()
        self._dlq_unconfirmed.append((TopicPartition(record.topic, record.partition), record.offset))

    def _settle(self, *, retry: bool = True) -> None:
        """Take finished results, confirm dead letters, commit what is contiguous.

        ``retry=False`` is for the rebalance callback, which runs inside poll() and so
        must not poll again: a failure there is raised once instead of waited out.
        """
        while True:
            try:
                result = self._done.get_nowait()
            except queue.Empty:
                break
            topic, partition, offset = result.item.key  # type: ignore[misc]
            record = self._records.pop((topic, partition, offset), None)
            metrics.EVENTS.labels(result.outcome).inc()
            if result.outcome == "failed" and result.error is not None and record is not None:
                self._failed(record, result.error)
            else:
                self._offsets.finished(TopicPartition(topic, partition), offset)
        if self._dlq_unconfirmed:
            if retry:
                self._retrying("dlq", self.dead_letters.flush)
            else:
                self.dead_letters.flush()
            for tp, offset in self._dlq_unconfirmed:
                self._offsets.finished(tp, offset)
            self._dlq_unconfirmed = []
        if not retry:
            self._commit()
        elif time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self._retrying("commit", self._commit)
        in_flight = self._staged.in_flight if self._staged else 0
        metrics.INFLIGHT.set(-(-in_flight // self.settings.batch_size))

    def _on_batch(self, batch: WriteBatch) -> None:
        # Runs on the pipeline's write thread: only thread-safe things here.
        self.batches_done += 1
        metrics.observe_write(batch)
        log.info("%s: batch %s", self.name, batch.summary())

    def _commit(self) -> None:
        assert self._consumer is not None
        self._last_commit = time.monotonic()
        owned = self.assignment
        progress = {tp: o for tp, o in self._offsets.to_commit().items() if tp in owned}
        if not progress:
            return
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in progress.items()})
        except CommitFailedError as exc:
            # The group rebalanced under us. The records are stored; they will be
            # redelivered to their new owner and overwrite the same points.
            log.warning("%s: commit refused after a rebalance (%s); records will be replayed",
                        self.name, exc)
            return
        except KafkaError as exc:
            raise BrokerError(f"offset commit failed: {exc}") from exc
        self._offsets.committed(progress)

    def _drain(self, timeout_s: float) -> None:
        """On stop: let in-flight events finish (bounded), then commit them."""
        assert self._staged is not None
        deadline = time.monotonic() + timeout_s
        while self._staged.in_flight and time.monotonic() < deadline:
            if self._staged.error is not None:
                break
            assert self._consumer is not None
            self._consumer.pause(*self._consumer.assignment())
            self._consumer.poll(timeout_ms=100)  # stay in the group while finishing
            self._settle()
        self._settle()
        self._last_commit = 0.0
        self._retrying("commit", self._commit)
        if self._staged.in_flight:
            log.warning("%s: stopping with %d events unfinished; they will be redelivered",
                        self.name, self._staged.in_flight)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        self.revocations += 1
        log.info("%s: revoked %s", self.name, _fmt(revoked))
        # Give in-flight events of these partitions a moment to finish and be committed;
        # whatever is still running after that is replayed by the partitions' next owner.
        deadline = time.monotonic() + REVOKE_DRAIN_S
        pipeline_alive = self._staged is not None and self._staged.error is None
        while (pipeline_alive and self._offsets.in_flight(revoked)
               and time.monotonic() < deadline):
            time.sleep(0.05)
            self._settle_quietly()
        self._settle_quietly()
        self._offsets.forget(revoked)
        self._records = {k: r for k, r in self._records.items()
                         if TopicPartition(k[0], k[1]) not in revoked}

    def _settle_quietly(self) -> None:
        try:
            self._settle(retry=False)
        except ImgSearchError as exc:
            log.warning("%s: could not commit during a rebalance (records will be replayed): %s",
                        self.name, exc)

    # -- waiting out failures ----------------------------------------------------------------

    def _set_ready(self, ready: bool) -> None:
        if ready:
            self.ready.set()
        else:
            self.ready.clear()
        metrics.READY.set(1 if ready else 0)

    def _retrying(self, stage: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                result = fn()
            except ImgSearchError as exc:
                if not exc.retriable:
                    raise
                delay = min(self.settings.store_retry_max_s, 0.5 * 2**attempt)
                delay *= 0.5 + random.random() / 2  # jitter: workers do not retry in lockstep
                attempt += 1
                self._set_ready(False)
                metrics.RETRIES.labels(stage).inc()
                log.warning("%s: %s failed (attempt %d), retrying in %.1fs: %s",
                            self.name, stage, attempt, delay, exc)
                self._wait_in_group(delay)
                continue
            if attempt:
                log.info("%s: %s recovered after %d retries", self.name, stage, attempt)
                self._set_ready(True)
            return result

    def _wait_in_group(self, seconds: float) -> None:
        """Sleep without leaving the consumer group: pause, keep polling, resume."""
        assert self._consumer is not None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._stop.is_set():
                raise _Stopping()
            self._consumer.pause(*self._consumer.assignment())
            polled = self._consumer.poll(timeout_ms=int(min(end - time.monotonic(), 0.5) * 1000))
            for records in polled.values():
                for record in records:  # newly assigned partitions are not paused yet
                    self._accept(record)
            if self._lag is not None:
                self._lag.maybe_report()


def consumer_factory(settings: Settings, **overrides: Any) -> Callable[[ConsumerRebalanceListener], KafkaConsumer]:
    from shared.kafka import make_consumer

    def build(listener: ConsumerRebalanceListener) -> KafkaConsumer:
        try:
            return make_consumer(settings, listener=listener, **overrides)
        except KafkaError as exc:
            raise BrokerError(
                f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}: {exc}"
            ) from exc

    return build
