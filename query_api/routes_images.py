"""Stored images: the payload, a thumbnail, and uploads (POST /images) through Kafka."""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from query_api.errors import ApiError, error_responses
from query_api.routes_common import ImageId, Service
from query_api.schemas import StoredImageResponse, UploadAccepted
from query_api.uploads import MULTIPART, media_type, multipart_schema, read_multipart
from shared.events import upload_event
from shared.metadata import (
    MAX_IMAGE_ID,
    MAX_METADATA_BYTES,
    InvalidValue,
    check_image_id,
    parse_metadata_json,
)

UPLOAD_DESCRIPTION = (
    "Publishes an image.uploaded event (bytes inline) to Kafka and answers 202 once the "
    "broker has acknowledged it; a worker embeds and stores it shortly after.\n\n"
    "**Create-only by default**: an `image_id` that is already stored answers 409 "
    "`image_exists`; send `replace=true` to replace that image. The check is against the "
    "store: an upload of the same id still queued in Kafka is not seen, and of two such "
    "uploads the last one wins. Re-sending with `replace=true` is safe: ingest is "
    "idempotent per image_id."
)

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": multipart_schema(
                    {
                        "image_id": {
                            "type": "string", "minLength": 1, "maxLength": MAX_IMAGE_ID,
                            "description": "Id to store the image under: not blank, no "
                                           "control characters (it must be usable in a URL).",
                        },
                        "metadata": {
                            "type": "string",
                            "description": (
                                'JSON object, e.g. {"label": "goldfinch"}: at most 64 keys '
                                "(letters, digits, '_' and '-'), values strings (at most "
                                "2,048 characters), numbers or booleans, no nesting, at most "
                                f"{MAX_METADATA_BYTES:,} bytes."
                            ),
                        },
                    },
                    required=("image_id",),
                )
            }
        },
    }
}


def _not_found(image_id: str) -> ApiError:
    return ApiError(404, "image_not_found", f"no stored image has id {image_id!r}")


def build_images_router(service: Service, protected: list[Any],
                        auth_errors: tuple[int, ...]) -> APIRouter:
    settings = service.settings
    engine = service.engine
    router = APIRouter()

    @router.get(
        "/images/{image_id:path}/thumbnail", tags=["images"], dependencies=protected,
        summary="A JPEG preview of a stored image",
        description=(
            "Served for images whose uri the service may read: file:// under IMAGE_FILE_ROOTS "
            "and http(s):// past the SSRF guard. Others answer 404 thumbnail_unavailable. "
            "A source too slow to render in time answers 504; a source that failed is not "
            "tried again for a while (the same error comes back)."
        ),
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "The JPEG preview."},
            304: {"description": "Not modified (If-None-Match matched the ETag)."},
            **error_responses(*auth_errors, 404, 422, 502, 503, 504),
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
            raise _not_found(image_id)
        version = str(stored.payload.get("sha256") or stored.payload.get("ingested_at") or "")
        etag = f'"{version[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = await service.thumbnails.render(image_id, stored.payload.get("uri"), version, size)
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
            raise _not_found(image_id)
        return StoredImageResponse.model_validate(stored.payload)

    @router.post(
        "/images", status_code=202, response_model=UploadAccepted, tags=["images"],
        dependencies=protected, summary="Upload an image for ingestion (asynchronous)",
        description=UPLOAD_DESCRIPTION,
        openapi_extra=UPLOAD_BODY,
        responses=error_responses(400, *auth_errors, 408, 409, 413, 415, 422, 503),
    )
    async def upload(
        request: Request,
        replace: bool = Query(
            False, description="Replace the image if this image_id is already stored "
                               "(otherwise 409 image_exists)."),
    ) -> JSONResponse:
        if media_type(request) != MULTIPART:
            raise ApiError(
                415, "unsupported_media_type",
                "POST /images takes multipart/form-data with parts file, image_id and metadata",
            )
        form = await read_multipart(
            request, settings.api_max_upload_bytes, text_fields=("image_id", "metadata")
        )
        raw_id = form.fields.get("image_id")
        if raw_id is None:
            raise ApiError(422, "invalid_image_id",
                           f"the form field image_id is required (1 to {MAX_IMAGE_ID} characters)")
        try:
            image_id = check_image_id(raw_id)
        except InvalidValue as exc:
            raise ApiError(422, "invalid_image_id", str(exc)) from exc
        try:
            metadata = parse_metadata_json(form.fields.get("metadata"))
        except InvalidValue as exc:
            raise ApiError(422, "invalid_metadata", str(exc)) from exc
        if not service.publishing.configured:
            raise ApiError(503, "publishing_disabled",
                           "this API process has no Kafka publisher; uploads are disabled")
        if not replace:
            found = await anyio.to_thread.run_sync(engine.store.get, [image_id])
            if image_id in found:
                raise ApiError(
                    409, "image_exists",
                    f"an image with id {image_id!r} is already stored; send replace=true to "
                    "replace it, or choose another id",
                )
        # Refuse what a worker would refuse, now, instead of as a dead letter later.
        await engine.check_image(form.data)
        envelope = upload_event(image_id, image_bytes=form.data, metadata=metadata,
                                source="query_api")
        record = await anyio.to_thread.run_sync(service.publishing.publish, envelope)
        accepted = UploadAccepted(event_id=envelope["id"], image_id=image_id, topic=record.topic,
                                  partition=record.partition, offset=record.offset)
        location = "/images/" + urllib.parse.quote(image_id, safe="/")
        return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": location})

    return router
