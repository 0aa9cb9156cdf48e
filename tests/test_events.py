"""The event contract: what producers may send, and what each mistake is called."""

from __future__ import annotations

import base64
import json

import pytest

from shared.errors import EventError
from shared.events import ImageDeleted, ImageUploaded, delete_event, encode, parse_event, upload_event


def envelope(**data_fields: object) -> dict:
    return {
        "specversion": "1.0", "type": "image.uploaded", "source": "test", "id": "e1",
        "time": "2026-11-21T00:00:00Z", "datacontenttype": "application/json",
        "data": data_fields,
    }


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_upload_with_uri_round_trips() -> None:
    env = upload_event("cat-1", uri="file:///photos/cat.jpg", metadata={"label": "cat", "n": 3, "ok": True})
    key, value = encode(env)
    assert key == b"cat-1"
    event = parse_event(value)
    assert isinstance(event, ImageUploaded)
    assert (event.image_id, event.uri, event.image_bytes) == ("cat-1", "file:///photos/cat.jpg", None)
    assert event.metadata == {"label": "cat", "n": 3, "ok": True}


def test_upload_with_inline_bytes_round_trips() -> None:
    _, value = encode(upload_event("x", image_bytes=b"\xff\xd8\xffdata"))
    event = parse_event(value)
    assert isinstance(event, ImageUploaded) and event.image_bytes == b"\xff\xd8\xffdata"


def test_delete_round_trips() -> None:
    event = parse_event(encode(delete_event("gone"))[1])
    assert isinstance(event, ImageDeleted) and event.image_id == "gone"


def test_a_plain_producer_event_parses() -> None:
    """What a producer writes by hand from the README's contract."""
    event = parse_event(raw(envelope(image_id="p1", image_b64=base64.b64encode(b"abc").decode())))
    assert isinstance(event, ImageUploaded) and event.image_bytes == b"abc"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe not utf-8", "invalid_json"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_event"),
        (None, "invalid_event"),
        (raw({**envelope(image_id="a", uri="file:///a.jpg"), "specversion": "0.3"}), "invalid_event"),
        (raw({k: v for k, v in envelope(image_id="a", uri="file:///a").items() if k != "id"}), "invalid_event"),
        (raw({**envelope(image_id="a", uri="file:///a"), "type": "image.rotated"}), "unknown_type"),
        (raw(envelope(uri="file:///a.jpg")), "invalid_event"),
        (raw(envelope(image_id="", uri="file:///a.jpg")), "invalid_event"),
        (raw(envelope(image_id="a")), "invalid_event"),
        (raw(envelope(image_id="a", uri="file:///a", image_b64="YWJj")), "invalid_event"),
        (raw(envelope(image_id="a", image_b64="not base64!!")), "invalid_base64"),
        (raw(envelope(image_id="a", image_b64="")), "invalid_event"),
        (raw(envelope(image_id=7, uri="file:///a")), "invalid_event"),
        (raw(envelope(image_id="a", uri="file:///a", metadata={"bad key": 1})), "invalid_event"),
        (raw(envelope(image_id="a", uri="file:///a", metadata={"k": {"nested": 1}})), "invalid_event"),
        (raw(envelope(image_id="a", uri="file:///a", extra=1)), "invalid_event"),
    ],
)
def test_bad_events_are_named(value: bytes | None, reason: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(value)
    assert info.value.reason == reason
    assert not info.value.retriable
    assert str(info.value)  # a message a person can read
