"""Kafka clients configured from Settings, and the one way events are published."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import KafkaError, TopicAlreadyExistsError

from shared.config import Settings
from shared.errors import BrokerError
from shared.events import encode

log = logging.getLogger(__name__)

_ASSIGNORS = {
    "cooperative-sticky": CooperativeStickyAssignor,
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
}


def bootstrap_servers(settings: Settings) -> list[str]:
    return [s.strip() for s in settings.kafka_bootstrap_servers.split(",") if s.strip()]


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer that does not lose acknowledged events: all replicas, idempotent retries."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": f"{settings.kafka_client_id}-producer",
        "acks": "all",
        "retries": 5,
        "linger_ms": 5,
        # Fail fast when the broker is away, instead of blocking send() for a minute.
        "max_block_ms": 10_000,
        "max_request_size": max(1_048_576, settings.fetch_max_bytes * 2),
    }
    config.update(overrides)
    return KafkaProducer(**config)


def make_consumer(
    settings: Settings, *, listener: ConsumerRebalanceListener | None = None, **overrides: Any
) -> KafkaConsumer:
    """A group consumer with manual commits, subscribed to KAFKA_TOPIC."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": f"{settings.kafka_client_id}-worker",
        "group_id": settings.kafka_group_id,
        "enable_auto_commit": False,  # offsets move only after the store confirms
        "auto_offset_reset": "earliest",
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "partition_assignment_strategy": (_ASSIGNORS[settings.kafka_assignment_strategy],),
        "fetch_max_bytes": max(52_428_800, settings.fetch_max_bytes * 2),
        "max_partition_fetch_bytes": max(1_048_576, settings.fetch_max_bytes * 2),
    }
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    consumer.subscribe([settings.kafka_topic], listener=listener)
    return consumer


def ensure_topics(settings: Settings, topics: Iterable[str], *, partitions: int = 4) -> None:
    """Create topics that do not exist yet (for local brokers; production creates its own)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers(settings))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return
        try:
            admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
        except TopicAlreadyExistsError:
            pass  # another process won the race
        log.info("created topics %s with %d partitions", ", ".join(missing), partitions)
    finally:
        admin.close()


class EventPublisher:
    """Publishes event envelopes, keyed by image_id, and waits for the broker's ack."""

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.topic = settings.kafka_topic
        self.producer = producer or make_producer(settings)

    def publish(self, envelope: dict[str, Any]) -> Any:
        """Queue one event; returns the send future (``.get()`` gives its offset)."""
        key, value = encode(envelope)
        return self.producer.send(self.topic, key=key, value=value)

    def publish_and_wait(self, envelope: dict[str, Any], timeout_s: float = 30.0) -> Any:
        try:
            return self.publish(envelope).get(timeout=timeout_s)
        except KafkaError as exc:
            raise BrokerError(f"could not publish to Kafka topic {self.topic!r}: {exc}") from exc

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)
