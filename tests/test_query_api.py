"""The query API against real bird photos, the real model and the embedded store, over
real HTTP on loopback (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import functools
import gc
import http.server
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from query_api.app import create_app
from query_api.publishing import producer_overrides
from query_api.server import BackgroundServer
from shared.components import Components
from shared.events import ImageUploaded, parse_event
from shared.kafka import EventPublisher, ensure_topics, make_producer
from shared.pipeline.stages import WorkItem
from shared.store.base import CollectionSpec
from shared.store.edge import EdgeStore
from tests.conftest import MOBILENET, REPO, TansuBroker, free_port, wait_for_port
from tests.query_api_support import Bird, api_settings, bird_rows, index, pick, upload_item

API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "second-key-abcdef0123456789"
MAX_UPLOAD = 2 * 1024 * 1024


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@dataclass
class Gallery:
    settings: Any
    components: Components
    indexed: list[Bird]
    held_out: list[Bird]
    inline_id: str
    http_id: str

    def by_label(self, label: str) -> list[Bird]:
        return [b for b in self.indexed if b.label == label]


@pytest.fixture(scope="module")
def photo_server(birds: Path) -> Iterator[str]:
    """Serves the bird photos over http on loopback, for http:// URIs."""
    handler = functools.partial(_QuietHandler, directory=str(birds))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, embedder: Any, mobilenet_weights: Path,
            data_dir: Path, birds: Path, photo_server: str) -> Iterator[Gallery]:
    """200 birds (3 train + 1 test photo of each of 50 species) indexed through the ingest
    pipeline with file:// URIs, plus one inline upload and one http:// image."""
    store = tmp_path_factory.mktemp("api-store")
    settings = api_settings(
        store, mobilenet_weights, [data_dir],
        api_max_upload_bytes=MAX_UPLOAD,
        fetch_allowed_networks=["127.0.0.1/32"],  # the photo server above, nothing else
    )
    components = Components.load(settings, embedder=embedder)
    rows = bird_rows(birds)
    indexed = pick(rows, train=3, test=1)
    held_out = pick(rows, train=0, test=1, skip_test=1)
    extra = pick(rows, train=0, test=2, skip_test=2)
    inline, via_http = extra[0], extra[3]
    items = [upload_item(b, n) for n, b in enumerate(indexed)]
    items.append(upload_item(inline, 900, inline=True))
    items.append(upload_item(via_http, 901, uri=f"{photo_server}/{via_http.image_id}"))
    index(components, items)
    try:
        yield Gallery(settings, components, indexed, held_out, inline.image_id, via_http.image_id)
    finally:
        components.close()


def _serve(gallery: Gallery, **overrides: Any) -> BackgroundServer:
    settings = gallery.settings.model_copy(update={"api_port": free_port(), **overrides})
    app = create_app(gallery.components, settings=settings)
    return BackgroundServer(app, port=settings.api_port).start()


