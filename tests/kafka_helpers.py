"""Publishing, waiting for commits and reading topics in tests.

Completion is judged from committed offsets against the offsets the producer was given
for each record, never from ``end_offsets()`` (Tansu understates it for batched writes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from shared.config import Settings
from shared.events import encode

Ends = dict[int, int]  # partition -> offset after its last record


def producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all",
                         linger_ms=5, max_request_size=64 * 1024 * 1024)


def send_raw(settings: Settings, messages: Iterable[tuple[bytes | None, bytes | None]]) -> Ends:
    """Send (key, value) pairs as a plain kafka-python producer would; return the ends."""
    p = producer(settings)
    try:
        futures = [p.send(settings.kafka_topic, key=k, value=v) for k, v in messages]
        p.flush()
        ends: Ends = {}
        for f in futures:
            meta = f.get(timeout=30)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
        return ends
    finally:
        p.close()


def publish(settings: Settings, envelopes: Sequence[dict[str, Any]]) -> Ends:
    return send_raw(settings, (encode(e) for e in envelopes))


def merge(*ends: Ends) -> Ends:
    out: Ends = {}
    for e in ends:
        for p, o in e.items():
            out[p] = max(out.get(p, 0), o)
    return out


def committed(settings: Settings) -> Ends:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(settings.kafka_group_id).get(settings.kafka_group_id, {})
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items()
            if tp.topic == settings.kafka_topic and om.offset >= 0}


def wait_committed(settings: Settings, ends: Ends, timeout_s: float = 120.0,
                   alive: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    have: Ends = {}
    while time.monotonic() < deadline:
        have = committed(settings)
        if all(have.get(p, 0) >= o for p, o in ends.items()):
            return
        if alive is not None and not alive():
            raise AssertionError(f"workers died before committing {ends}; committed {have}")
        time.sleep(0.3)
    raise TimeoutError(f"group {settings.kafka_group_id} committed {have}, expected {ends}")


def read_topic(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Read ``expected`` records from the start of ``topic`` (fails after timeout_s)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        consumer.seek_to_beginning()
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a subprocess needs to see the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "QDRANT_", "MODEL_"))}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[name.upper()] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env
