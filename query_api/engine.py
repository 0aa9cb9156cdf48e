"""The query path: decode and preprocess in a thread pool, embed through the
micro-batcher, search the store off the event loop."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import anyio.to_thread
import numpy as np
import torch
from PIL import Image

from query_api import metrics
from query_api.batching import MicroBatcher
from query_api.errors import ApiError
from query_api.params import SearchParams
from shared.config import Settings
from shared.embedding import Embedder
from shared.images import decode_image
from shared.store.base import Hit, VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryVector:
    vector: np.ndarray
    decode_s: float
    queue_s: float
    embed_s: float
    batch_size: int


class QueryEngine:
    def __init__(self, embedder: Embedder, store: VectorStore, settings: Settings) -> None:
        self.embedder = embedder
        self.store = store
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

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.warmup_enabled:
            self.warm_up()
        self.batcher.start()

    def close(self) -> None:
        self.batcher.stop()
        self._decode_pool.shutdown(wait=True)

    def warm_up(self) -> None:
        """Run every batch size the batcher can form once: the first forward pass of a
        shape pays for kernel selection, which a user's query should not."""
        started = time.perf_counter()
        sample = io.BytesIO()
        Image.new("RGB", (320, 240), (120, 160, 90)).save(sample, format="JPEG")
        self._prepare(sample.getvalue())  # first-use costs of the decoder and transforms
        _, height, width = self.embedder.data_config["input_size"]
        sizes = sorted({*range(1, min(self.batcher.max_size, 16) + 1), self.batcher.max_size})
        for size in sizes:
            self.embedder.embed(torch.zeros(size, 3, height, width))
        log.info("warmed up batch sizes %s..%s in %.1fs", sizes[0], sizes[-1],
                 time.perf_counter() - started)

    # -- queries -----------------------------------------------------------------------------

    def _prepare(self, data: bytes) -> torch.Tensor:
        # The same decode and preprocessing as ingest (shared/images.py, Embedder.preprocess).
        return self.embedder.preprocess(decode_image(data, max_pixels=self.max_pixels))

    async def embed_image(self, data: bytes) -> QueryVector:
        loop = asyncio.get_running_loop()
        self.batcher.expect()
        started = time.perf_counter()
        try:
            tensor = await loop.run_in_executor(self._decode_pool, self._prepare, data)
        except BaseException:
            self.batcher.withdraw()
            raise
        decode_s = time.perf_counter() - started
        result = await self.batcher.embed(tensor, expected=True)
        return QueryVector(result.vector, decode_s, result.queue_s, result.embed_s,
                           result.batch_size)

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
        self, vector: np.ndarray, params: SearchParams, *, exclude: Sequence[str] = ()
    ) -> tuple[list[Hit], float]:
        started = time.perf_counter()
        if params.contradictory:
            return [], 0.0
        hits = await anyio.to_thread.run_sync(
            partial(
                self.store.search,
                vector,
                limit=params.limit,
                offset=params.offset,
                score_threshold=params.score_threshold,
                filters=params.filters or None,
                exclude_image_ids=exclude,
            )
        )
        elapsed = time.perf_counter() - started
        metrics.SEARCH_SECONDS.observe(elapsed)
        return hits, elapsed
