"""Small JPEG previews of stored images, for the web page's result grid.

Bytes come through the ingest side's ImageFetcher, so the same rules apply: file://
only under IMAGE_FILE_ROOTS, http(s) only past the SSRF guard. Other sources (s3://,
inline uploads whose bytes were never kept) have no thumbnail; the page shows a
placeholder for them.
"""

from __future__ import annotations

import io
import threading
import urllib.parse
from collections import OrderedDict

from PIL import Image

from query_api.errors import ApiError
from shared.errors import ImageError, SourceError
from shared.fetch import ImageFetcher
from shared.images import decode_image

SERVABLE_SCHEMES = ("file", "http", "https")


class ThumbnailCache:
    """A small thread-safe LRU of rendered thumbnails."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str, int], value: bytes) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class Thumbnailer:
    def __init__(self, fetcher: ImageFetcher, *, max_pixels: int, cache_size: int = 512) -> None:
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.cache = ThumbnailCache(cache_size)

    def render(self, image_id: str, uri: str | None, version: str, size: int) -> bytes:
        """JPEG bytes no larger than size x size. Blocking: call it from a worker thread."""
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
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85, optimize=True)
        rendered = out.getvalue()
        self.cache.put(key, rendered)
        return rendered
