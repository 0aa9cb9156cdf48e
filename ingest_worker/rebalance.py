"""The rebalance listener: what a worker does when the group takes partitions away.

kafka-python 3.0 calls this on its IO thread, the one that also sends heartbeats, while
the worker's own thread waits inside ``poll()`` (or ``close()``). A blocking consumer
call from here raises "Cannot block on net.run() from the IO thread"; so this only hands
the news to the worker, whose handler does bookkeeping and non-blocking calls
(``commit_async``). On close, kafka-python calls ``on_partitions_revoked`` too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

if TYPE_CHECKING:
    from ingest_worker.worker import IngestWorker

log = logging.getLogger(__name__)


def fmt(partitions: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))


class Listener(ConsumerRebalanceListener):
    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._hand_over(set(revoked), lost=False)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        # Evicted from the group: the partitions already have other owners, so nothing of
        # them may be committed; unfinished work is dropped all the same.
        self._hand_over(set(lost), lost=True)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            log.info("%s: assigned %s", self.worker.name, fmt(set(assigned)))

    def _hand_over(self, partitions: set[TopicPartition], *, lost: bool) -> None:
        # An exception here would surface from poll() as a KafkaError; a failure in our
        # own bookkeeping is a bug that must stop the process instead (supervisor).
        with self.worker.supervisor.guard(f"{self.worker.name}-rebalance"):
            self.worker.partitions_revoked(partitions, lost=lost)
