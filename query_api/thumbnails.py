"""Small JPEG previews of stored images, for the web page's result grid.

Bytes come through the ingest side's ImageFetcher, so the same rules apply: file://
only under IMAGE_FILE_ROOTS, http(s) only past the SSRF guard. Other sources (s3://,
inline uploads whose bytes were never kept) have no thumbnail; the page shows a
placeholder for them.

A thumbnail's source can be slow or broken, and a page asks for dozens at once, so
rendering is fenced off from the rest of the service:

* its own threads (``API_THUMBNAIL_WORKERS``), never anyio's shared pool, which the store
  calls of /search, /count and /metrics need;
* at most ``API_THUMBNAIL_QUEUE`` renders waiting or running: past it, 503 at once;
* a deadline (``API_THUMBNAIL_TIMEOUT_S``): 504 for the client, while the render goes on
  and its result is cached for the next request (the fetch has the same deadline, so a
  thread is never held much longer);
* one render per thumbnail at a time: concurrent requests for it wait on the same one;
* a negative cache: a source that failed is answered from memory, with the same error,
  for ``API_THUMBNAIL_FAILURE_TTL_S``, instead of being fetched again and again.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import urllib.parse
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from PIL import Image

from query_api.errors import ApiError
from shared.config import Settings
from shared.errors import ImageError, SourceError
from shared.fetch import ImageFetcher
from shared.images import decode_image

SERVABLE_SCHEMES = ("file", "http", "https")
# Failures are small; this many fit in well under a megabyte.
FAILURE_CACHE_ENTRIES = 4096

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small thread-safe LRU; renders finish on worker threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


ThumbnailCache = LruCache[tuple[str, str, int], bytes]


@dataclass(frozen=True)
class _Failure:
    status: int
    code: str
    message: str
    until: float  # time.monotonic() after which the source is tried again

    def error(self) -> ApiError:
        # A new exception each time: raising one instance again and again would grow its
        # traceback without end.
        return ApiError(self.status, self.code, self.message)


class Thumbnailer:
    """Renders one thumbnail, blocking: fetch, decode at reduced size, shrink, JPEG."""

    def __init__(self, fetcher: ImageFetcher, *, max_pixels: int, cache_size: int = 512) -> None:
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.cache = ThumbnailCache(cache_size)

    @staticmethod
    def check_servable(image_id: str, uri: str | None) -> str:
        """The uri, if the service may read it for a thumbnail; else 404."""
        if not uri:
            raise ApiError(
                404, "thumbnail_unavailable",
                f"image {image_id!r} was uploaded inline; the service keeps no copy of its bytes",
            )
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme not in SERVABLE_SCHEMES:
            raise ApiError(
                404, "thumbnail_unavailable",
                f"thumbnails are served for file:// and http(s):// sources, not {scheme}://",
            )
        return uri

    def render(self, image_id: str, uri: str | None, version: str, size: int) -> bytes:
        """JPEG bytes no larger than size x size. Blocking: call it from a worker thread."""
        uri = self.check_servable(image_id, uri)
        key = (uri, version, size)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        try:
            data = self.fetcher.fetch(uri)
        except SourceError as exc:
            if exc.retriable:
                raise ApiError(502, exc.reason, f"cannot read the image's source: {exc}") from exc
            raise ApiError(404, "thumbnail_unavailable", f"cannot serve the source: {exc}") from exc
        try:
            image = decode_image(data, max_pixels=self.max_pixels, draft_size=(size, size))
        except ImageError as exc:
            raise ApiError(502, "source_undecodable", f"the stored source is not usable: {exc}") from exc
        del data  # the encoded source can be megabytes; the thumbnail needs only the pixels
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85, optimize=True)
        rendered = out.getvalue()
        self.cache.put(key, rendered)
        return rendered


class ThumbnailService:
    """Serves thumbnails from the event loop without ever blocking other endpoints."""

    def __init__(self, thumbnailer: Thumbnailer, *, workers: int, queue: int, timeout_s: float,
                 failure_ttl_s: float, owns_fetcher: bool = False) -> None:
        self.thumbnailer = thumbnailer
        self.queue = queue
        self.timeout_s = timeout_s
        self.failure_ttl_s = failure_ttl_s
        self._owns_fetcher = owns_fetcher
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="thumbnail")
        self._failures: LruCache[tuple[str, str], _Failure] = LruCache(FAILURE_CACHE_ENTRIES)
        self._rendering: dict[tuple[str, str, int], Future[bytes]] = {}
        self._lock = threading.Lock()  # _rendering changes on worker threads too

    @classmethod
    def from_settings(cls, settings: Settings) -> ThumbnailService:
        # Its own fetcher: the fetch deadline is the thumbnail's, not FETCH_TIMEOUT_S.
        fetcher = ImageFetcher.from_settings(
            settings.model_copy(update={"fetch_timeout_s": settings.api_thumbnail_timeout_s}))
        thumbnailer = Thumbnailer(fetcher, max_pixels=settings.image_max_pixels,
                                  cache_size=settings.api_thumbnail_cache_size)
        return cls(thumbnailer, workers=settings.api_thumbnail_workers,
                   queue=settings.api_thumbnail_queue, timeout_s=settings.api_thumbnail_timeout_s,
                   failure_ttl_s=settings.api_thumbnail_failure_ttl_s, owns_fetcher=True)

    @property
    def pending(self) -> int:
        """Renders waiting or running."""
        return len(self._rendering)

    async def render(self, image_id: str, uri: str | None, version: str, size: int) -> bytes:
        uri = Thumbnailer.check_servable(image_id, uri)
        key = (uri, version, size)
        cached = self.thumbnailer.cache.get(key)
        if cached is not None:
            return cached
        failure = self._failures.get((uri, version))
        if failure is not None:
            if time.monotonic() < failure.until:
                raise failure.error()
            self._failures.pop((uri, version))
        future = self._submit(image_id, uri, version, size)
        try:
            # Shielded: the render goes on after a timeout, and others may wait on it.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                          self.timeout_s)
        except TimeoutError:
            raise ApiError(
                504, "thumbnail_timeout",
                f"the thumbnail was not ready within {self.timeout_s:g} s; its source is "
                "slow or the service is busy", headers={"Retry-After": "5"},
            ) from None

    def _submit(self, image_id: str, uri: str, version: str, size: int) -> Future[bytes]:
        key = (uri, version, size)
        with self._lock:
            running = self._rendering.get(key)
            if running is not None:
                return running
            if len(self._rendering) >= self.queue:
                raise ApiError(
                    503, "thumbnails_busy",
                    f"{len(self._rendering)} thumbnails are being rendered already; retry soon",
                    headers={"Retry-After": "2"},
                )
            future = self._pool.submit(self._render, image_id, uri, version, size)
            self._rendering[key] = future
        future.add_done_callback(lambda _f: self._done(key))
        return future

    def _done(self, key: tuple[str, str, int]) -> None:
        with self._lock:
            self._rendering.pop(key, None)

    def _render(self, image_id: str, uri: str, version: str, size: int) -> bytes:
        try:
            return self.thumbnailer.render(image_id, uri, version, size)
        except ApiError as exc:
            if self.failure_ttl_s > 0:
                until = time.monotonic() + self.failure_ttl_s
                self._failures.put((uri, version),
                                   _Failure(exc.status, exc.code, exc.message, until))
            raise

    def close(self) -> None:
        """Stop taking renders; running ones finish in their threads (bounded by the fetch
        deadline), queued ones are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_fetcher:
            self.thumbnailer.fetcher.close()