@pytest.fixture(scope="module")
def server(gallery: Gallery) -> Iterator[BackgroundServer]:
    srv = _serve(gallery, api_batching=True, api_batch_max_size=16, api_batch_max_wait_ms=5.0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def unbatched(gallery: Gallery) -> Iterator[BackgroundServer]:
    srv = _serve(gallery, api_batching=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def search(client: httpx.Client, data: bytes, **params: Any) -> dict[str, Any]:
    r = client.post("/search", content=data, headers={"content-type": "image/jpeg"},
                    params=params)
    assert r.status_code == 200, r.text
    return r.json()


def ids(result: dict[str, Any]) -> list[str]:
    return [h["image_id"] for h in result["hits"]]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


# -- search -----------------------------------------------------------------------------------


def test_search_by_an_indexed_photo_finds_it_first(client: httpx.Client, gallery: Gallery) -> None:
    bird = gallery.indexed[7]
    result = search(client, bird.read(), limit=5)
    first = result["hits"][0]
    assert first["image_id"] == bird.image_id
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["uri"] == bird.path.as_uri()
    assert first["metadata"] == {"label": bird.label, "split": bird.split}
    scores = [h["score"] for h in result["hits"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert result["model"] == MOBILENET
    timing = result["timing"]
    assert timing["embed_ms"] > 0 and timing["batch_size"] >= 1
    assert timing["total_ms"] >= timing["embed_ms"]


def test_held_out_photos_find_their_species(client: httpx.Client, gallery: Gallery) -> None:
    """Photos that are not in the gallery: the species should come first for most of them
    (mobilenetv2 ImageNet features, 4 photos per species in the gallery)."""
    queries = gallery.held_out[:25]
    right = sum(
        search(client, q.read(), limit=1)["hits"][0]["metadata"]["label"] == q.label
        for q in queries
    )
    assert right >= 0.5 * len(queries), f"only {right}/{len(queries)} top-1 species matches"


def test_multipart_and_raw_bodies_give_the_same_answer(client: httpx.Client,
                                                      gallery: Gallery) -> None:
    bird = gallery.held_out[3]
    raw = search(client, bird.read(), limit=8)
    r = client.post("/search", files={"file": ("q.jpg", bird.read(), "image/jpeg")},
                    params={"limit": 8})
    assert r.status_code == 200, r.text
    assert ids(r.json()) == ids(raw)


def test_pages_do_not_overlap_and_cover_the_ranking(client: httpx.Client, gallery: Gallery) -> None:
    data = gallery.held_out[10].read()
    whole = search(client, data, limit=30)
    pages = [search(client, data, limit=10, offset=o) for o in (0, 10, 20)]
    paged = [i for p in pages for i in ids(p)]
    assert len(paged) == len(set(paged)) == 30
    assert paged == ids(whole)
    assert [p["next_offset"] for p in pages] == [10, 20, 30]
    total = len(gallery.indexed) + 2
    last = search(client, data, limit=10, offset=total - 5)
    assert len(last["hits"]) == 5 and last["next_offset"] is None


def test_score_threshold_keeps_only_close_hits(client: httpx.Client, gallery: Gallery) -> None:
    data = gallery.held_out[20].read()
    everything = search(client, data, limit=100)
    scores = [h["score"] for h in everything["hits"]]
    assert scores[5] > scores[6]
    threshold = (scores[5] + scores[6]) / 2  # between two hits: no float ties at the edge
    kept = search(client, data, limit=100, score_threshold=threshold)
    assert all(h["score"] >= threshold for h in kept["hits"])
    assert ids(kept) == ids(everything)[:6]


def test_filters_are_anded(client: httpx.Client, gallery: Gallery) -> None:
    bird = gallery.held_out[0]
    label = gallery.indexed[-1].label
    same = search(client, bird.read(), limit=50, filter=f"label={label}")
    assert sorted(ids(same)) == sorted(b.image_id for b in gallery.by_label(label))
    both = client.post(
        "/search", content=bird.read(), headers={"content-type": "image/jpeg"},
        params=[("limit", "50"), ("filter", f"label={label}"), ("filter", "split=test")],
    )
    assert both.status_code == 200, both.text
    expected = [b.image_id for b in gallery.by_label(label) if b.split == "test"]
    assert ids(both.json()) == expected and len(expected) == 1
    nothing = search(client, bird.read(), filter="label=No_Such_Bird")
    assert nothing["hits"] == []
    contradiction = client.post(
        "/search", content=bird.read(), headers={"content-type": "image/jpeg"},
        params=[("filter", f"label={label}"), ("filter", f"label={gallery.indexed[0].label}")],
    )
    assert contradiction.status_code == 200 and contradiction.json()["hits"] == []


def test_with_metadata_false_leaves_metadata_out(client: httpx.Client, gallery: Gallery) -> None:
    result = search(client, gallery.held_out[5].read(), limit=3, with_metadata="false")
    assert [h["metadata"] for h in result["hits"]] == [None, None, None]
    assert all(h["uri"] for h in result["hits"])


# -- stored images ----------------------------------------------------------------------------


def test_similar_uses_the_stored_vector(client: httpx.Client, gallery: Gallery) -> None:
    bird = gallery.indexed[40]
    r = client.get(f"/images/{bird.image_id}/similar", params={"limit": 10})
    assert r.status_code == 200, r.text
    similar = r.json()
    assert similar["query_image_id"] == bird.image_id
    assert similar["timing"]["embed_ms"] is None, "similar must not re-embed"
    assert bird.image_id not in ids(similar)
    by_upload = search(client, bird.read(), limit=11)
    expected = [h for h in by_upload["hits"] if h["image_id"] != bird.image_id][:10]
    assert ids(similar) == [h["image_id"] for h in expected]
    for got, want in zip(similar["hits"], expected, strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
    page2 = client.get(f"/images/{bird.image_id}/similar", params={"limit": 5, "offset": 5})
    assert ids(page2.json()) == ids(similar)[5:]
    filtered = client.get(f"/images/{bird.image_id}/similar",
                          params={"filter": f"label={bird.label}", "limit": 50}).json()
    assert sorted(ids(filtered)) == sorted(
        b.image_id for b in gallery.by_label(bird.label) if b.image_id != bird.image_id)


def test_get_image_returns_the_stored_payload(client: httpx.Client, gallery: Gallery) -> None:
    bird = gallery.indexed[3]
    r = client.get(f"/images/{bird.image_id}")
    assert r.status_code == 200, r.text
    payload = r.json()
    assert payload["image_id"] == bird.image_id
    assert payload["uri"] == bird.path.as_uri()
    assert payload["metadata"] == {"label": bird.label, "split": bird.split}
    assert payload["model"] == MOBILENET and len(payload["sha256"]) == 64


def test_count(client: httpx.Client, gallery: Gallery) -> None:
    r = client.get("/count")
    assert r.status_code == 200
    assert r.json() == {"count": len(gallery.indexed) + 2}


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == MOBILENET and ready.json()["dim"] == 1280


def test_thumbnails_of_file_and_http_images(client: httpx.Client, gallery: Gallery) -> None:
    for image_id in (gallery.indexed[0].image_id, gallery.http_id):
        r = client.get(f"/images/{image_id}/thumbnail", params={"size": 96})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(r.content))
        assert thumb.format == "JPEG" and max(thumb.size) == 96
        again = client.get(f"/images/{image_id}/thumbnail", params={"size": 96},
                           headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304


def test_thumbnail_is_unavailable_for_inline_uploads(client: httpx.Client,
                                                    gallery: Gallery) -> None:
    r = client.get(f"/images/{gallery.inline_id}/thumbnail")
    assert_error(r, 404, "thumbnail_unavailable")


def test_the_web_page_and_docs_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/search", "/images", "/images/{image_id}", "/images/{image_id}/similar",
                 "/images/{image_id}/thumbnail", "/count", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    search_op = spec["paths"]["/search"]["post"]
    assert {"400", "413", "415", "422", "503"} <= set(search_op["responses"])
    assert search_op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    assert {"multipart/form-data", "image/jpeg"} <= set(search_op["requestBody"]["content"])
    params = {p["name"]: p for p in search_op["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 100


def test_metrics_use_route_templates(client: httpx.Client, gallery: Gallery) -> None:
    client.get(f"/images/{gallery.indexed[1].image_id}")
    search(client, gallery.held_out[1].read(), limit=1)
    text = client.get("/metrics").text
    assert 'route="/images/{image_id}"' in text
    assert gallery.indexed[1].image_id not in text, "raw paths must not become labels"
    assert 'imgsearch_api_requests_total{method="POST",route="/search",status="200"}' in text
    assert "imgsearch_api_batch_size_count" in text
    assert "imgsearch_api_embed_duration_seconds_count" in text
    assert "imgsearch_api_search_duration_seconds_count" in text
    assert "imgsearch_api_batch_queue_wait_seconds_count" in text
    assert f"imgsearch_api_stored_images {float(len(gallery.indexed) + 2)}" in text
    assert 'imgsearch_api_model_info{device="cpu",dim="1280",model="mobilenetv2_100"} 1.0' in text


# -- bad input --------------------------------------------------------------------------------


def test_not_an_image_is_400(client: httpx.Client, gallery: Gallery) -> None:
    r = client.post("/search", content=b"certainly not a picture",
                    headers={"content-type": "image/jpeg"})
    assert_error(r, 400, "undecodable")
    truncated = gallery.indexed[0].read()[:600]
    assert_error(client.post("/search", content=truncated, headers={"content-type": "image/jpeg"}),
                 400, "undecodable")
    assert_error(client.post("/search", content=b"", headers={"content-type": "image/png"}),
                 400, "undecodable")
    r = client.post("/search", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert_error(r, 400, "undecodable")


def test_unsupported_content_types_are_415(client: httpx.Client, gallery: Gallery) -> None:
    data = gallery.indexed[0].read()
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/json"}, {}):
        r = client.post("/search", content=data, headers=headers)
        assert_error(r, 415, "unsupported_media_type")


def _raw_http(port: int, head: bytes, body_chunks: list[bytes], timeout_s: float = 20) -> bytes:
    """Send a request by hand and return what the server answered, without ever finishing
    the body: a server that waited for the whole body would never answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early: what we want
        sock.settimeout(timeout_s)
        answer = b""
        while b"\r\n\r\n" not in answer:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
        return answer


def test_oversized_bodies_are_413_while_streaming(server: BackgroundServer) -> None:
    # Declared too large: refused before a single body byte is sent.
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    answer = _raw_http(server.port, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"too_large"' in answer or b"application/json" in answer
    # Chunked, no length: cut off once past the limit, though the body never ends.
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"\xff" * 65536
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    answer = _raw_http(server.port, head, [framed] * (MAX_UPLOAD // len(chunk) + 2))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_oversized_multipart_is_413(client: httpx.Client) -> None:
    r = client.post("/search", files={"file": ("big.jpg", b"\xff" * (MAX_UPLOAD + 10), "image/jpeg")})
    assert_error(r, 413, "too_large")


def test_decompression_bomb_is_refused(client: httpx.Client) -> None:
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP in a few KB
    assert len(bomb.getvalue()) < 100_000
    r = client.post("/search", content=bomb.getvalue(), headers={"content-type": "image/png"})
    body = assert_error(r, 413, "too_many_pixels")
    assert "IMAGE_MAX_PIXELS" in body["error"]["message"]


def test_unknown_ids_are_404(client: httpx.Client) -> None:
    for path in ("/images/no/such/bird.jpg", "/images/nope/similar", "/images/nope/thumbnail"):
        assert_error(client.get(path), 404, "image_not_found")
    assert_error(client.get("/no-such-endpoint"), 404, "not_found")
    assert_error(client.delete("/count"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0}, {"limit": 101}, {"limit": "ten"}, {"offset": -1}, {"offset": 10_001},
        {"score_threshold": 1.5}, {"score_threshold": "nan"}, {"with_metadata": "perhaps"},
        {"filter": "label"}, {"filter": "bad key=x"},
    ],
)
def test_bad_parameters_are_422(client: httpx.Client, gallery: Gallery,
                                params: dict[str, Any]) -> None:
    r = client.post("/search", content=gallery.indexed[0].read(),
                    headers={"content-type": "image/jpeg"}, params=params)
    assert_error(r, 422)
    similar = client.get(f"/images/{gallery.indexed[0].image_id}/similar", params=params)
    assert_error(similar, 422)


def test_malformed_multipart(client: httpx.Client, gallery: Gallery) -> None:
    r = client.post("/search", files={"picture": ("a.jpg", gallery.indexed[0].read(), "image/jpeg")})
    assert_error(r, 422, "missing_file")
    r = client.post("/search", content=b"--x\r\nnonsense",
                    headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "invalid_multipart")
    r = client.post("/search", content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 400, "invalid_multipart")


# -- API keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(gallery: Gallery) -> Iterator[BackgroundServer]:
    from pydantic import SecretStr

    srv = _serve(gallery, api_keys=[SecretStr(API_KEY), SecretStr(OTHER_KEY)], api_warmup=False)
    yield srv
    srv.stop()


def test_api_keys_are_required(keyed: BackgroundServer, gallery: Gallery) -> None:
    bird = gallery.indexed[0]
    calls = [
        ("POST", "/search", {"content": bird.read(), "headers": {"content-type": "image/jpeg"}}),
        ("GET", f"/images/{bird.image_id}", {}),
        ("GET", f"/images/{bird.image_id}/similar", {}),
        ("GET", f"/images/{bird.image_id}/thumbnail", {}),
        ("POST", "/images", {"files": {"file": ("a.jpg", bird.read(), "image/jpeg")},
                             "data": {"image_id": "x"}}),
        ("GET", "/count", {}),
        ("GET", "/metrics", {}),
    ]
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        for method, path, kwargs in calls:
            r = c.request(method, path, **kwargs)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            wrong = c.request(method, path, headers={**kwargs.get("headers", {}),
                                                     "X-API-Key": API_KEY + "x"},
                              **{k: v for k, v in kwargs.items() if k != "headers"})
            assert_error(wrong, 401, "unauthorized")
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        ok = c.get("/count", headers={"X-API-Key": API_KEY})
        assert ok.status_code == 200 and ok.json()["count"] == len(gallery.indexed) + 2
        bearer = c.post("/search", content=bird.read(),
                        headers={"content-type": "image/jpeg",
                                 "Authorization": f"Bearer {OTHER_KEY}"})
        assert bearer.status_code == 200 and bearer.json()["hits"][0]["image_id"] == bird.image_id
        assert c.get(f"/images/{bird.image_id}/thumbnail",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert_error(c.get("/count", headers={"Authorization": f"Basic {API_KEY}"}), 401)


def test_short_api_keys_are_refused_at_startup(gallery: Gallery) -> None:
    from shared.config import load_settings
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="API_KEYS"):
        load_settings(api_keys="short")
    assert [k.get_secret_value() for k in load_settings(api_keys=f"{API_KEY}, {OTHER_KEY}").api_keys] \
        == [API_KEY, OTHER_KEY]


# -- concurrency ------------------------------------------------------------------------------


async def _hammer(url: str, queries: list[bytes], clients: int) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        pending = list(enumerate(queries))
        results: list[httpx.Response | Exception] = [Exception("not sent")] * len(queries)

        async def worker() -> None:
            while pending:
                i, data = pending.pop()
                try:
                    results[i] = await c.post("/search", content=data, params={"limit": 10},
                                              headers={"content-type": "image/jpeg"})
                except Exception as exc:  # counted as an error below
                    results[i] = exc

        await asyncio.gather(*(worker() for _ in range(clients)))
        return results


def test_64_concurrent_clients_get_the_unbatched_answers(server: BackgroundServer,
                                                        unbatched: BackgroundServer,
                                                        gallery: Gallery) -> None:
    photos = (gallery.held_out + gallery.indexed)[:64]
    queries = [b.read() for b in photos] * 3
    with httpx.Client(base_url=unbatched.url, timeout=60) as c:
        reference = [search(c, data, limit=10) for data in (b.read() for b in photos)]
        assert all(r["timing"]["batch_size"] == 1 for r in reference)
    responses = asyncio.run(_hammer(server.url, queries, clients=64))
    errors = [r for r in responses if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert not errors, f"{len(errors)} errors, e.g. {errors[:3]}"
    batch_sizes = []
    for i, response in enumerate(responses):
        assert isinstance(response, httpx.Response)
        got, want = response.json(), reference[i % len(photos)]
        assert ids(got) == ids(want), f"query {i}: ranking differs from the unbatched one"
        for g, w in zip(got["hits"], want["hits"], strict=True):
            assert abs(g["score"] - w["score"]) <= 1e-4
        batch_sizes.append(got["timing"]["batch_size"])
    assert max(batch_sizes) > 1, "64 concurrent clients should have shared forward passes"


# -- uploads through Kafka --------------------------------------------------------------------


def _read_event(settings: Any, partition: int, offset: int) -> ImageUploaded:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             enable_auto_commit=False, consumer_timeout_ms=15_000)
    try:
        tp = TopicPartition(settings.kafka_topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        for record in consumer:
            event = parse_event(record.value)
            assert isinstance(event, ImageUploaded)
            return event
    finally:
        consumer.close()
    raise AssertionError(f"no record at {settings.kafka_topic}/{partition}@{offset}")


def test_upload_publishes_an_event_that_workers_ingest(gallery: Gallery, broker: TansuBroker,
                                                      topics: Any) -> None:
    settings = gallery.settings.model_copy(update={
        "kafka_bootstrap_servers": broker.bootstrap, "kafka_topic": f"api-{os.getpid()}-{time.time_ns()}",
        "api_port": free_port(), "api_warmup": False,
    })
    topics(settings)
    publisher = EventPublisher(settings)
    bird = gallery.held_out[30]
    try:
        app = create_app(gallery.components, settings=settings, publisher=publisher)
        with BackgroundServer(app, port=settings.api_port) as srv, \
                httpx.Client(base_url=srv.url, timeout=60) as c:
            metadata = {"label": bird.label, "photographer": "tests", "rating": 4}
            r = c.post("/images", files={"file": ("bird.jpg", bird.read(), "image/jpeg")},
                       data={"image_id": "uploads/bird-1", "metadata": json.dumps(metadata)})
            assert r.status_code == 202, r.text
            accepted = r.json()
            assert accepted["image_id"] == "uploads/bird-1" and accepted["event_id"]
            assert r.headers["location"] == "/images/uploads/bird-1"

            event = _read_event(settings, accepted["partition"], accepted["offset"])
            assert event.event_id == accepted["event_id"]
            assert event.image_id == "uploads/bird-1" and event.uri is None
            assert event.image_bytes == bird.read() and event.metadata == metadata

            # What a worker does with it, then the API finds the upload.
            index(gallery.components, [WorkItem("upload", event)])
            stored = c.get("/images/uploads/bird-1").json()
            assert stored["metadata"] == metadata and stored["event_id"] == accepted["event_id"]
            found = c.post("/search", content=bird.read(), headers={"content-type": "image/jpeg"},
                           params={"limit": 1}).json()
            assert found["hits"][0]["image_id"] == "uploads/bird-1"

            # Refused before publishing.
            assert_error(c.post("/images", files={"file": ("x.jpg", b"nope", "image/jpeg")},
                                data={"image_id": "bad"}), 400, "undecodable")
            assert_error(c.post("/images", files={"file": ("b.jpg", bird.read(), "image/jpeg")}),
                         422, "invalid_image_id")
            for bad in ("not json", "[1, 2]", '{"k": [1]}', '{"bad key": 1}', '{"n": 1e400}',
                        '{"n": 100000000000000000000}'):
                assert_error(c.post("/images", files={"file": ("b.jpg", bird.read(), "image/jpeg")},
                                    data={"image_id": "x", "metadata": bad}), 422, "invalid_metadata")
            assert_error(c.post("/images", content=bird.read(),
                                headers={"content-type": "image/jpeg"}), 415)
    finally:
        publisher.close()
        gallery.components.store.delete(["uploads/bird-1"])


def _upload_once(gallery: Gallery, settings: Any, publisher: EventPublisher) -> httpx.Response:
    app = create_app(gallery.components, settings=settings, publisher=publisher)
    with BackgroundServer(app, port=settings.api_port) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        return c.post("/images", data={"image_id": "never"},
                      files={"file": ("b.jpg", gallery.indexed[0].read(), "image/jpeg")})


# kafka-python leaves the sockets of refused reconnects to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_upload_with_the_broker_down_is_503(gallery: Gallery,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # kafka-python logs each refused reconnect with its exception, whose traceback holds the
    # unclosed socket; pytest keeps captured records until the session ends. Not logging
    # them lets the sockets be collected (and warned about) inside this test.
    caplog.set_level(logging.CRITICAL, logger="kafka")
    own = TansuBroker()
    own.start()
    settings = gallery.settings.model_copy(update={
        "kafka_bootstrap_servers": own.bootstrap, "kafka_topic": "down-test",
        "api_port": free_port(), "api_warmup": False, "api_publish_timeout_s": 3.0,
    })
    ensure_topics(settings, [settings.kafka_topic], partitions=1)
    publisher = EventPublisher(settings, make_producer(settings, **producer_overrides(3.0)))
    publisher.publish_and_wait({"specversion": "1.0", "type": "image.uploaded", "source": "t",
                                "id": "warm", "data": {"image_id": "warm", "uri": "file:///x"}})
    own.stop()
    started = time.monotonic()
    try:
        response = _upload_once(gallery, settings, publisher)
        elapsed = time.monotonic() - started
    finally:
        publisher.producer.close(timeout=10)  # the failed record has expired: no hang
        del publisher
        gc.collect()  # finalize the library's leaked sockets inside this test
    assert_error(response, 503, "broker_unavailable")
    assert elapsed < 15


def test_upload_without_a_publisher_is_503(client: httpx.Client, gallery: Gallery) -> None:
    r = client.post("/images", files={"file": ("b.jpg", gallery.indexed[0].read(), "image/jpeg")},
                    data={"image_id": "x"})
    assert_error(r, 503, "publishing_disabled")


# -- the real entry point ---------------------------------------------------------------------


def _module_env(store: Path, weights: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QDRANT_", "API_", "MODEL_"))}
    env.update({
        "QDRANT_PATH": str(store), "MODEL_NAME": MOBILENET, "MODEL_WEIGHTS": str(weights),
        "DEVICE": "cpu", "API_HOST": "127.0.0.1", "API_PORT": str(port),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "API_WARMUP": "false",
        "PYTHONPATH": str(REPO),
    })
    return env


def test_python_m_query_api_serves(tmp_path: Path, mobilenet_weights: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "query_api"], cwd=REPO,
                            env=_module_env(tmp_path / "store", mobilenet_weights, port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 60
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.get("/readyz").json()["model"] == MOBILENET
            assert c.get("/count").json() == {"count": 0}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]


def test_refuses_a_collection_built_for_another_model(tmp_path: Path,
                                                     mobilenet_weights: Path) -> None:
    store = tmp_path / "store"
    EdgeStore(store, CollectionSpec("images", 512, {"model_name": "resnet18"})).close()
    proc = subprocess.run([sys.executable, "-m", "query_api"], cwd=REPO, capture_output=True,
                          env=_module_env(store, mobilenet_weights, free_port()), timeout=180)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "holds 512-d vectors from model resnet18" in err, err[-2000:]
    assert "1280-d vectors with mobilenetv2_100" in err


# -- the Qdrant server backend ----------------------------------------------------------------


def test_the_api_over_the_qdrant_client_backend(tmp_path: Path, embedder: Any,
                                               mobilenet_weights: Path, data_dir: Path,
                                               birds: Path) -> None:
    """Production uses QDRANT_URL (qdrant-client); the same API over QdrantStore, with the
    client's local in-memory mode standing in for the server's engine."""
    from qdrant_client import QdrantClient

    from shared.components import collection_spec
    from shared.fetch import ImageFetcher
    from shared.store.qdrant import QdrantStore

    settings = api_settings(tmp_path / "unused", mobilenet_weights, [data_dir], api_warmup=False)
    store = QdrantStore(QdrantClient(":memory:"), collection_spec(settings, embedder))
    components = Components(settings, embedder, store, ImageFetcher.from_settings(settings))
    photos = pick(bird_rows(birds), train=1, test=1)[:40]
    try:
        index(components, [upload_item(b, n) for n, b in enumerate(photos)])
        app = create_app(components, settings=settings)
        with BackgroundServer(app, port=settings.api_port) as srv, \
                httpx.Client(base_url=srv.url, timeout=60) as c:
            bird = photos[6]
            found = search(c, bird.read(), limit=5)
            assert found["hits"][0]["image_id"] == bird.image_id
            similar = c.get(f"/images/{bird.image_id}/similar", params={"limit": 4}).json()
            assert ids(similar) == ids(found)[1:5]
            same_label = search(c, bird.read(), limit=10, filter=f"label={bird.label}")
            assert sorted(ids(same_label)) == sorted(
                b.image_id for b in photos if b.label == bird.label)
            assert c.get("/count").json() == {"count": len(photos)}
            assert c.get(f"/images/{bird.image_id}/thumbnail").status_code == 200
    finally:
        components.close()


# -- the micro-batcher ------------------------------------------------------------------------


def test_micro_batcher_batches_only_when_queries_overlap(embedder: Any, gallery: Gallery) -> None:
    from query_api.batching import MicroBatcher
    from shared.images import decode_image

    tensors = [embedder.preprocess(decode_image(b.read(), max_pixels=10**8))
               for b in gallery.held_out[:20]]
    alone = embedder.embed(tensors)
    batcher = MicroBatcher(embedder.embed, max_size=6, max_wait_s=0.3)
    batcher.start()
    try:
        async def lone() -> Any:
            batcher.expect()  # announced while "decoding", as the API does
            return await batcher.embed(tensors[0], expected=True)

        single = asyncio.run(lone())
        # Nobody else is on the way: it must not wait out the 300 ms window.
        assert single.batch_size == 1 and single.queue_s < 0.15

        async def together() -> list[Any]:
            for _ in tensors:
                batcher.expect()  # as the API does when a query starts decoding
            return list(await asyncio.gather(*(batcher.embed(t, expected=True) for t in tensors)))

        results = asyncio.run(together())
    finally:
        batcher.stop()
    sizes = [r.batch_size for r in results]
    assert max(sizes) == 6 and all(1 <= s <= 6 for s in sizes)
    for result, reference in zip(results, alone, strict=True):
        assert abs(float(result.vector @ reference) - 1.0) < 1e-4


# -- QUERY_FULL_FRAME_VIEW --------------------------------------------------------------------


def test_full_frame_view_searches_with_both_views_summed(gallery: Gallery, embedder: Any) -> None:
    """Each query is embedded with the model's preprocessing and without its centre crop;
    the search uses their normalised sum (its score against a stored photo says so)."""
    from PIL import Image

    from shared.embedding import merge_views

    bird = gallery.indexed[40]
    with Image.open(bird.path) as opened:
        picture = opened.convert("RGB")
    width, height = picture.size
    copy = picture.crop((round(width * 0.2), round(height * 0.2),
                         round(width * 0.8), round(height * 0.8)))  # a 60% centre crop
    buffer = io.BytesIO()
    copy.save(buffer, format="PNG")
    views = embedder.embed(embedder.preprocess_views(copy, full_frame=True))
    expected = merge_views(views)
    stored = gallery.components.store.get([bird.image_id], with_vector=True)[bird.image_id]
    srv = _serve(gallery, query_full_frame_view=True)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            found = search(c, buffer.getvalue(), limit=5)
    finally:
        srv.stop()
    assert found["hits"][0]["image_id"] == bird.image_id
    assert found["hits"][0]["score"] == pytest.approx(float(expected @ stored.vector), abs=1e-4)
    assert float(views[0] @ views[1]) < 0.999  # two different views, not one twice
