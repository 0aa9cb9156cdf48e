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
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    model_validator,
)

from shared.errors import EventError
from shared.metadata import Metadata, check_image_id, check_metadata, check_text
from shared.strictjson import JSONError, loads

UPLOADED = "image.uploaded"
DELETED = "image.deleted"
EVENT_TYPES = (UPLOADED, DELETED)

# Envelopes are three levels deep (envelope, data, metadata); anything deeper is refused
# before it is parsed.
MAX_EVENT_DEPTH = 4
# CloudEvents extension attributes: lower-case names, scalar values (spec 1.0, section 3.1).
_EXTENSION_NAME = r"^[a-z0-9]{1,20}$"
MAX_EXTENSIONS = 32
MAX_TEXT = 1024  # source, id, datacontenttype, extension values
MAX_URI = 4096


def event_max_bytes(fetch_max_bytes: int) -> int:
    """The largest event value accepted: an inline image of ``fetch_max_bytes`` as base64,
    plus room for the envelope and its metadata."""
    return -(-fetch_max_bytes // 3) * 4 + 64 * 1024


DEFAULT_EVENT_MAX_BYTES = event_max_bytes(25 * 1024 * 1024)


def _text(max_length: int, *, single_line: bool = True) -> Any:
    def check(value: str, info: Any) -> str:
        return check_text(value, info.field_name or "value", max_length=max_length,
                          single_line=single_line)
    return AfterValidator(check)


def _image_id(value: str) -> str:
    return check_image_id(value)


def _metadata(value: dict[str, Any]) -> Metadata:
    return check_metadata(value)


Text = Annotated[StrictStr, Field(min_length=1), _text(MAX_TEXT)]
ImageId = Annotated[StrictStr, Field(min_length=1), AfterValidator(_image_id)]
MetadataField = Annotated[dict[str, Any], AfterValidator(_metadata)]


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    type: Text
    source: Text
    id: Text
    time: datetime | None = None
    datacontenttype: Annotated[StrictStr, _text(MAX_TEXT)] | None = None
    data: dict[str, Any]

    @model_validator(mode="after")
    def _extensions(self) -> _Envelope:
        extras = self.model_extra or {}
        if len(extras) > MAX_EXTENSIONS:
            raise ValueError(f"{len(extras)} extension attributes; at most {MAX_EXTENSIONS}")
        for name, value in extras.items():
            if not re.match(_EXTENSION_NAME, name):
                raise ValueError(f"attribute {name[:40]!r} is not a CloudEvents extension name "
                                 "(1-20 lower-case letters or digits)")
            if isinstance(value, str):
                check_text(value, name, max_length=MAX_TEXT)
            elif not isinstance(value, (bool, int)) or isinstance(value, float):
                raise ValueError(f"extension attribute {name!r} must be a string, integer or "
                                 "boolean")
        return self


class _UploadedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_id: ImageId
    uri: Annotated[StrictStr, Field(min_length=1), _text(MAX_URI)] | None = None
    image_b64: StrictStr | None = None
    metadata: MetadataField = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> _UploadedData:
        if (self.uri is None) == (self.image_b64 is None):
            raise ValueError("data must carry exactly one of 'uri' and 'image_b64'")
        return self


class _DeletedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_id: ImageId


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


def _describe(exc: ValidationError, prefix: str = "") -> str:
    """Each problem as ``field.path: what is wrong``, naming the field once."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(p) for p in err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc and msg.startswith((f"{loc[-1]}:", f"{loc[-1]}.")):
            parts.append(prefix + ".".join(loc[:-1] + [msg]))  # our checks name the field
        else:
            parts.append(f"{prefix}{'.'.join(loc) or 'event'}: {msg}")
    return "; ".join(parts)[:2000]


def parse_event(value: bytes | None, *, max_bytes: int = DEFAULT_EVENT_MAX_BYTES) -> Event:
    """Parse one Kafka message value. Raises EventError, and only EventError, with a reason:

    ``invalid_json`` (not UTF-8 JSON, over ``max_bytes``, nested too deep, NaN or Infinity),
    ``invalid_event`` (envelope or data fails the schema), ``unknown_type``, ``invalid_base64``.
    """
    if value is None:
        raise EventError("message has no value (tombstone)", reason="invalid_event")
    try:
        raw = loads(value, max_bytes=max_bytes, max_depth=MAX_EVENT_DEPTH)
    except JSONError as exc:
        raise EventError(f"message value is not acceptable JSON: {exc}",
                         reason="invalid_json") from exc
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
            raise EventError(f"invalid image.uploaded data: {_describe(exc, 'data.')}") from exc
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
            raise EventError(f"invalid image.deleted data: {_describe(exc, 'data.')}") from exc
        return ImageDeleted(event_id=envelope.id, source=envelope.source, image_id=deleted.image_id)
    raise EventError(
        f"unknown event type {envelope.type[:100]!r}; expected one of {', '.join(EVENT_TYPES)}",
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
    check_image_id(image_id)
    if metadata:
        data["metadata"] = check_metadata(metadata)
    return _envelope(UPLOADED, source, data)


def delete_event(image_id: str, *, source: str = "imgsearch") -> dict[str, Any]:
    check_image_id(image_id)
    return _envelope(DELETED, source, {"image_id": image_id})


def encode(envelope: dict[str, Any]) -> tuple[bytes, bytes]:
    """Return the Kafka (key, value) for an envelope: the key is the image_id."""
    key = str(envelope["data"]["image_id"]).encode("utf-8")
    return key, json.dumps(envelope, separators=(",", ":")).encode("utf-8")
