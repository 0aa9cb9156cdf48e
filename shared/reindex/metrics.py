"""Prometheus metrics of migrations, exported by every process that follows the index
(the ingest workers and the API read the migration record) and by the backfill itself.

``imgsearch_reindex_last_progress_timestamp_seconds`` is the backfill's heartbeat, as
recorded in the migration record: the ReindexStalled alert (deploy/prometheus/alerts.yml)
fires when a migration says it is backfilling but the heartbeat stopped.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.reindex.record import STATES, Migration

ACTIVE = Gauge(
    "imgsearch_reindex_active",
    "1 while a migration of the index is in progress (workers write both collections).",
    ["index"],
)
STATE = Gauge(
    "imgsearch_reindex_state",
    "1 for the state the index's latest migration is in: " + ", ".join(STATES) + ".",
    ["index", "state"],
)
IMAGES = Gauge(
    "imgsearch_reindex_images",
    "The migration's images: total (in the serving collection when it started), done "
    "(checked or re-embedded by the backfill), reembedded, failed (could not be "
    "re-embedded: their source is gone).",
    ["index", "kind"],
)
HEARTBEAT = Gauge(
    "imgsearch_reindex_last_progress_timestamp_seconds",
    "When the backfill last recorded progress (Unix time); 0 before it has.",
    ["index"],
)
SERVING = Gauge(
    "imgsearch_index_serving",
    "1 for the physical collection (and its spec digest) that serves the index, as this "
    "process last resolved it.",
    ["index", "collection", "spec"],
)
DUAL_WRITES = Counter(
    "imgsearch_reindex_dual_writes_total",
    "Events an ingest worker wrote to a migration's other collection, by outcome (stored, "
    "deleted, unchanged, failed: the backfill's reconciliation repairs those).",
    ["outcome"],
)
KINDS = ("total", "done", "reembedded", "failed")
for _outcome in ("stored", "deleted", "unchanged", "failed"):
    DUAL_WRITES.labels(_outcome)


def observe(index: str, migration: Migration | None) -> None:
    """Set the gauges from the record (any process that reads it)."""
    active = migration is not None and migration.active
    ACTIVE.labels(index).set(1 if active else 0)
    for state in STATES:
        STATE.labels(index, state).set(1 if migration and migration.state == state else 0)
    progress = migration.progress if migration else {}
    for kind in KINDS:
        IMAGES.labels(index, kind).set(float(progress.get(kind, 0) or 0))
    HEARTBEAT.labels(index).set(float(progress.get("updated_at", 0) or 0))


def observe_serving(index: str, collection: str, spec: str) -> None:
    SERVING.clear()
    SERVING.labels(index, collection, spec).set(1)
