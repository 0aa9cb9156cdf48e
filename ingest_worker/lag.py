"""Consumer lag per partition: the log end offset minus the group's committed offset.

Kafka does not push lag to consumers, so the worker asks the broker itself, every few
seconds, for the partitions it owns. It must ask from its own polling thread because
KafkaConsumer is not thread-safe; that is why the reporter is driven by the consume loop
(``maybe_report()`` once per iteration) rather than by a timer thread.

Lag is an observation, not part of the work: a failed measurement is logged and counted
(``imgsearch_ingest_lag_measurement_errors_total``) and never raised into the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition

from ingest_worker import metrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
# Whole-measurement budget: the loop must get back to poll() well within max.poll.interval.
DEFAULT_BUDGET_S = 5.0

# Several workers (threads) in one process share the gauge. After a rebalance moves a
# partition between two of them, the old owner must not delete the new owner's series.
_owners: dict[tuple[str, int], int] = {}
_owners_lock = threading.Lock()


class LagReporter:
    """Sets ``metrics.LAG`` for a consumer's assigned partitions, at most every ``interval_s``."""

    def __init__(
        self,
        consumer: Any,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        budget_s: float = DEFAULT_BUDGET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.interval_s = interval_s
        self.budget_s = budget_s
        self._clock = clock
        self._next_at = clock()  # the first call measures at once
        self._reported: set[TopicPartition] = set()

    def maybe_report(self) -> dict[TopicPartition, int] | None:
        """Measure if the interval has passed; returns the lags measured, else None."""
        now = self._clock()
        if now < self._next_at:
            return None
        self._next_at = now + self.interval_s
        return self.report()

    def report(self) -> dict[TopicPartition, int] | None:
        """Measure now. Returns {partition: lag}, or None when the measurement failed."""
        try:
            assigned = set(self.consumer.assignment() or ())
        except Exception as exc:  # noqa: BLE001 - an observation must not stop the consumer
            self._failed(exc)
            return None
        # Partitions revoked since the last report are someone else's now.
        self._release(self._reported - assigned)
        self._reported &= assigned
        try:
            lags = self._measure(assigned)
        except Exception as exc:  # noqa: BLE001 - see above; logged and counted
            self._failed(exc)
            return None
        with _owners_lock:
            for tp, lag in lags.items():
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(lag)
                _owners[(tp.topic, tp.partition)] = id(self)
        self._reported = set(lags)
        return lags

    def clear(self) -> None:
        """Remove this reporter's series (call when its consumer closes)."""
        self._release(self._reported)
        self._reported = set()

    # -- internals ---------------------------------------------------------------------------

    def _measure(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        if not assigned:
            return {}
        deadline = self._clock() + self.budget_s
        partitions = sorted(assigned)
        end = self.consumer.end_offsets(partitions, timeout_ms=self._remaining_ms(deadline))
        committed: dict[TopicPartition, int | None] = {}
        for tp in partitions:
            committed[tp] = self.consumer.committed(tp, timeout_ms=self._remaining_ms(deadline))
        never = [tp for tp in partitions if committed[tp] is None]
        # A group that never committed on a partition starts at the log start
        # (auto_offset_reset=earliest), so everything from there on is behind.
        start = (
            self.consumer.beginning_offsets(never, timeout_ms=self._remaining_ms(deadline))
            if never
            else {}
        )
        lags: dict[TopicPartition, int] = {}
        for tp in partitions:
            if tp not in end:
                continue
            base = committed[tp] if committed[tp] is not None else start.get(tp)
            if base is None:
                continue
            # The end offset is read before the commits; a commit made in between can
            # pass it, which is "no lag", not negative lag.
            lags[tp] = max(0, int(end[tp]) - int(base))
        return lags

    def _remaining_ms(self, deadline: float) -> int:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise TimeoutError(f"lag measurement took longer than {self.budget_s:.1f}s")
        return max(1, int(remaining * 1000))

    def _release(self, partitions: set[TopicPartition]) -> None:
        with _owners_lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if _owners.get(key) != id(self):
                    continue
                del _owners[key]
                metrics.LAG.remove(tp.topic, str(tp.partition))

    def _failed(self, exc: Exception) -> None:
        metrics.LAG_ERRORS.inc()
        # Format now: a record holding the exception would keep its traceback (and the
        # client's sockets in those frames) alive for as long as any handler keeps records.
        log.warning("could not measure consumer lag (the lag gauge keeps its last values): %s",
                    f"{type(exc).__name__}: {exc}")
