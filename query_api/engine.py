"""The API's side of the one query path (shared/query.py): each step runs where it
should. Decoding and preprocessing run in a thread pool, detection and the forward pass
in micro-batchers shared by concurrent queries (query_api/batching.py), store searches
off the event loop.

With a detector, a query is cropped the way the gallery was (``crop``: largest, all or
none; the ingest setting by default). ``all`` embeds the whole image and each detected
object; their searches are merged, each image keeping its best score.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread
import numpy as np
from PIL import Image

from query_api import metrics
from query_api.batching import MicroBatcher
from query_api.errors import ApiError
from query_api.params import SearchParams
from shared.config import Settings
from shared.detection import Crop, Cropper
from shared.embedding import Embedder
from shared.images import Decoded, decode_image
from shared.query import QueryCrop, QueryEmbedder
from shared.query import search as search_store
from shared.store.base import Hit, VectorStore

__all__ = ["QueryCrop", "QueryEngine", "QueryVector"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryVector:
    """A query image's vectors: one per crop (the whole image unless cropped)."""

    vectors: list[np.ndarray]
    crops: list[dict[str, Any]]  # Crop.payload() of each vector's crop
    decode_s: float  # decode and preprocess
    queue_s: float
    embed_s: float
    batch_size: int
    detect_s: float | None = None

    @property
    def vector(self) -> np.ndarray:
        return self.vectors[0]


