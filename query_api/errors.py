"""One JSON error shape for every failure: ``{"error": {"code", "message"}}``.

Handlers cover our own ApiError, the project's error tree, FastAPI's validation errors
and Starlette's HTTP errors (unknown route, wrong method), so no client ever sees
HTML or a bare ``{"detail": ...}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from query_api.schemas import ErrorResponse
from shared.errors import (
    BrokerError,
    ImageTooLargeError,
    ImgSearchError,
    StoreError,
    UndecodableImageError,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    431: "headers_too_large",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error with its HTTP status and stable code; raised anywhere in a request."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


def from_domain(exc: ImgSearchError) -> ApiError:
    """Map the project's error tree to HTTP."""
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, exc.reason, exc.message)
    if isinstance(exc, UndecodableImageError):
        return ApiError(400, exc.reason, exc.message)
    if isinstance(exc, (StoreError, BrokerError)):
        return ApiError(503, exc.reason, exc.message, headers={"Retry-After": "5"})
    status = 503 if exc.retriable else 500
    return ApiError(status, exc.reason, exc.message)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these statuses, all with the ErrorResponse model."""
    descriptions = {
        400: "The body is not a usable image, or the multipart form is malformed.",
        401: "API_KEYS is set and no valid key was sent (X-API-Key or Authorization: Bearer).",
        404: "No stored image has this id.",
        408: "The request body arrived too slowly (API_BODY_TIMEOUT_S, API_BODY_IDLE_TIMEOUT_S).",
        409: "An image with this image_id is already stored; send replace=true to replace it.",
        413: "The body is over API_MAX_UPLOAD_BYTES, or the image has more pixels than "
             "IMAGE_MAX_PIXELS.",
        415: "The Content-Type is neither multipart/form-data nor image/*.",
        422: "A parameter or form field is invalid.",
        502: "The image's source could not be read or decoded.",
        503: "The service is overloaded (code overloaded, thumbnails_busy), or the vector "
             "store or the broker is unavailable; retry after Retry-After seconds.",
        504: "The thumbnail's source did not answer in time (API_THUMBNAIL_TIMEOUT_S).",
    }
    return {
        status: {"model": ErrorResponse, "description": descriptions.get(status, "Error.")}
        for status in statuses
    }


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        details.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return details


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(
            exc.status, exc.code, exc.message, headers=exc.headers, details=exc.details
        )

    async def on_domain_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ImgSearchError)
        api = from_domain(exc)
        if api.status >= 500:
            log.warning("%s: %s", api.code, api.message)
        return error_response(api.status, api.code, api.message, headers=api.headers)

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = _validation_details(exc)
        summary = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details)
        return error_response(422, "invalid_request", summary or "invalid request", details=details)

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail) if exc.detail else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=exc.headers)

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; see the service log")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ImgSearchError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
