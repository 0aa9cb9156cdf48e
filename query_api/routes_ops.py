"""Probes, the page, /count and /metrics.

The probes and /metrics are exempt from the request cap (limits.py) and call the store
through their own small thread limiter with a deadline, so a busy replica, or a store
that hangs, still answers its orchestrator and Prometheus promptly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from query_api import metrics
from query_api.errors import error_response, error_responses
from query_api.routes_common import STATIC_DIR, Service
from query_api.schemas import CountResponse, HealthResponse, ReadyResponse
from shared.errors import ImgSearchError, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
# Probes time out after a second or so (Kubernetes' default is 1 s); answering "not ready"
# in time beats not answering.
PROBE_TIMEOUT_S = 2.0
PROBE_THREADS = 2


class ProbeCalls:
    """Store calls of the probes, on threads of their own, abandoned after a deadline."""

    def __init__(self) -> None:
        self._limiter: anyio.CapacityLimiter | None = None

    async def call(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` from a probe thread; None when it did not answer in time."""
        if self._limiter is None:  # made on first use, inside the event loop
            self._limiter = anyio.CapacityLimiter(PROBE_THREADS)
        with anyio.move_on_after(PROBE_TIMEOUT_S):
            return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True,
                                                  limiter=self._limiter)
        return None


def build_ops_router(service: Service, protected: list[Any],
                     auth_errors: tuple[int, ...]) -> APIRouter:
    engine = service.engine
    probes = ProbeCalls()
    router = APIRouter()

    @router.get("/healthz", response_model=HealthResponse, tags=["operations"],
                summary="Liveness: the process is up")
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @router.get("/readyz", response_model=ReadyResponse, tags=["operations"],
                summary="Readiness: model loaded and store reachable",
                responses=error_responses(503))
    async def readyz() -> Any:
        if not engine.batcher.running:
            return error_response(503, "not_ready", "the model is not loaded yet")
        try:
            answered = await probes.call(lambda: engine.store.ping() or True)
        except StoreError as exc:
            return error_response(503, "store_unavailable", f"the vector store does not answer: {exc}")
        if answered is None:
            return error_response(503, "store_unavailable",
                                  f"the vector store did not answer within {PROBE_TIMEOUT_S:g} s")
        info = engine.embedder.info
        # Re-index: which spec and collection serve, and any migration (query_api/serving.py).
        serving = engine.serving_info() if hasattr(engine, "serving_info") else {}
        return ReadyResponse(model=info.name, dim=info.dim, device=str(engine.embedder.device),
                             batching=engine.batcher.enabled, collection=service.collection,
                             crop=engine.default_crop, spec=serving.get("spec"),
                             serving_collection=serving.get("serving_collection"),
                             migration=serving.get("migration"))

    @router.get("/", response_class=FileResponse, tags=["web page"],
                summary="The search web page",
                responses={200: {"content": {"text/html": {}}, "description": "The page."},
                           **error_responses(503)})
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/count", response_model=CountResponse, tags=["images"], dependencies=protected,
                summary="How many images are stored",
                responses=error_responses(*auth_errors, 503))
    async def count() -> CountResponse:
        n = await anyio.to_thread.run_sync(engine.store.count)
        metrics.STORED_IMAGES.set(n)
        return CountResponse(count=n)

    @router.get("/metrics", tags=["operations"], dependencies=protected,
                summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Exposition format."},
                           **error_responses(*auth_errors)})
    async def prometheus_metrics() -> Response:
        try:
            stored = await probes.call(engine.store.count)
        except ImgSearchError as exc:
            # Metrics must still be served when the store is down; the gauge keeps its value.
            log.warning("cannot refresh %s: %s", "imgsearch_api_stored_images", exc)
        else:
            if stored is not None:
                metrics.STORED_IMAGES.set(stored)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router
