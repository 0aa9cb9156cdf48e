"""POST /images hands uploads to the workers through Kafka, and waits for the ack."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from query_api.errors import ApiError
from shared.errors import BrokerError
from shared.kafka import EventPublisher


def producer_overrides(timeout_s: float) -> dict[str, Any]:
    """Producer settings that bound every wait by the publish timeout: a record that cannot
    be delivered in time fails (and is never delivered later, after the client got 503),
    and closing the producer cannot hang on a broker that is gone."""
    window_ms = max(1000, int(timeout_s * 1000))
    return {
        "max_block_ms": window_ms,
        "request_timeout_ms": window_ms - 10,
        "linger_ms": 5,
        "delivery_timeout_ms": window_ms,
    }


class Publishing:
    """Either a given publisher, or one made on first use by ``factory`` (so the API can
    start, and search, while the broker is down); none of both disables uploads."""

    def __init__(
        self,
        publisher: EventPublisher | None,
        factory: Callable[[], EventPublisher] | None,
        timeout_s: float,
    ) -> None:
        self._publisher = publisher
        self._factory = factory
        self._owned = False
        self.timeout_s = timeout_s
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return self._publisher is not None or self._factory is not None

    def _get(self) -> EventPublisher:
        with self._lock:
            if self._publisher is None:
                if self._factory is None:
                    raise ApiError(
                        503, "publishing_disabled",
                        "this API process has no Kafka publisher; uploads are disabled",
                    )
                try:
                    self._publisher = self._factory()
                except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
                    raise BrokerError(f"cannot connect to Kafka: {exc}") from exc
                self._owned = True
            return self._publisher

    def publish(self, envelope: dict[str, Any]) -> Any:
        """Blocking: returns the broker's RecordMetadata once the event is acknowledged."""
        # A little longer than the producer's own delivery timeout, so that its verdict wins.
        return self._get().publish_and_wait(envelope, timeout_s=self.timeout_s + 2.0)

    def close(self) -> None:
        """Close a publisher this object created; a given one belongs to the caller."""
        with self._lock:
            if self._owned and self._publisher is not None:
                # Bounded: pending records expire after the delivery timeout.
                self._publisher.producer.close(timeout=self.timeout_s + 5.0)
                self._publisher = None
