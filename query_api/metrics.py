"""Prometheus metrics of the query API, served at GET /metrics.

One uvicorn worker per process, by design: the model already uses every core for one
forward pass, and micro-batching only helps when all queries of a machine reach one
batcher. Scale out with more processes or replicas (against a Qdrant server), each
scraped on its own; so the default registry is right and no multiprocess mode is needed.
"""

from __future__ import annotations

import re
import time

from prometheus_client import Counter, Gauge, Histogram, Info
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_api.batching import BatchStats

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                    1, 2.5, 5, 10)
_FAST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1,
                 0.25, 1)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

# HTTP limits (query_api/limits.py, query_api/protocol.py).
IN_FLIGHT = Gauge(
    "imgsearch_api_requests_in_flight",
    "Requests being served now (probes and /metrics excluded), against API_MAX_CONCURRENT_REQUESTS.",
)
REFUSED_REASONS = ("overloaded", "too_many_connections", "headers_too_large", "header_timeout",
                   "body_timeout")
REFUSED = Counter(
    "imgsearch_api_requests_refused_total",
    "Requests refused by an HTTP limit, by reason: " + ", ".join(REFUSED_REASONS) + ".",
    ["reason"],
)
for _reason in REFUSED_REASONS:  # start at 0: rate() sees the first refusal, panels are never empty
    REFUSED.labels(_reason)

REQUESTS = Counter(
    "imgsearch_api_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "imgsearch_api_request_duration_seconds",
    "Time from request to the end of the response, by route template and method.",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
EMBED_SECONDS = Histogram(
    "imgsearch_api_embed_duration_seconds",
    "Duration of one forward pass (a dynamic batch of queries).",
    buckets=_LATENCY_BUCKETS,
)
SEARCH_SECONDS = Histogram(
    "imgsearch_api_search_duration_seconds",
    "Duration of one vector store query.",
    buckets=_FAST_BUCKETS,
)
BATCH_SIZE = Histogram(
    "imgsearch_api_batch_size", "Queries per forward pass (dynamic batch size).",
    buckets=_BATCH_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "imgsearch_api_batch_queue_wait_seconds",
    "Time a query waited between hand-over and the start of its forward pass.",
    buckets=_FAST_BUCKETS,
)
STORED_IMAGES = Gauge("imgsearch_api_stored_images", "Images in the collection (at last check).")
MODEL = Info("imgsearch_api_model", "The embedding model and device of this API process.")

_CONVERTOR = re.compile(r"\{(\w+):\w+\}")


DETECT_SECONDS = Histogram(
    "imgsearch_api_detect_duration_seconds",
    "Duration of one object-detector forward pass over queries (crop=largest|all).",
)
DETECT_BATCH_SIZE = Histogram(
    "imgsearch_api_detect_batch_size", "Query images per detector forward pass.",
    buckets=_BATCH_BUCKETS,
)


def observe_detect_batch(stats: BatchStats) -> None:
    DETECT_SECONDS.observe(stats.embed_s)
    DETECT_BATCH_SIZE.observe(stats.size)


def observe_batch(stats: BatchStats) -> None:
    EMBED_SECONDS.observe(stats.embed_s)
    BATCH_SIZE.observe(stats.size)
    for wait in stats.queue_waits_s:
        QUEUE_WAIT_SECONDS.observe(wait)


def route_label(scope: Scope) -> str:
    """The matched route's template ("/images/{image_id}"), never the raw path."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    if isinstance(route, Mount):
        return route.path or "/"
    path = getattr(route, "path", None)
    return _CONVERTOR.sub(r"{\1}", path) if path else "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: works with streamed bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before responding

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = route_label(scope)
            method = scope.get("method", "GET")
            REQUESTS.labels(route, method, str(status)).inc()
            REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - started)
