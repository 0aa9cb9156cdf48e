"""The event contract, version 1: CloudEvents 1.0 in structured JSON mode.

A Kafka message's value is the UTF-8 JSON envelope and its key is the ``image_id``,
so every event for one image lands in one partition, in order.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from shared.errors import EventError

UPLOADED = "image.uploaded"
DELETED = "image.deleted"
EVENT_TYPES = (UPLOADED, DELETED)

MetadataValue = StrictStr | StrictBool | StrictInt | StrictFloat
# Keys become payload paths (``metadata.<key>``) and query parameters, so keep them plain.
METADATA_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$"
MAX_METADATA_KEYS = 64


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    type: StrictStr
    source: StrictStr = Field(min_length=1)
    id: StrictStr = Field(min_length=1)
    time: datetime | None = None
    datacontenttype: StrictStr | None = None
    data: dict[str, Any]


class _UploadedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_id: StrictStr = Field(min_length=1, max_length=512)
    uri: StrictStr | None = Field(None, min_length=1, max_length=4096)
    image_b64: StrictStr | None = None
    metadata: dict[StrictStr, MetadataValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> _UploadedData:
        if (self.uri is None) == (self.image_b64 is None):
            raise ValueError("data must carry exactly one of 'uri' and 'image_b64'")
        check_metadata(self.metadata)
        return self


class _DeletedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_id: StrictStr = Field(min_length=1, max_length=512)


def check_metadata(metadata: dict[str, Any]) -> None:
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS}")
    for key in metadata:
        if not re.match(METADATA_KEY_PATTERN, key):
            raise ValueError(
                f"metadata key {key!r} must match {METADATA_KEY_PATTERN} "
                "(letters, digits, '_' and '-', starting with a letter or '_')"
            )


@dataclass(frozen=True)
class ImageUploaded:
    event_id: str
    source: str
    image_id: str
    uri: str | None
    image_bytes: bytes | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageDeleted:
    event_id: str
    source: str
    image_id: str


Event = ImageUploaded | ImageDeleted


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_event(value: bytes | None) -> Event:
    """Parse one Kafka message value. Raises EventError with a reason code:

    ``invalid_json`` (not UTF-8 JSON), ``invalid_event`` (envelope or data fails the schema),
    ``unknown_type``, ``invalid_base64``.
    """
    if value is None:
        raise EventError("message has no value (tombstone)", reason="invalid_event")
    try:
        raw = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EventError(f"message value is not UTF-8: {exc}", reason="invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise EventError(f"message value is not JSON: {exc}", reason="invalid_json") from exc
    if not isinstance(raw, dict):
        raise EventError("event must be a JSON object", reason="invalid_event")
    try:
        envelope = _Envelope.model_validate(raw)
    except ValidationError as exc:
        raise EventError(f"not a CloudEvents 1.0 envelope: {_describe(exc)}") from exc

    if envelope.type == UPLOADED:
        try:
            data = _UploadedData.model_validate(envelope.data)
        except ValidationError as exc:
            raise EventError(f"invalid image.uploaded data: {_describe(exc)}") from exc
        image_bytes = None
        if data.image_b64 is not None:
            try:
                image_bytes = base64.b64decode(data.image_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise EventError(
                    f"data.image_b64 is not valid base64: {exc}", reason="invalid_base64"
                ) from exc
            if not image_bytes:
                raise EventError("data.image_b64 is empty", reason="invalid_event")
        return ImageUploaded(
            event_id=envelope.id,
            source=envelope.source,
            image_id=data.image_id,
            uri=data.uri,
            image_bytes=image_bytes,
            metadata=dict(data.metadata),
        )
    if envelope.type == DELETED:
        try:
            deleted = _DeletedData.model_validate(envelope.data)
        except ValidationError as exc:
            raise EventError(f"invalid image.deleted data: {_describe(exc)}") from exc
        return ImageDeleted(event_id=envelope.id, source=envelope.source, image_id=deleted.image_id)
    raise EventError(
        f"unknown event type {envelope.type!r}; expected one of {', '.join(EVENT_TYPES)}",
        reason="unknown_type",
    )


def _envelope(event_type: str, source: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "type": event_type,
        "source": source,
        "id": str(uuid.uuid4()),
        "time": datetime.now(timezone.utc).isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }


def upload_event(
    image_id: str,
    *,
    uri: str | None = None,
    image_bytes: bytes | None = None,
    metadata: dict[str, Any] | None = None,
    source: str = "imgsearch",
) -> dict[str, Any]:
    """Build an ``image.uploaded`` envelope (exactly one of ``uri`` and ``image_bytes``)."""
    if (uri is None) == (image_bytes is None):
        raise ValueError("pass exactly one of uri and image_bytes")
    data: dict[str, Any] = {"image_id": image_id}
    if uri is not None:
        data["uri"] = uri
    else:
        data["image_b64"] = base64.b64encode(image_bytes or b"").decode("ascii")
    if metadata:
        check_metadata(metadata)
        data["metadata"] = metadata
    return _envelope(UPLOADED, source, data)


def delete_event(image_id: str, *, source: str = "imgsearch") -> dict[str, Any]:
    return _envelope(DELETED, source, {"image_id": image_id})


def encode(envelope: dict[str, Any]) -> tuple[bytes, bytes]:
    """Return the Kafka (key, value) for an envelope: the key is the image_id."""
    key = str(envelope["data"]["image_id"]).encode("utf-8")
    return key, json.dumps(envelope, separators=(",", ":")).encode("utf-8")
