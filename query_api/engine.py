"""The query path: decode and preprocess in a thread pool, embed through the
micro-batcher, search the store off the event loop.

With a detector, a query is cropped the way the gallery was (``crop``: largest, all or
none; the ingest setting by default). Detection has a micro-batcher of its own, so
concurrent queries share the detector's forward passes as they share the model's.
``all`` embeds the whole image and each detected object; their searches are merged, each
image keeping its best score.
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
from typing import Any, Literal

import anyio.to_thread
import numpy as np
import torch
from PIL import Image

from query_api import metrics
from query_api.batching import MicroBatcher
from query_api.errors import ApiError
from query_api.params import SearchParams
from shared.config import Settings
from shared.detection import Crop, Cropper, shrink_for_detection, whole_box
from shared.embedding import Embedder, merge_views
from shared.images import decode_image
from shared.store.base import Hit, VectorStore, best_per_image

QueryCrop = Literal["none", "largest", "all"]

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
        # Queries are treated as the gallery was: the ingest workers' CROP_MODE by default.
        self.default_crop: QueryCrop = settings.crop_mode if self.cropper.detects else "none"
        self.full_frame_view = settings.query_full_frame_view
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
            self._detect_batch,
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
        image = self._decode(sample.getvalue())  # first-use costs of the decoder, transforms
        self._preprocess([Crop(whole_box(image.size), image=image)])
        if self.cropper.detects:
            self._detect_batch([(image, image.size, "all")])  # and the detector's first pass
        _, height, width = self.embedder.data_config["input_size"]
        sizes = sorted({*range(1, min(self.batcher.max_size, 16) + 1), self.batcher.max_size})
        for size in sizes:
            self.embedder.embed(torch.zeros(size, 3, height, width))
        log.info("warmed up batch sizes %s..%s in %.1fs", sizes[0], sizes[-1],
                 time.perf_counter() - started)

    # -- queries -----------------------------------------------------------------------------

    def _decode(self, data: bytes) -> Image.Image:
        # The same decode, detector and preprocessing as ingest (shared/pipeline.py).
        return decode_image(data, max_pixels=self.max_pixels)

    def _preprocess(self, crops: Sequence[Crop]) -> list[torch.Tensor]:
        """Each crop's input tensors: one per view (QUERY_FULL_FRAME_VIEW adds a second)."""
        return [t for c in crops for t in self.embedder.preprocess_views(
            c.image, full_frame=self.full_frame_view)]  # type: ignore[arg-type]

    def _detect_batch(self, items: Sequence[tuple[Image.Image, tuple[int, int], QueryCrop]]
                      ) -> list[list[Crop]]:
        """Crops of several queries' images (decoded, full size), in one detector pass.

        Runs on the detect batcher's thread, so shrinking large photos stays off the
        event loop.
        """
        images, sizes, modes = zip(*items, strict=True)
        return self.cropper.crops_for([shrink_for_detection(i) for i in images], sizes,
                                      modes)  # type: ignore[arg-type]

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
        try:
            image = await loop.run_in_executor(self._decode_pool, self._decode, data)
        except BaseException:
            self.batcher.withdraw()
            if self.detect_batcher is not None and detecting:
                self.detect_batcher.withdraw()
            raise
        decode_s = time.perf_counter() - started
        detect_s = None
        if self.detect_batcher is not None and detecting:
            started = time.perf_counter()
            try:
                found = await self.detect_batcher.embed((image, image.size, crop),
                                                        expected=True)
            except BaseException:
                self.batcher.withdraw()
                raise
            crops: list[Crop] = found.vector
            detect_s = time.perf_counter() - started
        else:
            crops = [Crop(whole_box(image.size), image=image)]
        started = time.perf_counter()
        try:
            tensors = await loop.run_in_executor(self._decode_pool, self._preprocess, crops)
        except BaseException:
            self.batcher.withdraw()
            raise
        decode_s += time.perf_counter() - started
        for _ in tensors[1:]:
            self.batcher.expect()  # the other crops arrive at once: one forward pass for all
        results = await asyncio.gather(
            *(self.batcher.embed(t, expected=True) for t in tensors))
        views = len(tensors) // len(crops)
        vectors = [r.vector for r in results]
        if views > 1:  # QUERY_FULL_FRAME_VIEW: one vector per crop from its views
            vectors = [merge_views(np.stack(vectors[i:i + views]))
                       for i in range(0, len(vectors), views)]
        return QueryVector(
            vectors, [c.payload() for c in crops], decode_s,
            max(r.queue_s for r in results), max(r.embed_s for r in results),
            max(r.batch_size for r in results), detect_s,
        )

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
        vectors = [vector] if isinstance(vector, np.ndarray) else list(vector)
        if len(vectors) == 1:
            window = {"limit": params.limit, "offset": params.offset}
        else:  # every page of the merge needs each search's whole prefix
            window = {"limit": params.offset + params.limit, "offset": 0}
        found: list[Hit] = []
        for v in vectors:
            found += await anyio.to_thread.run_sync(
                partial(
                    self.store.search,
                    v,
                    score_threshold=params.score_threshold,
                    filters=params.filters or None,
                    exclude_image_ids=exclude,
                    **window,
                )
            )
        if len(vectors) > 1:
            found = best_per_image(found)[params.offset : params.offset + params.limit]
        elapsed = time.perf_counter() - started
        metrics.SEARCH_SECONDS.observe(elapsed)
        return found, elapsed
