"""The project's one error tree.

Every error carries three facts that callers decide on, so nobody matches strings:

* ``reason``    a short snake_case code: metric label, dead-letter header, API error code;
* ``stage``     where in the pipeline it happened (parse, fetch, decode, embed, store, config);
* ``retriable`` whether trying again later may succeed (infrastructure) or never will (the event).

    ImgSearchError
    ├── ConfigError                  bad settings, found at start-up
    ├── ModelError                   model or weights cannot be loaded
    ├── EventError                   the message is not a valid event          (parse)
    ├── SourceError                  the image bytes cannot be obtained        (fetch)
    │   ├── ForbiddenSourceError     URI outside the allowed roots / networks
    │   ├── SourceNotFoundError      file or object does not exist, HTTP 404
    │   ├── SourceTooLargeError      more bytes than the fetch limit
    │   └── FetchError               timeouts, connection errors, HTTP status (retriable if 5xx/429)
    ├── ImageError                   the bytes are not a usable image          (decode)
    │   ├── UndecodableImageError
    │   └── ImageTooLargeError       more pixels than the decode limit
    ├── StoreError                   the vector store failed                  (store, retriable)
    │   ├── CollectionMismatchError  collection built for another model        (not retriable)
    │   └── StoreRejectedError       the store refused this write as invalid   (not retriable)
    ├── BrokerError                  Kafka did not accept or deliver a message (retriable)
    └── InternalError                a bug met while handling one event: that event fails
                                     with reason ``internal_error`` (the stage it was in)
"""

from __future__ import annotations

from typing import ClassVar


class ImgSearchError(Exception):
    reason: ClassVar[str] = "error"
    stage: ClassVar[str] = "unknown"
    retriable: ClassVar[bool] = False

    def __init__(self, message: str, *, reason: str | None = None, retriable: bool | None = None):
        super().__init__(message)
        self.message = message
        # Instances may refine the class defaults (e.g. an HTTP 503 is retriable, a 404 is not).
        if reason is not None:
            self.reason = reason  # type: ignore[misc]
        if retriable is not None:
            self.retriable = retriable  # type: ignore[misc]

    def __str__(self) -> str:
        return self.message


class ConfigError(ImgSearchError):
    reason = "config"
    stage = "config"


class ModelError(ImgSearchError):
    reason = "model_unavailable"
    stage = "embed"


class EventError(ImgSearchError):
    reason = "invalid_event"
    stage = "parse"


class SourceError(ImgSearchError):
    reason = "fetch_failed"
    stage = "fetch"


class ForbiddenSourceError(SourceError):
    reason = "forbidden_uri"


class SourceNotFoundError(SourceError):
    reason = "not_found"


class SourceTooLargeError(SourceError):
    reason = "too_large"


class FetchError(SourceError):
    reason = "fetch_failed"
    retriable = True


class ImageError(ImgSearchError):
    reason = "undecodable"
    stage = "decode"


class UndecodableImageError(ImageError):
    reason = "undecodable"


class ImageTooLargeError(ImageError):
    reason = "too_many_pixels"


class StoreError(ImgSearchError):
    reason = "store_unavailable"
    stage = "store"
    retriable = True


class CollectionMismatchError(StoreError):
    reason = "collection_mismatch"
    retriable = False


class StoreRejectedError(StoreError):
    reason = "store_rejected"
    retriable = False


class BrokerError(ImgSearchError):
    reason = "broker_unavailable"
    stage = "broker"
    retriable = True


class InternalError(ImgSearchError):
    """An unexpected exception while handling one event, so that it is dead-lettered
    (with the original exception named) instead of stopping the worker."""

    reason = "internal_error"

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage  # type: ignore[misc]

    @classmethod
    def wrap(cls, exc: BaseException, stage: str) -> ImgSearchError:
        """``exc`` itself if it is already one of ours, else an InternalError naming it."""
        if isinstance(exc, ImgSearchError):
            return exc
        error = cls(f"unexpected {type(exc).__name__} in {stage}: {exc}"[:2000], stage=stage)
        error.__cause__ = exc
        return error
