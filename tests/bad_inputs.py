"""A corpus of bad inputs, each with the dead-letter reason it must get.

Network targets are loopback only: the SSRF guard's refusal of other addresses
(169.254.169.254, 10/8, ...) is tested on IP literals in test_netguard.py, never by
sending them anywhere.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from shared.events import upload_event


@dataclass(frozen=True)
class BadInput:
    kind: str
    value: bytes | None
    reason: str

    @property
    def key(self) -> bytes:
        return f"bad/{self.kind}".encode()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def _encoded(fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (120, 30, 200)).save(buf, fmt, **kw)
    return buf.getvalue()


def _envelope(data: Any, **overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"specversion": "1.0", "type": "image.uploaded", "source": "corpus",
                           "id": "evt", "data": data}
    env.update(overrides)
    return env


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _inline(image_id: str, data: bytes) -> bytes:
    return _json(upload_event(image_id, image_bytes=data))


def _uri(image_id: str, uri: str) -> bytes:
    return _json(upload_event(image_id, uri=uri))


def build_corpus(inside: Path, outside: Path, server: str, good_jpeg: bytes) -> list[BadInput]:
    """``inside`` is under IMAGE_FILE_ROOTS, ``outside`` is not; ``server`` is a loopback
    image server (tests/http_fixtures.py) whose address is allowed for fetching."""
    jpeg, png, webp = _encoded("JPEG"), _encoded("PNG"), _encoded("WEBP")
    port = server.rsplit(":", 1)[1]

    (inside / "zero.jpg").write_bytes(b"")
    (inside / "notes.jpg").write_text("a text file pretending to be a JPEG\n")
    (inside / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    with (inside / "huge.jpg").open("wb") as f:  # 50 MB
        f.write(jpeg[:4])
        f.write(os.urandom(1024 * 1024) * 50)
    (outside / "secret.jpg").write_bytes(good_jpeg)
    os.symlink(outside / "secret.jpg", inside / "link-out.jpg")
    os.symlink(inside / "link-loop-a", inside / "link-loop-b")
    os.symlink(inside / "link-loop-b", inside / "link-loop-a")
    good_b64 = base64.b64encode(good_jpeg).decode()

    corpus = [
        # --- not an event at all
        BadInput("not-json", b"hello, I am not JSON", "invalid_json"),
        BadInput("non-utf8", b"\xff\xfe\xfa{\"specversion\"", "invalid_json"),
        BadInput("truncated-json", _json(upload_event("t", uri="file:///x.jpg"))[:40], "invalid_json"),
        BadInput("json-array", b"[1, 2, 3]", "invalid_event"),
        BadInput("json-null", b"null", "invalid_event"),
        BadInput("tombstone", None, "invalid_event"),
        # --- envelope
        BadInput("specversion-0.3", _json(_envelope({"image_id": "a", "image_b64": good_b64}, specversion="0.3")), "invalid_event"),
        BadInput("missing-id", _json({k: v for k, v in _envelope({"image_id": "a", "image_b64": good_b64}).items() if k != "id"}), "invalid_event"),
        BadInput("missing-source", _json({k: v for k, v in _envelope({"image_id": "a", "image_b64": good_b64}).items() if k != "source"}), "invalid_event"),
        BadInput("unknown-type", _json(_envelope({"image_id": "a"}, type="image.resized")), "unknown_type"),
        BadInput("data-not-object", _json(_envelope("just a string")), "invalid_event"),
        BadInput("bad-time", _json(_envelope({"image_id": "a", "image_b64": good_b64}, time="yesterday")), "invalid_event"),
        # --- data
        BadInput("missing-image-id", _json(_envelope({"image_b64": good_b64})), "invalid_event"),
        BadInput("empty-image-id", _json(_envelope({"image_id": "", "image_b64": good_b64})), "invalid_event"),
        BadInput("numeric-image-id", _json(_envelope({"image_id": 42, "image_b64": good_b64})), "invalid_event"),
        BadInput("both-uri-and-b64", _json(_envelope({"image_id": "a", "uri": "file:///x.jpg", "image_b64": good_b64})), "invalid_event"),
        BadInput("neither-uri-nor-b64", _json(_envelope({"image_id": "a"})), "invalid_event"),
        BadInput("broken-base64", _json(_envelope({"image_id": "a", "image_b64": "%%%not-base64%%%"})), "invalid_base64"),
        BadInput("nested-metadata", _json(_envelope({"image_id": "a", "image_b64": good_b64, "metadata": {"x": {"y": 1}}})), "invalid_event"),
        BadInput("metadata-bad-key", _json(_envelope({"image_id": "a", "image_b64": good_b64, "metadata": {"a.b": 1}})), "invalid_event"),
        BadInput("unknown-data-field", _json(_envelope({"image_id": "a", "image_b64": good_b64, "colour": "red"})), "invalid_event"),
        # --- bytes that are not a usable image
        BadInput("zero-byte-file", _uri("zero", (inside / "zero.jpg").as_uri()), "undecodable"),
        BadInput("text-named-jpg", _uri("notes", (inside / "notes.jpg").as_uri()), "undecodable"),
        BadInput("truncated-jpeg-file", _uri("trunc", (inside / "truncated.jpg").as_uri()), "undecodable"),
        BadInput("truncated-jpeg", _inline("tj", jpeg[: len(jpeg) // 2]), "undecodable"),
        BadInput("truncated-png", _inline("tp", png[: len(png) // 2]), "undecodable"),
        BadInput("truncated-webp", _inline("tw", webp[: len(webp) // 2]), "undecodable"),
        BadInput("corrupt-jpeg", _inline("cj", jpeg[:20] + os.urandom(400)), "undecodable"),
        BadInput("corrupt-png", _inline("cp", png[:16] + os.urandom(200)), "undecodable"),
        BadInput("decompression-bomb", _inline("bomb", png_bomb(30_000, 30_000)), "too_many_pixels"),
        BadInput("50mb-file", _uri("huge", (inside / "huge.jpg").as_uri()), "too_large"),
        # --- where the bytes come from
        BadInput("dotdot-relative", _uri("dd", "file://../../etc/passwd"), "forbidden_uri"),
        BadInput("outside-roots", _uri("out", (outside / "secret.jpg").as_uri()), "forbidden_uri"),
        BadInput("dotdot-escape", _uri("esc", f"file://{inside}/../{outside.name}/secret.jpg"), "forbidden_uri"),
        BadInput("symlink-escape", _uri("sym", (inside / "link-out.jpg").as_uri()), "forbidden_uri"),
        BadInput("symlink-loop", _uri("loop", (inside / "link-loop-a").as_uri()), "not_found"),
        BadInput("missing-file", _uri("missing", (inside / "nope.jpg").as_uri()), "not_found"),
        BadInput("loopback-not-allowed", _uri("lb2", f"http://127.0.0.2:{port}/img/good.jpg"), "forbidden_uri"),
        BadInput("ipv6-loopback", _uri("lb6", f"http://[::1]:{port}/img/good.jpg"), "forbidden_uri"),
        BadInput("ftp-scheme", _uri("ftp", "ftp://127.0.0.1/img.jpg"), "unsupported_uri"),
        BadInput("http-404", _uri("h404", f"{server}/status/404"), "fetch_http_4xx"),
        BadInput("http-403", _uri("h403", f"{server}/status/403"), "fetch_http_4xx"),
        BadInput("http-500", _uri("h500", f"{server}/status/500"), "fetch_http_5xx"),
        BadInput("http-slow", _uri("slow", f"{server}/slow"), "fetch_timeout"),
        BadInput("http-endless", _uri("endless", f"{server}/endless"), "too_large"),
        BadInput("http-html", _uri("html", f"{server}/html"), "undecodable"),
        BadInput("redirect-loop", _uri("rl", f"{server}/redirect-loop"), "too_many_redirects"),
    ]
    return corpus
