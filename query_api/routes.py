"""The HTTP endpoints. Built per app, so limits from Settings show up in the OpenAPI docs.

Search lives here; stored images and uploads in routes_images.py; probes, the page,
/count and /metrics in routes_ops.py.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from query_api.engine import QueryCrop
from query_api.errors import error_responses
from query_api.params import SearchParams, search_params_dependency
from query_api.routes_common import STATIC_DIR, ImageId, Service
from query_api.routes_images import build_images_router
from query_api.routes_ops import build_ops_router
from query_api.schemas import CropInfo, QueryTiming, SearchHit, SearchResponse
from query_api.uploads import image_request_body, read_image
from shared.store.base import Hit

__all__ = ["STATIC_DIR", "Service", "build_router"]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _hits(hits: list[Hit], with_metadata: bool) -> list[SearchHit]:
    return [
        SearchHit(
            image_id=h.image_id,
            score=h.score,
            uri=h.payload.get("uri"),
            metadata=dict(h.payload.get("metadata") or {}) if with_metadata else None,
            matched=CropInfo.model_validate(h.payload["crop"]) if h.payload.get("crop") else None,
        )
        for h in hits
    ]


def _next_offset(params: SearchParams, count: int, max_offset: int) -> int | None:
    following = params.offset + count
    return following if count == params.limit and following <= max_offset else None


def build_router(service: Service) -> APIRouter:
    protected: list[Any] = [service.keys.dependency()] if service.keys.enabled else []
    auth_errors: tuple[int, ...] = (401,) if service.keys.enabled else ()
    router = APIRouter()
    router.include_router(build_ops_router(service, protected, auth_errors))
    # Search first: /images/{id}/similar must match before /images/{id} does.
    router.include_router(_search_router(service, protected, auth_errors))
    router.include_router(build_images_router(service, protected, auth_errors))
    return router


def _search_router(service: Service, protected: list[Any],
                   auth_errors: tuple[int, ...]) -> APIRouter:
    settings = service.settings
    engine = service.engine
    search_params = search_params_dependency(settings)
    router = APIRouter()

    # -- search ----------------------------------------------------------------------------------

    @router.post(
        "/search", response_model=SearchResponse, tags=["search"], dependencies=protected,
        summary="Find stored images that look like the uploaded one",
        description=(
            "Send the image as the raw body with an image/* Content-Type, or as a "
            "multipart/form-data part named `file`. Bodies over API_MAX_UPLOAD_BYTES are "
            "refused with 413 while they arrive."
        ),
        openapi_extra=image_request_body("The query image (JPEG, PNG, WebP, GIF, BMP, TIFF)."),
        responses=error_responses(400, *auth_errors, 408, 413, 415, 422, 503),
    )
    async def search(
        request: Request,
        # A default, not Annotated[...]: with postponed annotations FastAPI could not
        # resolve the closure's name.
        params: SearchParams = Depends(search_params),  # noqa: B008
        crop: QueryCrop | None = Query(  # noqa: B008 - see above
            None,
            description=(
                "Search with the query's largest detected object (`largest`), with the whole "
                "image and each object, merged (`all`), or with the whole image (`none`). "
                f"Defaults to the gallery's setting: `{engine.default_crop}` here. Anything "
                "but `none` needs a detector (DETECTOR=yolov5)."
            ),
        ),
    ) -> SearchResponse:
        started = time.perf_counter()
        upload = await read_image(request, settings.api_max_upload_bytes)
        read_s = time.perf_counter() - started
        mode: QueryCrop = crop or engine.default_crop
        query = await engine.embed_image(upload.data, mode)
        hits, search_s = await engine.search(query.vectors, params)
        detect_s = query.detect_s
        return SearchResponse(
            hits=_hits(hits, params.with_metadata),
            limit=params.limit,
            offset=params.offset,
            next_offset=_next_offset(params, len(hits), settings.api_max_offset),
            model=engine.embedder.info.name,
            crop=mode,
            query_crops=[CropInfo.model_validate(c) for c in query.crops],
            timing=QueryTiming(
                total_ms=_ms(time.perf_counter() - started) or 0.0,
                read_ms=_ms(read_s), decode_ms=_ms(query.decode_s),
                detect_ms=_ms(detect_s), queue_ms=_ms(query.queue_s),
                embed_ms=_ms(query.embed_s), batch_size=query.batch_size,
                search_ms=_ms(search_s) or 0.0,
            ),
        )

    @router.get(
        "/images/{image_id:path}/similar", response_model=SearchResponse, tags=["search"],
        dependencies=protected, summary="More like this: search by a stored image's vector",
        description="Uses the stored vector (no re-embedding); the image itself is excluded.",
        responses=error_responses(*auth_errors, 404, 422, 503),
    )
    async def similar(
        image_id: ImageId,
        params: SearchParams = Depends(search_params),  # noqa: B008 - a closure, see above
    ) -> SearchResponse:
        started = time.perf_counter()
        vector = await engine.stored_vector(image_id)
        lookup_s = time.perf_counter() - started
        hits, search_s = await engine.search(vector, params, exclude=[image_id])
        return SearchResponse(
            hits=_hits(hits, params.with_metadata),
            limit=params.limit,
            offset=params.offset,
            next_offset=_next_offset(params, len(hits), settings.api_max_offset),
            query_image_id=image_id,
            model=engine.embedder.info.name,
            timing=QueryTiming(total_ms=_ms(time.perf_counter() - started) or 0.0,
                               lookup_ms=_ms(lookup_s), search_ms=_ms(search_s) or 0.0),
        )

    return router
