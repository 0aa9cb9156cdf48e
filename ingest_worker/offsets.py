"""Which offsets may be committed: the contiguous run of finished records per partition.

Records finish out of order (a slow fetch, a small batch that overtakes a big one), but a
committed offset promises that *every* record before it is done. So each partition keeps
its submitted offsets in order and advances only over a finished prefix, as faust does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from kafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._committable: dict[TopicPartition, int] = {}  # next offset to commit
        self._committed: dict[TopicPartition, int] = {}

    def submitted(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            self._pending.setdefault(tp, deque()).append(offset)
            self._done.setdefault(tp, set())

    def finished(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            pending = self._pending.get(tp)
            if pending is None:
                return  # the partition was revoked and forgotten; its new owner replays it
            self._done[tp].add(offset)
            while pending and pending[0] in self._done[tp]:
                self._done[tp].discard(pending[0])
                self._committable[tp] = pending.popleft() + 1

    def in_flight(self, partitions: Iterable[TopicPartition] | None = None) -> int:
        with self._lock:
            keys = self._pending.keys() if partitions is None else partitions
            return sum(len(self._pending.get(tp, ())) for tp in keys)

    def to_commit(self) -> dict[TopicPartition, int]:
        """Offsets that moved since the last ``committed()``."""
        with self._lock:
            return {tp: o for tp, o in self._committable.items() if self._committed.get(tp) != o}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop all state of partitions this consumer no longer owns."""
        with self._lock:
            for tp in partitions:
                self._pending.pop(tp, None)
                self._done.pop(tp, None)
                self._committable.pop(tp, None)
                self._committed.pop(tp, None)
