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


def envelope_text(data_json: str) -> bytes:
    return ('{"specversion": "1.0", "type": "image.uploaded", "source": "t", "id": "e1", '
            f'"data": {data_json}}}').encode()


@pytest.mark.parametrize(
    ("value", "reason", "names"),
    [
        # What the outside probe found: each of these used to pass or crash the worker.
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"x": NaN}}'),
         "invalid_json", "NaN"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"x": -Infinity}}'),
         "invalid_json", "Infinity"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"x": 1e400}}'),
         "invalid_json", "64-bit float"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "invalid_json", "nested deeper"),
        (b"[" * 10 + b"]" * 10, "invalid_json", "nested deeper"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"n": %d}}' % 2**64),
         "invalid_event", "data.metadata.n"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"s": "%s"}}'
                       % ("x" * 5_000_000)), "invalid_event", "data.metadata.s"),
        (envelope_text('{"image_id": "a\\nb", "uri": "file:///a"}'), "invalid_event",
         "data.image_id"),
        (envelope_text('{"image_id": "\\ud800", "uri": "file:///a"}'), "invalid_json",
         "surrogate"),
        (envelope_text('{"image_id": "   ", "uri": "file:///a"}'), "invalid_event",
         "data.image_id"),
        (envelope_text('{"image_id": "a", "uri": "file:///a\\u0000b"}'), "invalid_event",
         "data.uri"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"k": null}}'),
         "invalid_event", "data.metadata.k"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {"k": [1]}}'),
         "invalid_event", "data.metadata.k"),
        (envelope_text('{"image_id": "a", "uri": "file:///a", "metadata": {%s}}'
                       % ", ".join(f'"k{i}": "{"v" * 1000}"' for i in range(30))),
         "invalid_event", "16,384"),
        (b'{"specversion": "1.0", "type": "image.uploaded", "source": "t", "id": "e1", '
         b'"Trace": "x", "data": {"image_id": "a", "uri": "file:///a"}}', "invalid_event",
         "extension"),
        (b'{"specversion": "1.0", "type": "image.uploaded", "source": "t", "id": "e1", '
         b'"trace": {"a": 1}, "data": {"image_id": "a", "uri": "file:///a"}}', "invalid_event",
         "trace"),
        (b"x" * 100, "invalid_json", ""),
    ],
    ids=lambda v: v[:40] if isinstance(v, bytes) else str(v)[:40],
)
def test_the_contract_refuses_what_the_store_cannot_hold(value: bytes, reason: str,
                                                         names: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(value)
    assert info.value.reason == reason
    assert names in str(info.value)
    assert len(str(info.value)) <= 2200  # a 5 MB value is named, not echoed


def test_event_size_is_bounded_before_parsing() -> None:
    big = envelope_text('{"image_id": "a", "image_b64": "%s"}' % ("A" * 2000))
    with pytest.raises(EventError) as info:
        parse_event(big, max_bytes=1000)
    assert info.value.reason == "invalid_json" and "at most 1,000" in str(info.value)


def test_values_the_contract_keeps() -> None:
    metadata = {"big": 2**63 - 1, "small": -(2**63), "f": 1.5e308, "t": True, "s": "é\ttab\nline",
                "emoji": "\U0001f426", "empty": ""}
    event = parse_event(encode(upload_event("sku/1 é", uri="file:///a.jpg", metadata=metadata))[1])
    assert isinstance(event, ImageUploaded) and event.metadata == metadata
    assert isinstance(event.metadata["big"], int) and event.metadata["t"] is True
    ext = parse_event(b'{"specversion": "1.0", "type": "image.uploaded", "source": "t", "id": "1",'
                      b' "traceparent": "00-ab-cd-01", "data": {"image_id": "a", "uri": "file:///a"}}')
    assert isinstance(ext, ImageUploaded)
