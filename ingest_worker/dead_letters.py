"""The dead-letter topic: events that can never succeed, kept unchanged for inspection and replay.

Error context travels in headers named as Kafka Connect names them, so existing
tooling for Connect DLQs reads ours too.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from shared.errors import BrokerError, ImgSearchError, InternalError

log = logging.getLogger(__name__)

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_STAGE = "__connect.errors.stage"
H_CLASS = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_TIMESTAMP = "__connect.errors.timestamp"
H_STACKTRACE = "__connect.errors.exception.stacktrace"
H_REASON = "imgsearch.errors.reason"


def error_headers(record: Any, error: ImgSearchError) -> list[tuple[str, bytes]]:
    headers = [
        (H_TOPIC, record.topic.encode()),
        (H_PARTITION, str(record.partition).encode()),
        (H_OFFSET, str(record.offset).encode()),
        (H_STAGE, error.stage.encode()),
        (H_CLASS, f"{type(error).__module__}.{type(error).__qualname__}".encode()),
        (H_MESSAGE, str(error)[:2000].encode("utf-8", "replace")),
        (H_TIMESTAMP, datetime.now(timezone.utc).isoformat().encode()),
        (H_REASON, error.reason.encode()),
    ]
    cause = error.__cause__
    if isinstance(error, InternalError) and cause is not None:
        # A bug met while handling this event: the traceback is what a developer needs.
        trace = "".join(traceback.format_exception(cause))[-8000:]
        headers.append((H_STACKTRACE, trace.encode("utf-8", "replace")))
    return headers


def headers_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in headers or []}


class DeadLetterQueue:
    """Writes failed records to the DLQ topic. ``send`` only queues; ``flush`` sends and
    waits for the broker's acknowledgement, and the worker commits only after it.

    A failed flush keeps every letter for the next one, so a broker hiccup delays dead
    letters but never drops them (a retried flush may write a letter twice).
    """

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self._unsent: list[tuple[Any, ImgSearchError]] = []
        self._lock = threading.Lock()  # the rebalance listener drops letters from another thread

    def send(self, record: Any, error: ImgSearchError) -> None:
        with self._lock:
            self._unsent.append((record, error))

    def drop(self, where: Callable[[Any], bool]) -> int:
        """Forget unsent letters whose record ``where`` selects (its partition was revoked:
        the new owner dead-letters it). Returns how many were dropped."""
        with self._lock:
            kept = [(r, e) for r, e in self._unsent if not where(r)]
            dropped = len(self._unsent) - len(kept)
            self._unsent = kept
        return dropped

    def flush(self, timeout_s: float = 30.0) -> None:
        """Send every queued letter and wait for its ack; raise BrokerError otherwise."""
        with self._lock:
            letters = list(self._unsent)
        if not letters:
            return
        try:
            futures = [
                self.producer.send(
                    self.topic,
                    key=record.key,
                    value=record.value,
                    headers=list(record.headers or []) + error_headers(record, error),
                )
                for record, error in letters
            ]
            self.producer.flush(timeout=timeout_s)
            for future in futures:
                future.get(timeout=timeout_s)
        except KafkaError as exc:
            raise BrokerError(f"dead-letter write to {self.topic!r} failed: {exc}") from exc
        with self._lock:
            sent = {id(letter) for letter in letters}
            self._unsent = [letter for letter in self._unsent if id(letter) not in sent]

    def close(self) -> None:
        self.producer.close()
