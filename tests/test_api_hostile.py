"""Hostile traffic against the API as it runs in production: ``python -m query_api`` in a
subprocess (so its resident memory can be read from /proc), with the real model, a real
embedded store and a real broker.

The corpus: thin and tall images (1x20000, 20000x1, two 8000x1 at once), deeply nested
metadata, ids and metadata that could not be stored, a 64 MiB header, headers and bodies
that trickle, bodies that stop half way or are abandoned, a 1,000-part multipart, more
requests than the service admits at once, and thumbnails of sources that trickle.

Outcomes: hostile input is answered 4xx, never 5xx; requests over the cap get 503
``overloaded`` with Retry-After at once; slow thumbnails answer 504/502/503 within their
deadline without stalling /count or /metrics, and a failing source is fetched once, not on
every request. Throughout, /healthz (polled every 200 ms from a thread, on a new
connection each time, as a kubelet does) answers within 1 s, and the server's resident
memory grows by less than 500 MB.

Only loopback is ever contacted; every loop is bounded in count and time; random data
are seeded. The default tests are a bounded slice; the ``slow`` one repeats the corpus
with more of everything.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.components import Components
from shared.kafka import ensure_topics
from tests.conftest import TansuBroker
from tests.query_api_support import (
    ApiProcess,
    Exchange,
    TrickleServer,
    api_settings,
    bird_rows,
    index,
    pick,
    raw_exchange,
    upload_item,
)

MiB = 1024 * 1024
SEED = 13
HEALTHZ_MAX_S = 1.0
RSS_GROWTH_MAX = 500 * 1000 * 1000
# A thin image must cost what a normal one does (the model's preprocessing cuts its centre
# out before resizing); a normal query takes ~0.1 s here, so this is generous.
THIN_IMAGE_MAX_S = 3.0

# Small limits, so that each hostile case resolves in seconds.
LIMITS: dict[str, Any] = {
    "api_max_upload_bytes": 2 * MiB,
    "api_header_timeout_s": 2.0,
    "api_body_timeout_s": 4.0,
    "api_body_idle_timeout_s": 1.5,
    "api_keepalive_timeout_s": 2.0,
    "api_max_concurrent_requests": 16,
    "api_max_connections": 160,
    "api_thumbnail_workers": 2,
    "api_thumbnail_queue": 6,
    "api_thumbnail_timeout_s": 1.0,
    "api_thumbnail_failure_ttl_s": 300.0,
    "api_decode_workers": 2,
}
# How late an answer may come after the deadline that causes it, on a busy 2-core box.
SLACK_S = 1.5


@dataclass
class Hostile:
    api: ApiProcess
    sources: TrickleServer
    photo: bytes  # a real bird photo (JPEG)
    stored_id: str  # an image in the store
    slow_ids: list[str]  # images whose sources trickle once ``sources.slow`` is set

    @property
    def port(self) -> int:
        return int(self.api.settings.api_port)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, embedder: Any, mobilenet_weights: Path,
            data_dir: Path, birds: Path, broker: TansuBroker) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    photos = pick(bird_rows(birds), train=1, test=0)[:12]
    slow = photos[:4]
    with TrickleServer(birds) as sources:
        settings = api_settings(
            tmp / "store", mobilenet_weights, [data_dir],
            kafka_bootstrap_servers=broker.bootstrap,
            kafka_topic=f"hostile-{uuid.uuid4().hex[:8]}",
            fetch_allowed_networks=["127.0.0.1/32"],  # the trickling sources; nothing else
            **LIMITS,
        )
        ensure_topics(settings, [settings.kafka_topic], partitions=1)
        # Indexed while the sources are fast; they trickle later, for the thumbnails.
        items = [upload_item(b, n) for n, b in enumerate(photos[4:])]
        items += [upload_item(b, 100 + n, uri=f"{sources.url}/{b.image_id}")
                  for n, b in enumerate(slow)]
        components = Components.load(settings, embedder=embedder)
        try:
            index(components, items)
        finally:
            components.close()  # the embedded store admits one process: the API's, next
        api = ApiProcess(settings, tmp / "api.log").start()
        try:
            yield Hostile(api, sources, photos[5].read(), photos[5].image_id,
                          [b.image_id for b in slow])
        finally:
            code = api.stop()
        assert code == 0, f"query_api exited with {code}:\n{api.log_tail()}"


# -- watching the server --------------------------------------------------------------------------


class Watch(threading.Thread):
    """Polls /healthz every ``interval_s`` on a new connection and samples the server's RSS
    until stopped (``max_s`` at most)."""

    def __init__(self, api: ApiProcess, interval_s: float = 0.2, max_s: float = 300.0) -> None:
        super().__init__(name="watch", daemon=True)
        self.api = api
        self.interval_s = interval_s
        self.deadline = time.monotonic() + max_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set() and time.monotonic() < self.deadline:
            started = time.perf_counter()
            try:
                status = httpx.get(f"{self.api.url}/healthz", timeout=5).status_code
                if status != 200:
                    self.failures.append(f"/healthz answered {status}")
            except httpx.HTTPError as exc:
                self.failures.append(f"/healthz failed: {exc!r}")
            elapsed = time.perf_counter() - started
            self.latencies.append(elapsed)
            self.rss.append(self.api.rss_bytes())
            self._done.wait(max(0.0, self.interval_s - elapsed))

    def __enter__(self) -> Watch:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(10)


@dataclass
class Outcome:
    case: str
    status: int | None  # None: closed without an answer
    code: str | None
    elapsed_s: float
    headers: dict[str, str]

    def __str__(self) -> str:
        return f"{self.case}: {self.status} {self.code or ''} after {self.elapsed_s:.2f}s"


def from_exchange(case: str, answer: Exchange) -> Outcome:
    return Outcome(case, answer.status, answer.code, answer.elapsed_s, answer.headers)


def from_response(case: str, response: httpx.Response, elapsed_s: float) -> Outcome:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return Outcome(case, response.status_code, code, elapsed_s, dict(response.headers))


def timed(case: str, call: Callable[[], httpx.Response]) -> Outcome:
    started = time.perf_counter()
    response = call()
    return from_response(case, response, time.perf_counter() - started)


def in_parallel(calls: list[Callable[[], Outcome]]) -> list[Outcome]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def report(outcomes: list[Outcome], watch: Watch, baseline: int) -> str:
    peak = max(watch.rss, default=baseline)
    return (f"healthz: {len(watch.latencies)} polls, max {max(watch.latencies, default=0):.3f}s; "
            f"RSS baseline {baseline / MiB:.0f} MiB, peak +{(peak - baseline) / MiB:.0f} MiB, "
            f"end +{(watch.rss[-1] - baseline) / MiB:.0f} MiB\n"
            + "\n".join(str(o) for o in outcomes))


def assert_held_up(watch: Watch, baseline: int, outcomes: list[Outcome]) -> None:
    summary = report(outcomes, watch, baseline)
    print(summary)  # shown with -s, and on failure
    assert not watch.failures, f"{watch.failures[:5]}\n{summary}"
    assert len(watch.latencies) >= 5, summary
    assert max(watch.latencies) < HEALTHZ_MAX_S, summary
    assert max(watch.rss) - baseline < RSS_GROWTH_MAX, summary


def warm_baseline(h: Hostile) -> int:
    """RSS once every code path the corpus takes has run once with ordinary input."""
    with httpx.Client(base_url=h.api.url, timeout=30) as c:
        for _ in range(3):
            assert c.post("/search", content=h.photo,
                          headers={"content-type": "image/jpeg"}).status_code == 200
        assert c.post("/search", files={"file": ("b.jpg", h.photo, "image/jpeg")}).status_code == 200
        assert c.get(f"/images/{h.stored_id}/thumbnail").status_code == 200
        assert c.get("/metrics").status_code == 200
    return h.api.rss_bytes()


# -- the corpus -----------------------------------------------------------------------------------


def png(width: int, height: int, rng: random.Random) -> bytes:
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostile") -> bytes:
    """A multipart/form-data body from (name, filename or None, content) parts."""
    out = bytearray()
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def bad_input_cases(h: Hostile, c: httpx.Client) -> list[Outcome]:
    """Malformed input, one request each: every answer must be a 4xx."""
    photo = ("b.jpg", h.photo, "image/jpeg")

    def upload(case: str, image_id: str, metadata: str | None = None) -> Outcome:
        data = {"image_id": image_id} if metadata is None else {"image_id": image_id,
                                                                  "metadata": metadata}
        return timed(case, lambda: c.post("/images", files={"file": photo}, data=data))

    out = [
        upload("metadata nested 5,000 objects deep", "hostile/nested",
               '{"a":' * 5000 + "1" + "}" * 5000),
        upload("metadata nested 30,000 lists deep", "hostile/nested", "[" * 30000 + "]" * 30000),
        upload("metadata of 5 MB", "hostile/big", json.dumps({"note": "x" * 5_000_000})),
        upload("metadata string of 40,000 characters", "hostile/big",
               json.dumps({"note": "x" * 40_000})),
        upload("image_id with a newline", "hostile/a\nb"),
        upload("image_id with a NUL", "hostile/a\x00b"),
        upload("image_id of 600 characters", "x" * 600),
        upload("image_id already stored", h.stored_id),
    ]
    thousand = multipart([(f"field{i}", None, b"v") for i in range(1000)] + [("file", "a.jpg", h.photo)])
    files = multipart([("file", f"{i}.jpg", b"\xff\xd8") for i in range(1000)])
    for case, body in (("1,000 text parts", thousand), ("1,000 file parts", files)):
        out.append(timed(case, lambda body=body: c.post(
            "/search", content=body,
            headers={"content-type": "multipart/form-data; boundary=hostile"})))
    huge = [request_head("GET", "/count", {"X-Big": ""})[:-4] + b"a"]
    huge += [b"a" * 65536] * 1024  # 64 MiB, never sent in full: the answer stops the sender
    answer = raw_exchange(h.port, huge, limit_s=20)
    out.append(from_exchange("64 MiB header", answer))
    assert answer.sent < 8 * MiB, f"the server read {answer.sent} header bytes before refusing"
    many = request_head("GET", "/count", {f"X-{i}": "1" for i in range(5000)})
    out.append(from_exchange("5,000 headers", raw_exchange(h.port, [many])))
    out.append(from_exchange("not HTTP (a TLS hello)", raw_exchange(
        h.port, [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)])))
    out.append(from_exchange("negative Content-Length", raw_exchange(h.port, [request_head(
        "POST", "/search", {"Content-Type": "image/png", "Content-Length": "-1"})])))
    out.append(from_exchange("broken chunked body", raw_exchange(h.port, [request_head(
        "POST", "/search", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}),
        b"zz\r\nnot a chunk\r\n"])))
    return out


def slow_client_cases(h: Hostile, n: int) -> list[Callable[[], Outcome]]:
    """Clients that trickle or stop: each must be cut off (408) near its deadline."""
    search = {"Content-Type": "image/jpeg"}

    def slowloris() -> Outcome:
        head = request_head("GET", "/count", {"X-Padding": "p" * 200})
        return from_exchange("slow headers", raw_exchange(
            h.port, [head[i:i + 1] for i in range(len(head))], pause_s=0.3, limit_s=15))

    def slow_body() -> Outcome:
        head = request_head("POST", "/search", {**search, "Content-Length": "50000"})
        return from_exchange("slow body", raw_exchange(
            h.port, [head] + [b"\xff"] * 100, pause_s=0.3, limit_s=15))

    def stalled_body() -> Outcome:
        head = request_head("POST", "/search", {**search, "Content-Length": str(MiB + MiB // 2)})
        return from_exchange("body stops half way", raw_exchange(
            h.port, [head, b"\xff" * MiB], limit_s=15))

    return [slowloris, slow_body, stalled_body] * n


def abandon_bodies(h: Hostile, n: int) -> None:
    """Clients that send half a body and hang up: the server must let go of it."""
    import socket

    head = request_head("POST", "/search", {"Content-Type": "image/jpeg",
                                            "Content-Length": str(2 * MiB - 1)})
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", h.port), timeout=5) as sock:
            sock.sendall(head + b"\xff" * MiB)


def overload_cases(h: Hostile, n: int) -> list[Callable[[], Outcome]]:
    """More slow requests than the cap admits: the excess answered 503 at once."""

    def held() -> Outcome:
        head = request_head("POST", "/search", {"Content-Type": "image/jpeg",
                                                "Content-Length": "50000"})
        return from_exchange("over the request cap", raw_exchange(
            h.port, [head] + [b"\xff"] * 40, pause_s=0.1, limit_s=15))

    return [held] * n


# -- the tests ------------------------------------------------------------------------------------


def run_corpus(h: Hostile, scale: int) -> tuple[list[Outcome], list[Outcome], list[Outcome]]:
    """The corpus, ``scale`` times as many slow clients: (4xx-only, overload, thumbnails)."""
    hostile: list[Outcome] = []
    with httpx.Client(base_url=h.api.url, timeout=30) as c:
        hostile += bad_input_cases(h, c)
        # Slow and stalled clients, with ordinary searches going on beside them.
        searches = [lambda: timed("search beside slow clients", lambda: c.post(
            "/search", content=h.photo, headers={"content-type": "image/jpeg"}))] * 4
        hostile += in_parallel(slow_client_cases(h, 2 * scale) + searches)
        abandon_bodies(h, 4 * scale)
        cap = int(LIMITS["api_max_concurrent_requests"])

        def probe_while_full(path: str) -> Callable[[], Outcome]:
            def call() -> Outcome:
                time.sleep(0.5)  # the held requests have filled the cap by then
                return timed(f"GET {path} while the cap is full", lambda: c.get(path))
            return call

        overload = in_parallel(overload_cases(h, cap * 2)
                               + [probe_while_full(p) for p in ("/readyz", "/metrics")])
        thumbnails = slow_thumbnails(h, c)
    return hostile, overload, thumbnails


def slow_thumbnails(h: Hostile, c: httpx.Client) -> list[Outcome]:
    """Thumbnails of trickling sources, while /count and /metrics must stay quick."""
    before = dict(h.sources.hits)  # the fetches that indexed them
    h.sources.slow = True
    try:
        thumbs = [lambda i=i, s=s: timed("slow thumbnail", lambda: c.get(
            f"/images/{h.slow_ids[i]}/thumbnail", params={"size": s}))
            for i in range(len(h.slow_ids)) for s in (128, 256, 256)]
        others = [lambda p=p: timed(f"GET {p} beside slow thumbnails", lambda: c.get(p))
                  for p in ("/count", "/metrics") * 3]
        first = in_parallel(thumbs + others)
        # Renders go on after the 504 (their result is kept); once they have ended, a source
        # that failed is answered from memory and not fetched again.
        h.sources.wait_idle()
        fetches = {p: n - before.get(p, 0) for p, n in h.sources.hits.items()}
        fetched = [i for i in h.slow_ids if any(p.endswith(i) and n for p, n in fetches.items())]
        again = [timed("slow thumbnail, again", lambda i=i: c.get(
            f"/images/{i}/thumbnail", params={"size": 128})) for i in fetched]
    finally:
        h.sources.slow = False
    # Each source asked for in two sizes, many times: at most one fetch per size.
    assert all(n <= 2 for n in fetches.values()), fetches
    return first + again


def check_outcomes(hostile: list[Outcome], overload: list[Outcome],
                   thumbnails: list[Outcome]) -> None:
    for o in hostile:
        if o.case.startswith("search beside"):
            assert o.status == 200, str(o)
        else:
            assert o.status is not None and 400 <= o.status < 500, str(o)
    by_case = {o.case: o for o in hostile}
    assert by_case["64 MiB header"].status == 431
    assert by_case["metadata nested 5,000 objects deep"].code == "invalid_metadata"
    assert by_case["image_id with a newline"].code == "invalid_image_id"
    assert by_case["image_id already stored"].code == "image_exists"
    deadlines = {"slow headers": ("header_timeout", LIMITS["api_header_timeout_s"]),
                 "slow body": ("body_timeout", LIMITS["api_body_timeout_s"]),
                 "body stops half way": ("body_timeout", LIMITS["api_body_idle_timeout_s"])}
    for o in hostile:
        if o.case in deadlines:
            code, deadline = deadlines[o.case]
            assert o.status == 408 and o.code == code, str(o)
            assert o.elapsed_s < deadline + SLACK_S + 2.5, str(o)  # 2.5: the lingering close

    probes = [o for o in overload if "while the cap is full" in o.case]
    held = [o for o in overload if o not in probes]
    assert len(probes) == 2 and all(o.status == 200 and o.elapsed_s < HEALTHZ_MAX_S
                                    for o in probes), "\n".join(map(str, probes))
    refused = [o for o in held if o.status == 503]
    assert len(refused) >= len(held) // 2 - 2, "\n".join(map(str, held))
    for o in held:
        assert o.status in (408, 503), str(o)
        if o.status == 503:
            assert o.code == "overloaded" and o.headers.get("retry-after") == "1", str(o)
            assert o.elapsed_s < SLACK_S, str(o)

    timeout_s = LIMITS["api_thumbnail_timeout_s"]
    assert any(o.case.endswith("again") for o in thumbnails), "no thumbnail source was fetched"
    for o in thumbnails:
        if "beside" in o.case:
            assert o.status == 200 and o.elapsed_s < HEALTHZ_MAX_S, str(o)
        elif o.case.endswith("again"):
            assert o.status in (502, 504) and o.elapsed_s < 0.5, str(o)
        else:
            assert (o.status, o.code) in {(504, "thumbnail_timeout"), (502, "fetch_timeout"),
                                          (503, "thumbnails_busy")}, str(o)
            assert o.elapsed_s < timeout_s + SLACK_S, str(o)


def test_hostile_corpus_is_answered_4xx_and_the_service_holds(hostile: Hostile) -> None:
    baseline = warm_baseline(hostile)
    with Watch(hostile.api) as watch:
        hostile_outcomes, overload, thumbnails = run_corpus(hostile, scale=1)
        time.sleep(1.0)  # a last few polls and samples after the storm
    assert_held_up(watch, baseline, hostile_outcomes + overload + thumbnails)
    check_outcomes(hostile_outcomes, overload, thumbnails)


def test_thin_and_tall_images_cost_what_normal_ones_do(hostile: Hostile) -> None:
    rng = random.Random(SEED)
    tall, wide, strip = png(1, 20000, rng), png(20000, 1, rng), png(8000, 1, rng)
    baseline = warm_baseline(hostile)
    with Watch(hostile.api) as watch, httpx.Client(base_url=hostile.api.url, timeout=120) as c:
        def search(case: str, data: bytes) -> Callable[[], Outcome]:
            return lambda: timed(case, lambda: c.post("/search", content=data,
                                                      headers={"content-type": "image/png"}))

        outcomes: list[Outcome] = []
        for _ in range(3):
            outcomes += [search("1x20000 PNG", tall)(), search("20000x1 PNG", wide)()]
            outcomes += in_parallel([search("8000x1 PNG, two at once", strip)] * 2)
            time.sleep(0.4)
    assert_held_up(watch, baseline, outcomes)
    for o in outcomes:
        assert o.status == 200, str(o)
        assert o.elapsed_s < THIN_IMAGE_MAX_S, str(o)


def test_overwrites_need_replace_true(hostile: Hostile) -> None:
    photo = ("b.jpg", hostile.photo, "image/jpeg")
    with httpx.Client(base_url=hostile.api.url, timeout=60) as c:
        refused = c.post("/images", files={"file": photo}, data={"image_id": hostile.stored_id})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "image_exists"
        replaced = c.post("/images", params={"replace": "true"}, files={"file": photo},
                          data={"image_id": hostile.stored_id})
        assert replaced.status_code == 202, replaced.text
        fresh = c.post("/images", files={"file": photo}, data={"image_id": "hostile/new-1"})
        assert fresh.status_code == 202, fresh.text


def test_connection_deadlines_and_cap(hostile: Hostile) -> None:
    """What the protocol subclass adds to uvicorn (query_api/protocol.py leans on uvicorn
    internals: an upgrade that changes them fails here)."""
    import socket

    header_s = LIMITS["api_header_timeout_s"]
    # A kept-alive connection whose next request trickles in: 408 once its headers are late.
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=15) as sock:
        sock.sendall(request_head("GET", "/healthz", {}))
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the whole first answer
            part = sock.recv(65536)
            assert part, first
            first += part
        assert first.startswith(b"HTTP/1.1 200"), first
        started = time.monotonic()
        answer = b""
        for byte in request_head("GET", "/count", {"X-Padding": "p" * 100}):
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - started > header_s + SLACK_S + 2:
                break
            sock.setblocking(False)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"header_timeout"' in answer
        assert time.monotonic() - started < header_s + SLACK_S
    # A connection that never sends anything is closed, silently, at the same deadline.
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=15) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert header_s - 0.2 < time.monotonic() - started < header_s + SLACK_S
    # Past the connection cap, requests get the API's JSON 503; probes are still answered.
    cap = int(LIMITS["api_max_connections"])
    idle = [socket.create_connection(("127.0.0.1", hostile.port), timeout=5) for _ in range(cap)]
    try:
        refused = httpx.get(f"{hostile.api.url}/count", timeout=5)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(f"{hostile.api.url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(f"{hostile.api.url}/count", timeout=5).status_code == 200


@pytest.mark.slow
def test_hostile_corpus_soak(hostile: Hostile) -> None:
    """Three rounds of the corpus with four times the slow clients (under a minute)."""
    baseline = warm_baseline(hostile)
    outcomes: list[Outcome] = []
    with Watch(hostile.api, max_s=240) as watch:
        for _ in range(3):
            hostile_outcomes, overload, _thumbnails = run_corpus(hostile, scale=4)
            outcomes += hostile_outcomes + overload
            for o in hostile_outcomes:  # more slow clients than the cap: some are refused
                assert o.status is not None and (o.status < 500 or o.code == "overloaded"), str(o)
            for o in overload:
                assert o.status in (200, 408, 503), str(o)
        time.sleep(1.0)
    assert_held_up(watch, baseline, outcomes)
