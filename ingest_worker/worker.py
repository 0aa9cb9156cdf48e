"""The consume, process, commit loop.

Delivery is at-least-once with idempotent writes, which makes it effectively once:

1. poll records and parse them; hand each event to the scheduler
   (fetch/decode pool, batched embedding, batched writes: shared/pipeline/scheduler.py);
2. an event that can never succeed goes to the dead-letter topic;
3. an offset is committed only once its record, *and every record before it in its
   partition*, is stored or dead-lettered (ingest_worker/offsets.py).

So a crash at any point replays from the last commit, and replays overwrite the same
point ids. While the store is down, the scheduler retries and fills up; the worker then
pauses its partitions but keeps polling, so it stays in its consumer group.

While the index migrates to another spec (shared/reindex/), each event goes to one
scheduler per collection being written (dual-writes: ``set_targets``), and its offset is
done only once every one of them has finished it. Only the serving collection's failure
dead-letters an event; another collection's failure is counted, and the migration's
reconciliation repairs it.

Rebalances are routine (a peer starts, stops or is scaled). kafka-python runs the
rebalance listener on its IO thread, where no blocking consumer call may be made; so the
listener only does bookkeeping (ingest_worker/rebalance.py), and every commit is made
from this loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from ingest_worker import metrics
from ingest_worker.dead_letters import DeadLetterQueue
from ingest_worker.lag import LagReporter
from ingest_worker.offsets import OffsetTracker
from ingest_worker.rebalance import Listener, fmt
from ingest_worker.targets import SchedulerOptions, Targets
from shared.config import Settings
from shared.errors import BrokerError, EventError, ImgSearchError, InternalError
from shared.events import event_max_bytes, parse_event
from shared.pipeline.report import BatchReport
from shared.pipeline.retry import Backoff, retrying
from shared.pipeline.scheduler import Scheduler
from shared.pipeline.stages import IngestPipeline, ItemResult, WorkItem
from shared.pipeline.supervise import Supervisor

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.5
# How long the rebalance listener waits for a store write under way that holds records
# of revoked partitions (it blocks kafka-python's IO loop, heartbeats included, meanwhile).
REVOKE_WAIT_S = 2.0
RecordKey = tuple[str, int, int]  # topic, partition, offset
# What a commit meets while the group rebalances: not an outage, nothing to back off from.
_REBALANCING = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError,
                UnknownMemberIdError)


class _Stopping(Exception):
    """Raised inside the loop when a stop was asked for while waiting out a failure."""


class IngestWorker:
    def __init__(
        self,
        settings: Settings,
        pipeline: IngestPipeline,
        *,
        dead_letters: DeadLetterQueue,
        consumer_factory: Callable[[ConsumerRebalanceListener], KafkaConsumer],
        supervisor: Supervisor | None = None,
        name: str = "worker",
        collection: str | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.dead_letters = dead_letters
        self.name = name
        self.supervisor = supervisor or Supervisor(name, stall_s=settings.worker_stall_timeout_s)
        self._consumer_factory = consumer_factory
        self._consumer: KafkaConsumer | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()  # after a fatal error: leave at once, no draining
        self._offsets = OffsetTracker()
        self._failures: queue.Queue[ItemResult] = queue.Queue()  # from scheduler threads
        self._records: dict[RecordKey, Any] = {}  # in flight, by key
        self._records_lock = threading.Lock()
        self._dlq_unconfirmed: list[tuple[TopicPartition, int]] = []
        self._scheduler: Scheduler | None = None  # the serving collection's
        # The collections each event is written to (two during a re-index; targets.py).
        self.collection = collection or pipeline.store.spec.name
        self._lag: LagReporter | None = None
        self._backoff = Backoff(base_s=0.5, max_s=settings.store_retry_max_s)
        self._max_event_bytes = event_max_bytes(settings.fetch_max_bytes)
        self.batches_done = 0
        self.revocations = 0  # rebalances that took partitions away from this worker
        self._last_commit = 0.0
        # Keep at most a few batches in flight: enough to overlap stages, bounded memory.
        self.max_in_flight = settings.batch_size * 4
        self.targets = Targets(
            name,
            SchedulerOptions(settings.batch_size, settings.batch_max_wait_ms / 1000,
                             settings.decode_workers, self._backoff, self.max_in_flight),
            self.supervisor, on_finished=self._on_finished, on_batch=self._on_batch)

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish in-flight work and exit. Safe from signal handlers."""
        self._stop.set()

    def abort(self) -> None:
        """Leave at once, after a fatal error: nothing more is drained or committed."""
        self._abort.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def consuming(self) -> bool:
        return self._consumer is not None

    @property
    def ready(self) -> bool:
        return self.consuming and self.supervisor.health().ready

    @property
    def busy_seconds(self) -> dict[str, float]:
        """Cumulative busy time of each pipeline stage (for benchmarks)."""
        return dict(self._scheduler.busy_seconds) if self._scheduler else {}

    @property
    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment()) if self._consumer else set()

    def run(self) -> None:
        self._scheduler = self.targets.start(self.collection, self.pipeline)
        self.targets.apply()
        self._consumer = self._consumer_factory(Listener(self))
        self._lag = LagReporter(self._consumer)
        log.info("%s: consuming %s as group %r", self.name, self.settings.kafka_topic,
                 self.settings.kafka_group_id)
        try:
            while not self._stop.is_set():
                self._step()
            if not self._abort.is_set():
                self._drain(self.settings.worker_shutdown_timeout_s)
        except _Stopping:
            log.info("%s: stopped while waiting; uncommitted work will be redelivered", self.name)
        finally:
            self.supervisor.forget(self.name)
            if self._lag is not None:
                self._lag.clear()
            self.targets.close(abort=self._abort.is_set())
            self._close_consumer()

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            # autocommit=False: closing must never commit what was not stored. Bounded, so
            # a broker that is gone cannot hold the process after a fatal error.
            consumer.close(autocommit=False, timeout_ms=5000)
        except Exception as exc:  # noqa: BLE001 - leaving anyway; the group times us out
            log.warning("%s: closing the consumer failed: %s", self.name, exc)
        log.info("%s: consumer closed", self.name)

    def _step(self) -> None:
        assert self._consumer is not None and self._scheduler is not None
        self.supervisor.beat(self.name)
        self.targets.apply()
        self._settle()
        assignment = self._consumer.assignment()
        full = self.targets.busiest >= self.max_in_flight
        if full:
            # Backpressure: stay in the group (keep polling) without taking more records.
            self._consumer.pause(*assignment)
        else:
            self._consumer.resume(*assignment)
        polled = self._consumer.poll(timeout_ms=100 if full else 200,
                                     max_records=self.settings.batch_size)
        for records in polled.values():
            for record in records:
                self._accept(record)
        self._lag.maybe_report()  # type: ignore[union-attr]

    # -- records in, results out -----------------------------------------------------------------

    def _accept(self, record: Any) -> None:
        if self._stop.is_set() and self._abort.is_set():
            return
        tp = TopicPartition(record.topic, record.partition)
        self._offsets.submitted(tp, record.offset)
        try:
            event = parse_event(record.value, max_bytes=self._max_event_bytes)
        except EventError as exc:
            metrics.EVENTS.labels("invalid").inc()
            self._failed(record, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a parser bug: this event's failure only
            metrics.EVENTS.labels("invalid").inc()
            self._failed(record, InternalError.wrap(exc, "parse"))
            return
        key = (record.topic, record.partition, record.offset)
        with self._records_lock:
            self._records[key] = record
        self.targets.submit(WorkItem(key, event))

    def _on_finished(self, result: ItemResult) -> None:
        # Runs on scheduler threads, once every collection is done with the event.
        if result.outcome == "failed":
            self._failures.put(result)  # dead-lettered from the loop, which owns the producer
            return
        topic, partition, offset = result.item.key  # type: ignore[misc]
        with self._records_lock:
            self._records.pop((topic, partition, offset), None)
        self._offsets.finished(TopicPartition(topic, partition), offset)

    def set_targets(self, pipelines: Mapping[str, IngestPipeline], authority: str) -> None:
        """Write every event to each of ``pipelines``' collections from now on (a re-index;
        ingest_worker/service.py); ``authority``, the serving one, decides dead letters."""
        self.targets.set(pipelines, authority)

    @property
    def writing(self) -> list[str]:
        return self.targets.writing

    def extra_health(self) -> list[Any]:
        return self.targets.health()

    def _failed(self, record: Any, error: ImgSearchError) -> None:
        log.warning("%s: bad event at %s[%d]@%d key=%r: %s: %s", self.name, record.topic,
                    record.partition, record.offset, (record.key or b"")[:200], error.reason,
                    str(error)[:500])
        metrics.FAILURES.labels(error.reason, error.stage).inc()
        self.dead_letters.send(record, error)
        metrics.DEAD_LETTERS.labels(error.reason).inc()
        self._dlq_unconfirmed.append((TopicPartition(record.topic, record.partition), record.offset))

    def _settle(self) -> None:
        """Dead-letter failures, confirm dead letters, commit what is contiguous."""
        while True:
            try:
                result = self._failures.get_nowait()
            except queue.Empty:
                break
            with self._records_lock:
                record = self._records.pop(result.item.key, None)  # type: ignore[arg-type]
            if record is None:
                continue  # its partition was revoked: the new owner handles it
            assert result.error is not None
            self._failed(record, result.error)
        if self._dlq_unconfirmed:
            self._retrying("dlq", self.dead_letters.flush)
            for tp, offset in self._dlq_unconfirmed:
                self._offsets.finished(tp, offset)
            self._dlq_unconfirmed = []
        if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self._retrying("commit", self._commit)
        in_flight = self.targets.busiest
        metrics.INFLIGHT.set(-(-in_flight // self.settings.batch_size))

    def _on_batch(self, batch: BatchReport) -> None:
        # Runs on the scheduler's write thread: only thread-safe things here.
        self.batches_done += 1
        metrics.observe_write(batch)
        log.info("%s: batch %s", self.name, batch.summary())

    def _commit(self) -> bool:
        """Commit the finished prefix of every owned partition. False when the group is
        rebalancing: nothing is lost, the next commit (or the partitions' next owner)
        covers it. A broker that fails otherwise raises BrokerError (retried)."""
        assert self._consumer is not None
        self._last_commit = time.monotonic()
        owned = self.assignment
        progress = {tp: o for tp, o in self._offsets.to_commit().items() if tp in owned}
        if not progress:
            return True
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in progress.items()})
        except _REBALANCING as exc:
            # Routine while peers join or leave: poll() completes the rebalance, and the
            # next commit carries these offsets (commits are cumulative).
            log.info("%s: commit deferred, the group is rebalancing (%s)", self.name,
                     type(exc).__name__)
            return False
        except KafkaError as exc:
            raise BrokerError(f"offset commit failed: {exc}") from exc
        self._offsets.committed(progress)
        return True

    def _drain(self, timeout_s: float) -> None:
        """On stop: let in-flight events finish (bounded), then commit them."""
        assert self._scheduler is not None and self._consumer is not None
        deadline = time.monotonic() + timeout_s
        while self.targets.in_flight and time.monotonic() < deadline:
            if self.supervisor.error is not None:
                return
            self._consumer.pause(*self._consumer.assignment())
            self._consumer.poll(timeout_ms=100)  # stay in the group while finishing
            self.supervisor.beat(self.name)
            self._settle()
        self._settle()
        # The last commit before leaving: worth a few polls if a rebalance is under way.
        while not self._retrying("commit", self._commit) and time.monotonic() < deadline + 5:
            self._consumer.poll(timeout_ms=200)
        if self.targets.in_flight:
            log.warning("%s: stopping with %d events unfinished; they will be redelivered",
                        self.name, self.targets.in_flight)

    # -- rebalances (called by ingest_worker/rebalance.py on kafka-python's IO thread) ---------

    def partitions_revoked(self, revoked: set[TopicPartition], *, lost: bool) -> None:
        """Let go of ``revoked``: drop their unfinished work and unsent dead letters, and
        commit (asynchronously) what of them is finished. Never blocks on the consumer."""
        if not revoked:
            return
        self.revocations += 1

        def theirs(item: WorkItem) -> bool:
            topic, partition, _ = item.key  # type: ignore[misc]
            return TopicPartition(topic, partition) in revoked

        dropped = self.targets.cancel(theirs, wait_s=REVOKE_WAIT_S)
        letters = self.dead_letters.drop(
            lambda record: TopicPartition(record.topic, record.partition) in revoked)
        self._dlq_unconfirmed = [(tp, o) for tp, o in self._dlq_unconfirmed if tp not in revoked]
        with self._records_lock:
            self._records = {k: r for k, r in self._records.items()
                             if TopicPartition(k[0], k[1]) not in revoked}
        self.targets.forget(lambda k: TopicPartition(k[0], k[1]) not in revoked)  # type: ignore[index]
        finished = {tp: o for tp, o in self._offsets.to_commit().items() if tp in revoked}
        if finished and not lost and self._consumer is not None:
            # Fire and forget: if it does not land, the new owner replays a little more.
            self._consumer.commit_async(
                {tp: OffsetAndMetadata(o, "", -1) for tp, o in finished.items()},
                callback=self._async_commit_done)
        self._offsets.forget(revoked)
        log.info("%s: %s %s: %d events dropped for their new owner, %d dead letters left to "
                 "it, finished offsets %s", self.name, "lost" if lost else "revoked",
                 fmt(revoked), dropped, letters,
                 "committed" if finished and not lost else "none to commit")

    def _async_commit_done(self, offsets: dict[TopicPartition, Any], response: Any) -> None:
        if isinstance(response, Exception):
            log.info("%s: commit of revoked partitions did not land (%s); their new owner "
                     "replays from the previous commit", self.name, response)

    # -- waiting out failures ----------------------------------------------------------------

    def _retrying(self, stage: str, fn: Callable[[], Any]) -> Any:
        wait_key = f"{self.name}-{stage}"

        def failed(exc: ImgSearchError, attempt: int, delay: float) -> None:
            self.supervisor.waiting(wait_key, f"{stage} is failing, retrying: {exc}")
            metrics.RETRIES.labels(stage).inc()
            log.warning("%s: %s failed (attempt %d), retrying in %.1fs: %s",
                        self.name, stage, attempt, delay, exc)

        try:
            return retrying(fn, backoff=self._backoff, wait=self._wait_in_group,
                            on_failure=failed,
                            on_recovery=lambda n: log.info("%s: %s recovered after %d retries",
                                                           self.name, stage, n))
        finally:
            self.supervisor.waiting(wait_key, None)

    def _wait_in_group(self, seconds: float) -> None:
        """Sleep without leaving the consumer group: pause, keep polling, resume."""
        assert self._consumer is not None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._stop.is_set():
                raise _Stopping()
            self.supervisor.beat(self.name)
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
