"""The HTTP endpoints. Built per app, so limits from Settings show up in the OpenAPI docs."""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from query_api import metrics
from query_api.auth import KeyChecker
from query_api.engine import QueryCrop, QueryEngine
from query_api.errors import ApiError, error_response, error_responses
from query_api.params import SearchParams, search_params_dependency
from query_api.publishing import Publishing
from query_api.schemas import (
    CountResponse,
    CropInfo,
    HealthResponse,
    QueryTiming,
    ReadyResponse,
    SearchHit,
    SearchResponse,
    StoredImageResponse,
    UploadAccepted,
)
from query_api.thumbnails import Thumbnailer
from query_api.uploads import (
    MULTIPART,
    image_request_body,
    media_type,
    multipart_schema,
    read_image,
    read_multipart,
)
from shared.config import Settings
from shared.errors import ImgSearchError, StoreError
from shared.events import check_metadata, upload_event
from shared.store.base import Hit

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_IMAGE_ID = 512

ImageId = Annotated[
    str, PathParam(min_length=1, max_length=MAX_IMAGE_ID, description="The image's id.")
]


@dataclass
class Service:
    settings: Settings
    engine: QueryEngine
    thumbnailer: Thumbnailer
    publishing: Publishing
    keys: KeyChecker
    collection: str


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


