"""``imgsearch dlq list|replay``: inspect dead letters, and send them back once fixed.

A dead letter is the original message, unchanged, plus Kafka Connect-style error
headers (see ingest_worker/dead_letters.py). Replay re-publishes the original key,
value and headers to the topic it came from; the workers' idempotent writes make a
replay safe to repeat.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from imgsearch.cli import DATA_DIR_HELP, broker_or_exit, stack_settings
from ingest_worker.dead_letters import (
    H_CLASS,
    H_MESSAGE,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_STAGE,
    H_TIMESTAMP,
    H_TOPIC,
    headers_dict,
)
from shared.config import Settings
from shared.errors import BrokerError
from shared.kafka import bootstrap_servers, client_timeouts, make_producer

FILTER_KEYS = {"reason": H_REASON, "stage": H_STAGE, "topic": H_TOPIC, "class": H_CLASS}


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def errors(self) -> dict[str, str]:
        return headers_dict(self.headers)

    @property
    def failed_at(self) -> datetime | None:
        raw = self.errors.get(H_TIMESTAMP)
        return datetime.fromisoformat(raw) if raw else None

    def original_headers(self) -> list[tuple[str, bytes]]:
        return [(k, v) for k, v in self.headers
                if not k.startswith("__connect.errors.") and not k.startswith("imgsearch.errors.")]


def read_dead_letters(settings: Settings, *, idle_s: float = 2.0) -> Iterator[DeadLetter]:
    """Every record of the DLQ topic, oldest first per partition; stops once idle.

    It reads until the topic goes quiet rather than up to ``end_offsets()``, which some
    brokers understate.
    """
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers(settings),
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id=f"{settings.kafka_client_id}-dlq",
                                 **client_timeouts())
    except KafkaError as exc:
        raise BrokerError(f"cannot read {settings.kafka_dlq_topic} from Kafka at "
                          f"{settings.kafka_bootstrap_servers}: {exc}") from exc
    try:
        partitions = consumer.partitions_for_topic(settings.kafka_dlq_topic)
        if not partitions:
            return
        consumer.assign([TopicPartition(settings.kafka_dlq_topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            polled = consumer.poll(timeout_ms=250)
            if polled:
                quiet_since = time.monotonic()
            for records in polled.values():
                for r in records:
                    yield DeadLetter(r.partition, r.offset, r.key, r.value, list(r.headers or []))
    finally:
        consumer.close()


def parse_since(text: str) -> datetime:
    """``2026-11-21T10:00:00Z``, ``2026-11-21`` or a duration back from now: ``90m``, ``2h``, ``3d``."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r} is neither a time (2026-11-21T10:00:00Z) nor a duration (30m, 2h, 7d)"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_filters(pairs: tuple[str, ...]) -> dict[str, set[str]]:
    filters: dict[str, set[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise click.BadParameter(
                f"{pair!r}: use KEY=VALUE with KEY one of {', '.join(sorted(FILTER_KEYS))}",
                param_hint="--filter",
            )
        filters.setdefault(key, set()).add(value)
    return filters


def matches(letter: DeadLetter, since: datetime | None, filters: dict[str, set[str]]) -> bool:
    if since is not None:
        failed_at = letter.failed_at
        if failed_at is None or failed_at < since:
            return False
    errors = letter.errors
    return all(errors.get(FILTER_KEYS[key]) in values for key, values in filters.items())


def _row(letter: DeadLetter) -> dict[str, Any]:
    e = letter.errors
    return {
        "dlq_partition": letter.partition,
        "dlq_offset": letter.offset,
        "failed_at": e.get(H_TIMESTAMP),
        "reason": e.get(H_REASON),
        "stage": e.get(H_STAGE),
        "source": f"{e.get(H_TOPIC)}[{e.get(H_PARTITION)}]@{e.get(H_OFFSET)}",
        "key": letter.key.decode("utf-8", "replace") if letter.key is not None else None,
        "error": e.get(H_MESSAGE),
    }


_since_option = click.option("--since", metavar="TIME|DURATION",
                             help="Only letters that failed after this (e.g. 2h, 2026-11-21T10:00Z).")
_data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                                help=DATA_DIR_HELP)
_filter_option = click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
                              help="reason=, stage=, topic= or class=; repeat to widen (same key) "
                                   "or narrow (different keys).")


@click.group()
def dlq() -> None:
    """Inspect and replay the dead-letter topic (KAFKA_DLQ_TOPIC)."""


def _letters(settings: Settings) -> Iterator[DeadLetter]:
    """The dead letters, with a broker that fails mid-way said in one line."""
    try:
        yield from read_dead_letters(settings)
    except (KafkaError, BrokerError) as exc:
        raise click.ClickException(f"reading {settings.kafka_dlq_topic} failed: {exc}") from exc


@dlq.command("list")
@_since_option
@_filter_option
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(since: str | None, filters: tuple[str, ...], data_dir: Path | None,
                 as_json: bool) -> None:
    """Show dead letters with their reasons, and a count per reason.

    Beside a running `imgsearch up` it reads that up's broker."""
    when = parse_since(since) if since else None
    wanted = parse_filters(filters)
    settings, _ = stack_settings(data_dir)
    broker_or_exit(settings, data_dir)
    counts: dict[str, int] = {}
    for letter in _letters(settings):
        if not matches(letter, when, wanted):
            continue
        row = _row(letter)
        counts[row["reason"] or "?"] = counts.get(row["reason"] or "?", 0) + 1
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(f"{row['failed_at'] or '-':32} {row['reason'] or '?':18} {row['source']:28} "
                       f"key={row['key']}  {(row['error'] or '')[:120]}")
    summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) or "none"
    click.echo(f"{sum(counts.values())} dead letters in {settings.kafka_dlq_topic} ({summary})",
               err=True)


@dlq.command()
@_since_option
@_filter_option
@_data_dir_option
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; publish nothing.")
@click.option("--topic", help="Publish here instead of each letter's original topic.")
def replay(since: str | None, filters: tuple[str, ...], data_dir: Path | None, dry_run: bool,
           topic: str | None) -> None:
    """Re-publish dead letters to their original topic, after the cause is fixed."""
    when = parse_since(since) if since else None
    wanted = parse_filters(filters)
    settings, _ = stack_settings(data_dir)
    broker_or_exit(settings, data_dir)
    chosen = [letter for letter in _letters(settings) if matches(letter, when, wanted)]
    if dry_run or not chosen:
        for letter in chosen:
            row = _row(letter)
            click.echo(f"would replay {row['source']} key={row['key']} ({row['reason']})")
        click.echo(f"{len(chosen)} dead letters match", err=True)
        return
    producer = make_producer(settings)
    try:
        futures = []
        for letter in chosen:
            target = topic or letter.errors.get(H_TOPIC) or settings.kafka_topic
            headers = letter.original_headers() + [
                ("imgsearch.replayed-from",
                 f"{settings.kafka_dlq_topic}[{letter.partition}]@{letter.offset}".encode()),
            ]
            futures.append(producer.send(target, key=letter.key, value=letter.value, headers=headers))
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=60)
    except KafkaError as exc:
        raise click.ClickException(f"replaying to {settings.kafka_bootstrap_servers} failed "
                                   f"after {len(futures)} sent: {exc}") from exc
    finally:
        producer.close(timeout=10)
    click.echo(f"replayed {len(chosen)} dead letters", err=True)
