"""Kafka clients configured from Settings, and the one way events are published."""

from __future__ import annotations

import logging
import socket
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
        # Explicit, so that a conflicting override raises instead of quietly turning it off:
        # a retried send after a lost ack is then written once, not twice.
        "enable_idempotence": True,
        "retries": 5,
        "linger_ms": 5,
        # Fail fast when the broker is away, instead of blocking send() for a minute.
        "max_block_ms": 10_000,
        "max_request_size": max(1_048_576, settings.fetch_max_bytes * 2),
    }
    config.update(overrides)
    if "max_block_ms" in overrides:
        # kafka-python 3 first waits bootstrap_timeout_ms (30 s) for a broker, before send()
        # can even block: a caller that bounds the blocking (the API, by
        # API_PUBLISH_TIMEOUT_S) means that bound for the whole wait when the broker is away.
        config.setdefault("bootstrap_timeout_ms", config["max_block_ms"])
        # No broker listening at all is known at once; and a producer whose bootstrap fails
        # leaks its sockets, one set per attempt.
        check_reachable(settings, min(PROBE_TIMEOUT_S, config["max_block_ms"] / 1000))
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
    admin = make_admin(settings)
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


# --- Bounded client start-up, for command-line tools (imgsearch dlq, publish, up) ---------
# A client of kafka-python 3 retries its bootstrap for 30 s and logs an error per attempt;
# a person at a terminal should hear "no broker there" in seconds, in one line.
CLI_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 3.0


def check_reachable(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S,
                    hint: str = "") -> None:
    """Raise BrokerError (one line, naming KAFKA_BOOTSTRAP_SERVERS) unless at least one
    bootstrap server accepts a TCP connection within ``timeout_s``."""
    servers = bootstrap_servers(settings)
    reasons = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)),
                                          timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            reasons.append(f"{server}: {getattr(exc, 'strerror', None) or exc}")
    raise BrokerError(
        f"no Kafka broker answers at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} "
        f"({'; '.join(reasons) or 'no servers named'}).{(' ' + hint) if hint else ''}",
        retriable=True,
    )


def client_timeouts(timeout_s: float = CLI_TIMEOUT_S) -> dict[str, Any]:
    """kafka-python settings that bound a client's start-up and each request."""
    ms = int(timeout_s * 1000)
    return {"bootstrap_timeout_ms": ms, "request_timeout_ms": ms + 1000}


def make_admin(settings: Settings, timeout_s: float = CLI_TIMEOUT_S) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=bootstrap_servers(settings),
                            client_id=f"{settings.kafka_client_id}-admin",
                            **client_timeouts(timeout_s))


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
