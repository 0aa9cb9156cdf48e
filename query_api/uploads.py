"""Reading image uploads from a request: raw ``image/*`` bodies or multipart forms.

The byte limit is enforced while the body arrives: a declared Content-Length over the
limit is refused before anything is read, and an undeclared (chunked) body is cut off
at the first chunk that crosses the limit. Nothing bigger than the limit is buffered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from query_api.errors import ApiError

MULTIPART = "multipart/form-data"
# Listed in the OpenAPI document; any image/* type is accepted and the decoder decides.
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
FILE_FIELD = "file"
_MAX_TEXT_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': sizes in messages are for people."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _too_large(size_text: str, limit: int) -> ApiError:
    return ApiError(
        413, "too_large", f"the request body is {size_text}; the limit is {human_bytes(limit)}"
    )


async def limited_stream(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, raising 413 as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length header {declared!r}")
        if int(declared) > max_bytes:
            raise _too_large(human_bytes(int(declared)), max_bytes)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(f"more than {human_bytes(max_bytes)}", max_bytes)
            yield chunk
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "the client went away mid-upload") from exc


async def read_raw(request: Request, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in limited_stream(request, max_bytes):
        body += chunk
    return bytes(body)


async def read_multipart(
    request: Request, max_bytes: int, *, text_fields: tuple[str, ...] = ()
) -> Upload:
    """Parse a multipart form holding one file part named ``file`` and some text fields."""
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, max_bytes),
        max_files=1,
        max_fields=max(1, len(text_fields)) + 4,
        max_part_size=_MAX_TEXT_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from exc
    try:
        upload = form.get(FILE_FIELD)
        if not isinstance(upload, UploadFile):
            raise ApiError(
                422,
                "missing_file",
                f"the multipart form needs the image in a file part named {FILE_FIELD!r} "
                f"(curl -F {FILE_FIELD}=@photo.jpg)",
            )
        data = await upload.read()
        fields = {
            name: value for name, value in form.multi_items()
            if name in text_fields and isinstance(value, str)
        }
        return Upload(data, upload.filename, upload.content_type, fields)
    finally:
        await form.close()


async def read_image(request: Request, max_bytes: int) -> Upload:
    """An image from a raw ``image/*`` body or a multipart form's ``file`` part."""
    kind = media_type(request)
    if kind == MULTIPART:
        return await read_multipart(request, max_bytes)
    if kind.startswith("image/"):
        return Upload(await read_raw(request, max_bytes), None, kind)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {kind or '(none)'!r} is not accepted: send the image as the body with an "
        f"image/* type (e.g. image/jpeg) or as a multipart/form-data part named {FILE_FIELD!r}",
    )


def multipart_schema(text_fields: dict[str, dict[str, object]] | None = None,
                     required: tuple[str, ...] = ()) -> dict[str, object]:
    """The JSON schema of a multipart form with the image part and optional text fields."""
    properties: dict[str, object] = {
        FILE_FIELD: {"type": "string", "format": "binary", "description": "The image file."}
    }
    properties.update(text_fields or {})
    return {"type": "object", "properties": properties, "required": [FILE_FIELD, *required]}


def image_request_body(description: str) -> dict[str, object]:
    """OpenAPI requestBody for endpoints that take an image raw or as multipart."""
    content: dict[str, object] = {MULTIPART: {"schema": multipart_schema()}}
    for kind in IMAGE_MEDIA_TYPES:
        content[kind] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "description": description, "content": content}}
