"""Prometheus metrics of the ingest worker (served on WORKER_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from shared.pipeline.report import BatchReport

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

EVENTS = Counter(
    "imgsearch_ingest_events_total",
    "Events consumed, by outcome (stored, deleted, unchanged, failed, invalid).",
    ["outcome"],
)
FAILURES = Counter(
    "imgsearch_ingest_failures_total",
    "Events that could not be ingested, by reason and pipeline stage.",
    ["reason", "stage"],
)
DEAD_LETTERS = Counter(
    "imgsearch_ingest_dlq_events_total", "Events written to the dead-letter topic.", ["reason"]
)
EMBEDDED = Counter("imgsearch_ingest_images_embedded_total", "Images embedded and stored.")
RETRIES = Counter(
    "imgsearch_ingest_retries_total", "Batch retries after a transient failure.", ["stage"]
)
BATCH_SIZE = Histogram(
    "imgsearch_ingest_batch_size", "Events per processed batch.", buckets=_BATCH_BUCKETS
)
STAGE_SECONDS = Histogram(
    "imgsearch_ingest_stage_duration_seconds",
    "Busy time per batch in each stage (fetch and decode summed over threads).",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "imgsearch_ingest_batch_duration_seconds",
    "Time from a batch's oldest event entering the pipeline to its write being confirmed.",
    buckets=_STAGE_BUCKETS,
)
INFLIGHT = Gauge("imgsearch_ingest_inflight_batches", "Batches being processed now.")
READY = Gauge(
    "imgsearch_ingest_ready",
    "1 while the worker is consuming; 0 while it starts, waits out a failure, is stalled or "
    "has failed (computed at scrape time, like /readyz).",
)
# Set by ingest_worker.lag.LagReporter for the partitions this process owns; a partition
# moves to another instance on a rebalance, so dashboards take max by (topic, partition).
LAG = Gauge(
    "imgsearch_ingest_consumer_lag_records",
    "Records behind the log end, per partition (end offset minus committed offset).",
    ["topic", "partition"],
)
LAG_ERRORS = Counter(
    "imgsearch_ingest_lag_measurement_errors_total",
    "Lag measurements that failed (the lag gauge keeps its last value meanwhile).",
)
MODEL = Info("imgsearch_ingest_model", "The embedding model and device of this worker.")

OUTCOMES = ("stored", "deleted", "unchanged", "failed", "invalid")
RETRY_STAGES = ("store", "dlq", "commit")

# Known label values start at 0, so the first increment shows in rate() and increase()
# (a series born at 1 has no earlier sample to differ from) and panels are never empty.
for _outcome in OUTCOMES:
    EVENTS.labels(_outcome)
for _stage in RETRY_STAGES:
    RETRIES.labels(_stage)


def observe_write(batch: BatchReport) -> None:
    """One confirmed write batch: its size, stage times and end-to-end latency."""
    BATCH_SIZE.observe(len(batch.results))
    EMBEDDED.inc(batch.count("stored"))
    for stage, seconds in batch.stage_seconds.items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    BATCH_SECONDS.observe(batch.wall_seconds)


# --- Re-index: the migration's metrics (shared/reindex/metrics.py). Every worker exports
# them: it reads the migration record to dual-write, so it reports the record's progress.
from shared.reindex import metrics as reindex  # noqa: E402, F401
