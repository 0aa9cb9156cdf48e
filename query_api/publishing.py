"""POST /images hands uploads to the workers through Kafka, and waits for the ack."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from query_api.errors import ApiError
from shared.errors import BrokerError
from shared.kafka import EventPublisher


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
        return self._get().publish_and_wait(envelope, timeout_s=self.timeout_s)

    def close(self) -> None:
        """Close a publisher this object created; a given one belongs to the caller."""
        with self._lock:
            if self._owned and self._publisher is not None:
                self._publisher.close()
                self._publisher = None