def _metadata_field(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_metadata", f"metadata is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", 'metadata must be a JSON object, e.g. {"label": "x"}')
    for key, item in value.items():
        valid = (
            isinstance(item, (str, bool))
            or (isinstance(item, int) and -(2**63) <= item < 2**63)  # the store's integers
            or (isinstance(item, float) and math.isfinite(item))
        )
        if not valid:
            raise ApiError(
                422, "invalid_metadata",
                f"metadata value of {key!r} must be a string, finite number or boolean",
            )
    try:
        check_metadata(value)
    except ValueError as exc:
        raise ApiError(422, "invalid_metadata", str(exc)) from exc
    return value


def build_router(service: Service) -> APIRouter:
    settings = service.settings
    engine = service.engine
    search_params = search_params_dependency(settings)
    protected = [service.keys.dependency()] if service.keys.enabled else []
    auth_errors = (401,) if service.keys.enabled else ()
    router = APIRouter()

    # -- probes and the page (no key: probes for orchestrators, the page holds no data) ---------

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
            await anyio.to_thread.run_sync(engine.store.ping)
        except StoreError as exc:
            return error_response(503, "store_unavailable", f"the vector store does not answer: {exc}")
        info = engine.embedder.info
        return ReadyResponse(model=info.name, dim=info.dim, device=str(engine.embedder.device),
                             batching=engine.batcher.enabled, collection=service.collection,
                             crop=engine.default_crop)

    @router.get("/", response_class=FileResponse, tags=["web page"],
                summary="The search web page",
                responses={200: {"content": {"text/html": {}}, "description": "The page."}})
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

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
        responses=error_responses(400, *auth_errors, 413, 415, 422, 503),
    )
    async def search(
        request: Request,
        # A default, not Annotated[...]: with postponed annotations FastAPI could not
        # resolve the closure's name.
        params: SearchParams = Depends(search_params),  # noqa: B008
        crop: QueryCrop | None = Query(
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

    # -- stored images ---------------------------------------------------------------------------

    @router.get(
        "/images/{image_id:path}/thumbnail", tags=["images"], dependencies=protected,
        summary="A JPEG preview of a stored image",
        description=(
            "Served for images whose uri the service may read: file:// under IMAGE_FILE_ROOTS "
            "and http(s):// past the SSRF guard. Others answer 404 thumbnail_unavailable."
        ),
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "The JPEG preview."},
            304: {"description": "Not modified (If-None-Match matched the ETag)."},
            **error_responses(*auth_errors, 404, 422, 502, 503),
        },
    )
    async def thumbnail(
        request: Request,
        image_id: ImageId,
        size: Annotated[int, Query(ge=16, le=1024, description="Longest side, in pixels.")] = 256,
    ) -> Response:
        found = await anyio.to_thread.run_sync(engine.store.get, [image_id])
        stored = found.get(image_id)
        if stored is None:
            raise ApiError(404, "image_not_found", f"no stored image has id {image_id!r}")
        version = str(stored.payload.get("sha256") or stored.payload.get("ingested_at") or "")
        etag = f'"{version[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = await anyio.to_thread.run_sync(
            partial(service.thumbnailer.render, image_id, stored.payload.get("uri"), version, size)
        )
        return Response(data, media_type="image/jpeg", headers=headers)

    @router.get(
        "/images/{image_id:path}", response_model=StoredImageResponse, tags=["images"],
        dependencies=protected, summary="The stored payload of an image",
        responses=error_responses(*auth_errors, 404, 422, 503),
    )
    async def get_image(image_id: ImageId) -> StoredImageResponse:
        found = await anyio.to_thread.run_sync(engine.store.get, [image_id])
        stored = found.get(image_id)
        if stored is None:
            raise ApiError(404, "image_not_found", f"no stored image has id {image_id!r}")
        return StoredImageResponse.model_validate(stored.payload)

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                MULTIPART: {
                    "schema": multipart_schema(
                        {
                            "image_id": {"type": "string", "minLength": 1,
                                         "maxLength": MAX_IMAGE_ID,
                                         "description": "Id to store the image under."},
                            "metadata": {"type": "string",
                                         "description": 'JSON object, e.g. {"label": "goldfinch"}'},
                        },
                        required=("image_id",),
                    )
                }
            },
        }
    }

    @router.post(
        "/images", status_code=202, response_model=UploadAccepted, tags=["images"],
        dependencies=protected, summary="Upload an image for ingestion (asynchronous)",
        description=(
            "Publishes an image.uploaded event (bytes inline) to Kafka and answers 202 once the "
            "broker has acknowledged it; a worker embeds and stores it shortly after. Re-sending "
            "is safe: ingest is idempotent per image_id."
        ),
        openapi_extra=upload_body,
        responses=error_responses(400, *auth_errors, 413, 415, 422, 503),
    )
    async def upload(request: Request) -> JSONResponse:
        if media_type(request) != MULTIPART:
            raise ApiError(
                415, "unsupported_media_type",
                "POST /images takes multipart/form-data with parts file, image_id and metadata",
            )
        form = await read_multipart(
            request, settings.api_max_upload_bytes, text_fields=("image_id", "metadata")
        )
        image_id = form.fields.get("image_id", "")
        if not image_id.strip() or len(image_id) > MAX_IMAGE_ID:
            raise ApiError(
                422, "invalid_image_id",
                f"form field image_id is required: 1 to {MAX_IMAGE_ID} characters, not blank",
            )
        metadata = _metadata_field(form.fields.get("metadata"))
        if not service.publishing.configured:
            raise ApiError(503, "publishing_disabled",
                           "this API process has no Kafka publisher; uploads are disabled")
        # Refuse what a worker would refuse, now, instead of as a dead letter later.
        await engine.check_image(form.data)
        envelope = upload_event(image_id, image_bytes=form.data, metadata=metadata,
                                source="query_api")
        record = await anyio.to_thread.run_sync(service.publishing.publish, envelope)
        accepted = UploadAccepted(event_id=envelope["id"], image_id=image_id, topic=record.topic,
                                  partition=record.partition, offset=record.offset)
        location = "/images/" + urllib.parse.quote(image_id, safe="/")
        return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": location})

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
            metrics.STORED_IMAGES.set(await anyio.to_thread.run_sync(engine.store.count))
        except ImgSearchError as exc:
            # Metrics must still be served when the store is down; the gauge keeps its value.
            log.warning("cannot refresh %s: %s", "imgsearch_api_stored_images", exc)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router

