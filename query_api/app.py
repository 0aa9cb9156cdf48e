"""``create_app(components)``: the FastAPI application of the query service."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from query_api import metrics
from query_api.auth import KeyChecker
from query_api.engine import QueryEngine
from query_api.errors import install_error_handlers
from query_api.publishing import Publishing
from query_api.routes import STATIC_DIR, Service, build_router
from query_api.thumbnails import Thumbnailer
from shared.components import Components
from shared.config import Settings
from shared.kafka import EventPublisher

log = logging.getLogger(__name__)

DESCRIPTION = """
Search a collection of images by image.

* **POST /search** with a photo returns the most similar stored images.
* **GET /images/{image_id}/similar** does the same from a stored image, without re-embedding.
* **POST /images** queues a new image for the ingest workers (Kafka).

Every error has the body `{"error": {"code": "...", "message": "..."}}`. When API_KEYS is
set, send a key as `X-API-Key` or `Authorization: Bearer`; /healthz, /readyz, the page
and these docs need none.
"""


def create_app(
    components: Components,
    *,
    publisher: EventPublisher | None = None,
    settings: Settings | None = None,
    publisher_factory: Callable[[], EventPublisher] | None = None,
) -> FastAPI:
    """Build the app around loaded components. The caller owns (and closes) ``components``
    and ``publisher``; a publisher made by ``publisher_factory`` is closed by the app."""
    settings = settings or components.settings
    engine = QueryEngine(components.embedder, components.store, settings, components.cropper)
    service = Service(
        settings=settings,
        engine=engine,
        thumbnailer=Thumbnailer(
            components.fetcher,
            max_pixels=settings.image_max_pixels,
            cache_size=settings.api_thumbnail_cache_size,
        ),
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
        await anyio.to_thread.run_sync(engine.start)
        log.info("query API ready: model %s, batching %s (max %d, %.1f ms)", info.name,
                 "on" if settings.api_batching else "off", engine.batcher.max_size,
                 engine.batcher.max_wait_s * 1000)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.close)
            await anyio.to_thread.run_sync(service.publishing.close)

    app = FastAPI(
        title="imgsearch query API",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(metrics.MetricsMiddleware)
    app.include_router(build_router(service))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.service = service
    return app