class QueryEngine:
    def __init__(self, embedder: Embedder, store: VectorStore, settings: Settings,
                 cropper: Cropper | None = None) -> None:
        self.embedder = embedder
        self.store = store
        self.cropper = cropper or Cropper(None)
        self.query = QueryEmbedder.from_settings(settings, embedder, self.cropper)
        self.default_crop: QueryCrop = self.query.default_crop
        self.full_frame_view = self.query.full_frame
        self.max_pixels = settings.image_max_pixels
        self.warmup_enabled = settings.api_warmup
        self._decode_pool = ThreadPoolExecutor(
            settings.api_decode_workers, thread_name_prefix="query-decode"
        )
        self.batcher = MicroBatcher(
            embedder.embed,
            max_size=settings.api_batch_max_size,
            max_wait_s=settings.api_batch_max_wait_ms / 1000.0,
            enabled=settings.api_batching,
            on_batch=metrics.observe_batch,
        )
        self.detect_batcher = MicroBatcher(
            self.query.crops,
            max_size=settings.api_batch_max_size,
            max_wait_s=settings.api_batch_max_wait_ms / 1000.0,
            enabled=settings.api_batching,
            on_batch=metrics.observe_detect_batch,
            name="detect",
        ) if self.cropper.detects else None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.warmup_enabled:
            self.warm_up()
        self.batcher.start()
        if self.detect_batcher is not None:
            self.detect_batcher.start()

    def close(self) -> None:
        if self.detect_batcher is not None:
            self.detect_batcher.stop()
        self.batcher.stop()
        self._decode_pool.shutdown(wait=True)

    def warm_up(self) -> None:
        """Run every batch size the batcher can form once: the first forward pass of a
        shape pays for kernel selection, which a user's query should not."""
        started = time.perf_counter()
        sample = io.BytesIO()
        Image.new("RGB", (320, 240), (120, 160, 90)).save(sample, format="JPEG")
        decoded = self.query.decode(sample.getvalue())  # first-use costs of the decoder
        [crops] = self.query.crops([(decoded, "none")])
        view = self.query.views(crops)[0]  # ... and of the preprocessing
        if self.cropper.detects:
            self.query.crops([(decoded, "all")])  # and the detector's first pass
        sizes = sorted({*range(1, min(self.batcher.max_size, 16) + 1), self.batcher.max_size})
        for size in sizes:
            self.embedder.embed(np.repeat(view[None], size, axis=0))
        log.info("warmed up batch sizes %s..%s in %.1fs", sizes[0], sizes[-1],
                 time.perf_counter() - started)

    # -- queries -----------------------------------------------------------------------------

    async def embed_image(self, data: bytes, crop: QueryCrop = "none") -> QueryVector:
        """Embed a query image, cropped as ``crop`` says (it needs a detector unless none)."""
        detecting = crop != "none"
        if detecting and self.detect_batcher is None:
            raise ApiError(
                422, "crop_unavailable",
                f"crop={crop} needs an object detector, and this service runs without one "
                "(DETECTOR=none); use crop=none or set DETECTOR=yolov5",
            )
        loop = asyncio.get_running_loop()
        self.batcher.expect()
        if self.detect_batcher is not None and detecting:
            self.detect_batcher.expect()
        started = time.perf_counter()
        detect_s = None
        crops: list[Crop]
        if not detecting:  # decode and preprocess in one trip to the pool
            try:
                crops, inputs = await loop.run_in_executor(self._decode_pool, self._whole, data)
            except BaseException:
                self.batcher.withdraw()
                raise
            decode_s = time.perf_counter() - started
        else:
            assert self.detect_batcher is not None
            try:
                decoded: Decoded = await loop.run_in_executor(
                    self._decode_pool, self.query.decode, data, crop)
            except BaseException:
                self.batcher.withdraw()
                self.detect_batcher.withdraw()
                raise
            decode_s = time.perf_counter() - started
            started = time.perf_counter()
            try:
                found = await self.detect_batcher.embed((decoded, crop), expected=True)
            except BaseException:
                self.batcher.withdraw()
                raise
            crops = found.vector
            detect_s = time.perf_counter() - started
            started = time.perf_counter()
            try:
                inputs = await loop.run_in_executor(self._decode_pool, self.query.views, crops)
            except BaseException:
                self.batcher.withdraw()
                raise
            decode_s += time.perf_counter() - started
        for _ in inputs[1:]:
            self.batcher.expect()  # the other crops arrive at once: one forward pass for all
        results = await asyncio.gather(
            *(self.batcher.embed(t, expected=True) for t in inputs))
        vectors = self.query.merge([r.vector for r in results])
        return QueryVector(
            vectors, [c.payload() for c in crops], decode_s,
            max(r.queue_s for r in results), max(r.embed_s for r in results),
            max(r.batch_size for r in results), detect_s,
        )

    def _whole(self, data: bytes) -> tuple[list[Crop], list[np.ndarray]]:
        """An uncropped query's crop (the whole image) and its model inputs."""
        [crops] = self.query.crops([(self.query.decode(data, "none"), "none")])
        return crops, self.query.views(crops)

    async def check_image(self, data: bytes) -> None:
        """Raise ImageError unless the bytes decode within the pixel limit."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._decode_pool, partial(decode_image, data, max_pixels=self.max_pixels)
        )

    async def stored_vector(self, image_id: str) -> np.ndarray:
        found = await anyio.to_thread.run_sync(
            partial(self.store.get, [image_id], with_vector=True)
        )
        stored = found.get(image_id)
        if stored is None:
            raise ApiError(404, "image_not_found", f"no stored image has id {image_id!r}")
        if stored.vector is None:
            raise ApiError(500, "vector_missing", f"the store returned no vector for {image_id!r}")
        return stored.vector

    async def search(
        self, vector: np.ndarray | Sequence[np.ndarray], params: SearchParams, *,
        exclude: Sequence[str] = (),
    ) -> tuple[list[Hit], float]:
        """Search with one vector, or with several (a query's crops) merged: each image
        keeps the best score any of them gave it."""
        started = time.perf_counter()
        if params.contradictory:
            return [], 0.0
        found = await anyio.to_thread.run_sync(partial(
            search_store, self.store, vector, limit=params.limit, offset=params.offset,
            score_threshold=params.score_threshold, filters=params.filters or None,
            exclude=exclude))
        elapsed = time.perf_counter() - started
        metrics.SEARCH_SECONDS.observe(elapsed)
        return found, elapsed
