"""``create_app(components)``: the FastAPI application of the query service."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from query_api import metrics
from query_api.auth import KeyChecker
from query_api.engine import QueryEngine
from query_api.errors import install_error_handlers
from query_api.limits import ConcurrencyLimit, RequestLimits
from query_api.publishing import Publishing
from query_api.routes import STATIC_DIR, Service, build_router
from query_api.routes_docs import app_docs_settings, install_docs
from query_api.routes_facets import build_facets_router
from query_api.serving import PinServing, Serving
from query_api.thumbnails import ThumbnailService
from shared.components import Components
from shared.config import Settings
from shared.kafka import EventPublisher

log = logging.getLogger(__name__)

DESCRIPTION = """
Search a collection of images by image.

* **POST /search** with a photo returns the most similar stored images.
* **GET /images/{image_id}/similar** does the same from a stored image, without re-embedding.
* **POST /images** queues a new image for the ingest workers (Kafka).

Every error has the body `{"error": {"code": "...", "message": "..."}}`.

When API_KEYS is set, every endpoint that serves data needs a key, as `X-API-Key` or
`Authorization: Bearer`. Open without one, because they hold no data: /healthz, /readyz,
the web page (/ and /static), and these docs (/docs, /redoc, /openapi.json).

Limits (docs/query_api.md, "Limits"): a busy service answers 503 `overloaded` with
`Retry-After` instead of queueing; headers over the size limit get 431; headers or a
body that arrive too slowly get 408.
"""


def create_app(
    components: Components,
    *,
    publisher: EventPublisher | None = None,
    settings: Settings | None = None,
    publisher_factory: Callable[[], EventPublisher] | None = None,
    specs: Any = None,
) -> FastAPI:
    """Build the app around loaded components. The caller owns (and closes) ``components``
    and ``publisher``; a publisher made by ``publisher_factory`` is closed by the app."""
    settings = settings or components.settings
    engine = QueryEngine(components.embedder, components.store, settings, components.cropper)
    # Re-index: the spec the index's pointer serves answers each request (query_api/serving.py;
    # ``specs``: a SpecSet shared with the process's workers, as `imgsearch up` does).
    serving = Serving(engine, components, settings, specs=specs)
    engine = serving.engine  # type: ignore[assignment]
    service = Service(
        settings=settings,
        engine=engine,
        thumbnails=ThumbnailService.from_settings(settings),
        publishing=Publishing(publisher, publisher_factory, settings.api_publish_timeout_s),
        keys=KeyChecker(settings.api_keys),
        collection=settings.qdrant_collection,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        info = components.embedder.info
        metrics.MODEL.info(
            {"model": info.name, "dim": str(info.dim), "device": str(components.embedder.device)}
        )
        await anyio.to_thread.run_sync(serving.start)
        log.info("query API ready: model %s, batching %s (max %d, %.1f ms)", info.name,
                 "on" if settings.api_batching else "off", engine.batcher.max_size,
                 engine.batcher.max_wait_s * 1000)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(serving.close)
            await anyio.to_thread.run_sync(service.publishing.close)
            service.thumbnails.close()

    app = FastAPI(
        title="imgsearch query API",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        **app_docs_settings(),  # /docs and /redoc from the service itself, never a CDN
    )
    install_error_handlers(app)
    # The last added runs first: metrics see every answer, limits come before any work.
    app.add_middleware(ConcurrencyLimit, max_requests=settings.api_max_concurrent_requests)
    app.add_middleware(RequestLimits, max_header_bytes=settings.api_max_header_bytes,
                       body_timeout_s=settings.api_body_timeout_s,
                       body_idle_timeout_s=settings.api_body_idle_timeout_s)
    app.add_middleware(metrics.MetricsMiddleware)
    app.add_middleware(PinServing, serving=serving)
    app.include_router(build_router(service))
    protected = [service.keys.dependency()] if service.keys.enabled else []
    app.include_router(build_facets_router(service, protected,
                                           (401,) if service.keys.enabled else ()))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_docs(app)
    if settings.reindex_admin_api:
        from query_api.routes_admin import build_admin_router

        app.include_router(build_admin_router(serving, protected,
                                              (401,) if service.keys.enabled else ()))
    app.state.service = service
    app.state.serving = serving
    return app
