"""The consume, process, commit loop.

Delivery is at-least-once with idempotent writes, which makes it effectively once:

1. poll records into a micro-batch (BATCH_SIZE, or what arrives within BATCH_MAX_WAIT_MS);
2. parse each record; hand the events to the pipeline (fetch, decode, embed, upsert);
3. send the events that can never succeed to the dead-letter topic and wait for its ack;
4. commit, per partition, the offset after the batch's last record.

Nothing is committed before the store has confirmed the batch, so a crash at any point
replays from the last commit, and replays overwrite the same point ids.

While the store is down the worker pauses its partitions and keeps polling, so it stays
in its consumer group, and retries with capped exponential backoff and jitter.
"""

from __future__ import annotations

import logging
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
from shared.config import Settings
from shared.errors import BrokerError, EventError, ImgSearchError
from shared.events import parse_event
from shared.pipeline import IngestPipeline, WorkItem

log = logging.getLogger(__name__)

IDLE_OPTIMIZE_AFTER_S = 5.0


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


def _bytes(records: list[Any]) -> int:
    return sum(len(r.value or b"") for r in records)


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
        self._buffer: list[Any] = []  # polled, not yet processed
        self._revoked: set[TopicPartition] = set()
        self.ready = threading.Event()
        self.batches_done = 0
        self.revocations = 0  # rebalances that took partitions away from this worker
        self._last_activity = time.monotonic()
        self._optimized_since_activity = True

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit. Safe from signal handlers."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment()) if self._consumer else set()

    def run(self) -> None:
        self._consumer = self._consumer_factory(_Listener(self))
        self.ready.set()
        metrics.READY.set(1)
        log.info("%s: consuming %s as group %r", self.name, self.settings.kafka_topic,
                 self.settings.kafka_group_id)
        try:
            while not self._stop.is_set():
                records = self._collect_batch()
                if records:
                    self._handle(records)
                else:
                    self._maybe_optimize()
        except _Stopping:
            log.info("%s: stopped while waiting; uncommitted work will be redelivered", self.name)
        finally:
            self.ready.clear()
            # autocommit=False: closing must never commit what was not stored.
            self._consumer.close(autocommit=False)
            self._consumer = None
            log.info("%s: consumer closed", self.name)

    # -- batching --------------------------------------------------------------------------

    def _collect_batch(self) -> list[Any]:
        assert self._consumer is not None
        size = self.settings.batch_size
        max_wait = self.settings.batch_max_wait_ms / 1000
        deadline: float | None = None
        while (len(self._buffer) < size and not self._stop.is_set()
               and _bytes(self._buffer) < self.settings.batch_max_bytes):
            if deadline is None:
                timeout_ms = 500
            else:
                timeout_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=size - len(self._buffer))
            for records in polled.values():
                self._buffer.extend(records)
            if not self._buffer:
                return []
            if deadline is None:
                deadline = time.monotonic() + max_wait
            if time.monotonic() >= deadline:
                break
        # Cut at the count or the byte bound, whichever comes first (always at least one).
        cut, total = 0, 0
        while cut < min(size, len(self._buffer)):
            total += len(self._buffer[cut].value or b"")
            if cut and total > self.settings.batch_max_bytes:
                break
            cut += 1
        batch, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return batch

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("%s: revoked %s", self.name, _fmt(revoked))
        # Polled but unprocessed records go back to the partition's next owner.
        self._buffer = [
            r for r in self._buffer if TopicPartition(r.topic, r.partition) not in revoked
        ]
        self._revoked |= revoked
        self.revocations += 1

    # -- one batch -------------------------------------------------------------------------

    def _handle(self, records: list[Any]) -> None:
        started = time.monotonic()
        metrics.INFLIGHT.inc()
        try:
            self._revoked = set()
            by_key = {(r.topic, r.partition, r.offset): r for r in records}
            items: list[WorkItem] = []
            failed: list[tuple[Any, ImgSearchError]] = []
            for record in records:
                try:
                    event = parse_event(record.value)
                except EventError as exc:
                    failed.append((record, exc))
                    continue
                items.append(WorkItem((record.topic, record.partition, record.offset), event))

            report = self._retrying("store", lambda: self.pipeline.process(self._live(items)))
            failed += [(by_key[r.item.key], r.error) for r in report.failures if r.error]
            for record, error in failed:
                log.warning(
                    "%s: bad event at %s[%d]@%d key=%r: %s: %s", self.name, record.topic,
                    record.partition, record.offset, record.key, error.reason, error,
                )
                metrics.FAILURES.labels(error.reason, error.stage).inc()
            if failed:
                self._retrying("dlq", lambda: self._dead_letter(failed))
            metrics.observe_batch(report, invalid=len(records) - len(items))
            self._retrying("commit", lambda: self._commit(records))
            self.batches_done += 1
            metrics.BATCH_SECONDS.observe(time.monotonic() - started)
            log.info("%s: batch %s invalid=%d", self.name, report.summary(),
                     len(records) - len(items))
        finally:
            metrics.INFLIGHT.dec()
            self._last_activity = time.monotonic()
            self._optimized_since_activity = False

    def _live(self, items: list[WorkItem]) -> list[WorkItem]:
        """Items whose partitions are still ours (a rebalance may happen while retrying)."""
        if not self._revoked:
            return items
        return [it for it in items if TopicPartition(*it.key[:2]) not in self._revoked]  # type: ignore[index]

    def _dead_letter(self, failed: list[tuple[Any, ImgSearchError]]) -> None:
        for record, error in failed:
            if TopicPartition(record.topic, record.partition) in self._revoked:
                continue
            self.dead_letters.send(record, error)
        self.dead_letters.flush()
        for record, error in failed:
            metrics.DEAD_LETTERS.labels(error.reason).inc()

    def _commit(self, records: list[Any]) -> None:
        assert self._consumer is not None
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        owned = self.assignment
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if tp in self._revoked or tp not in owned:
                continue  # the new owner re-processes it; the write is idempotent
            if tp not in offsets or record.offset + 1 > offsets[tp].offset:
                offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group rebalanced under us. The batch is stored; its records will be
            # redelivered to their new owner and overwrite the same points.
            log.warning("%s: commit refused after a rebalance (%s); records will be replayed",
                        self.name, exc)
        except KafkaError as exc:
            raise BrokerError(f"offset commit failed: {exc}") from exc

    # -- waiting out failures ----------------------------------------------------------------

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
                self.ready.clear()
                metrics.READY.set(0)
                metrics.RETRIES.labels(stage).inc()
                log.warning("%s: %s failed (attempt %d), retrying in %.1fs: %s",
                            self.name, stage, attempt, delay, exc)
                self._wait_in_group(delay)
                continue
            if attempt:
                log.info("%s: %s recovered after %d retries", self.name, stage, attempt)
            self.ready.set()
            metrics.READY.set(1)
            return result

    def _wait_in_group(self, seconds: float) -> None:
        """Sleep without leaving the consumer group: pause, keep polling, resume."""
        assert self._consumer is not None
        end = time.monotonic() + seconds
        while True:
            if self._stop.is_set():
                raise _Stopping()
            assignment = self._consumer.assignment()
            self._consumer.pause(*assignment)
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            polled = self._consumer.poll(timeout_ms=int(min(remaining, 0.5) * 1000))
            for records in polled.values():
                # Newly assigned partitions are not paused yet: keep their records for later.
                self._buffer.extend(records)
        self._consumer.resume(*self._consumer.assignment())

    def _maybe_optimize(self) -> None:
        idle = time.monotonic() - self._last_activity
        if self._optimized_since_activity or idle < IDLE_OPTIMIZE_AFTER_S:
            return
        self._optimized_since_activity = True
        try:
            self.pipeline.store.optimize()
        except ImgSearchError as exc:
            log.warning("%s: store optimisation failed (will retry when idle again): %s",
                        self.name, exc)


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
