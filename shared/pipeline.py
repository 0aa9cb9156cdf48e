"""The one ingest pipeline: fetch, decode, (detect,) embed, upsert.

The Kafka worker and the batch tools (``imgsearch index``, ``imgsearch eval``) hand it
batches of events; it returns what happened to each one. Per-event failures (a bad URI,
an undecodable image) are reported, never raised, so one poison pill does not fail the
other events of its batch. A store failure is raised for the whole batch, because
nothing of it may be committed as done.

With a detector (DETECTOR=yolov5), the decoded image waits for the embed stage, which
finds the objects of a whole batch in one forward pass on the model's device, cuts the
crops from the same decoded pixels and embeds them: CROP_MODE=largest stores one point
per image (its largest object, or the whole image), CROP_MODE=all stores the whole image
plus one box point per object (shared/store/base.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import torch
from PIL import Image

from shared.detection import Crop, Cropper, shrink_for_detection, whole_box
from shared.embedding import Embedder
from shared.errors import ImgSearchError
from shared.events import Event, ImageDeleted, ImageUploaded
from shared.fetch import ImageFetcher
from shared.images import decode_image, sha256_hex
from shared.store.base import PARENT_FIELD, PointRecord, StoredImage, VectorStore

log = logging.getLogger(__name__)

Outcome = Literal["stored", "deleted", "unchanged", "failed"]
# "detect" covers finding the objects and cutting and preprocessing their crops.
STAGES = ("fetch", "decode", "detect", "embed", "upsert")


@dataclass(frozen=True)
class WorkItem:
    key: Hashable  # the caller's handle: (topic, partition, offset), a path, ...
    event: Event


@dataclass
class ItemResult:
    item: WorkItem
    outcome: Outcome
    error: ImgSearchError | None = None


@dataclass
class BatchReport:
    results: list[ItemResult]
    # Busy seconds per stage; fetch and decode are summed over the worker threads.
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall_seconds: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def failures(self) -> list[ItemResult]:
        return [r for r in self.results if r.outcome == "failed"]

    def summary(self) -> str:
        stages = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.stage_seconds.items())
        return (
            f"n={len(self.results)} stored={self.count('stored')} deleted={self.count('deleted')} "
            f"unchanged={self.count('unchanged')} failed={self.count('failed')} "
            f"wall={self.wall_seconds * 1000:.0f}ms {stages}"
        )


@dataclass
class Prepared:
    """An upload after fetch and decode: ready for the model, unless already stored."""

    sha256: str
    fetch_s: float
    decode_s: float
    size: tuple[int, int] = (0, 0)  # the decoded original's (width, height)
    tensor: torch.Tensor | None = None  # preprocessed whole image (no detector)
    image: Image.Image | None = None  # decoded pixels for the detector, until embed()
    records: list[PointRecord] = field(default_factory=list)  # set by embed()

    @property
    def unchanged(self) -> bool:
        """The store already holds exactly this upload: nothing to embed or write."""
        return self.tensor is None and self.image is None and not self.records


class IngestPipeline:
    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        fetcher: ImageFetcher,
        *,
        max_pixels: int,
        decode_workers: int = 2,
        embed_batch_size: int = 32,
        fetch_retries: int = 3,
        skip_unchanged: bool = True,
        cropper: Cropper | None = None,
    ) -> None:
        self.embedder = embedder
        self.cropper = cropper or Cropper(None)
        self.store = store
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.embed_batch_size = embed_batch_size
        self.fetch_retries = fetch_retries
        self.skip_unchanged = skip_unchanged
        self._pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this pipeline runs (no "detect" without a detector)."""
        return STAGES if self.cropper.detects else tuple(s for s in STAGES if s != "detect")

    # -- stages ------------------------------------------------------------------------------

    def _fetch(self, event: ImageUploaded) -> bytes:
        if event.image_bytes is not None:
            return event.image_bytes
        assert event.uri is not None
        attempt = 0
        while True:
            try:
                return self.fetcher.fetch(event.uri)
            except ImgSearchError as exc:
                if not exc.retriable or attempt >= self.fetch_retries:
                    raise
                delay = min(8.0, 0.25 * 2**attempt) * (0.5 + random.random())
                log.info("retrying fetch of %s in %.2fs: %s", event.uri, delay, exc)
                time.sleep(delay)
                attempt += 1

    def existing(self, image_id: str) -> StoredImage | None:
        """What the store holds for an image, to skip re-embedding identical uploads.

        A store that cannot answer just means no skipping: the write that follows
        will wait for the store anyway.
        """
        if not self.skip_unchanged:
            return None
        try:
            return self.store.get([image_id]).get(image_id)
        except ImgSearchError as exc:
            log.debug("cannot look up %s before ingest (%s); embedding it", image_id, exc)
            return None

    def prepare(self, event: ImageUploaded, existing: StoredImage | None) -> Prepared:
        """Stage 1: fetch, hash, decode, preprocess. Raises ImgSearchError for a bad event."""
        t0 = time.perf_counter()
        data = self._fetch(event)
        t1 = time.perf_counter()
        digest = sha256_hex(data)
        if existing is not None and self.is_unchanged(event, digest, existing.payload):
            return Prepared(digest, t1 - t0, 0.0)
        image = decode_image(data, max_pixels=self.max_pixels)
        if self.cropper.detects:
            prepared = Prepared(digest, t1 - t0, 0.0, image.size,
                                image=shrink_for_detection(image))
        else:
            prepared = Prepared(digest, t1 - t0, 0.0, image.size,
                                tensor=self.embedder.preprocess(image))
        prepared.decode_s = time.perf_counter() - t1
        return prepared

    def embed(self, batch: Sequence[tuple[ImageUploaded, Prepared]]) -> dict[str, float]:
        """Stage 2: detect (with a detector) and embed, in chunks of embed_batch_size
        images; sets each Prepared's ``records``. Returns busy seconds per stage."""
        busy = {"detect": 0.0, "embed": 0.0}
        for i in range(0, len(batch), self.embed_batch_size):
            chunk = batch[i : i + self.embed_batch_size]
            if not self.cropper.detects:
                started = time.perf_counter()
                vectors = self.embedder.embed([p.tensor for _, p in chunk])  # type: ignore[misc]
                busy["embed"] += time.perf_counter() - started
                for (event, prep), vector in zip(chunk, vectors, strict=True):
                    prep.records = [self._record(event, prep, Crop(whole_box(prep.size)),
                                                 vector, 0, 0)]
                    prep.tensor = None
                continue
            started = time.perf_counter()
            crops = self.cropper.crops_for([p.image for _, p in chunk],  # type: ignore[misc]
                                           [p.size for _, p in chunk])
            flat = [c for per_image in crops for c in per_image]
            # Preprocessing is CPU work per crop: spread it over the decode pool.
            tensors = list(self._pool.map(self.embedder.preprocess, [c.image for c in flat]))
            busy["detect"] += time.perf_counter() - started
            started = time.perf_counter()
            crop_vectors = [v for j in range(0, len(tensors), self.embed_batch_size)
                            for v in self.embedder.embed(tensors[j : j + self.embed_batch_size])]
            busy["embed"] += time.perf_counter() - started
            at = 0
            for (event, prep), per_image in zip(chunk, crops, strict=True):
                boxes = len(per_image) - 1 if self.cropper.mode == "all" else 0
                prep.records = [self._record(event, prep, c, crop_vectors[at + k], k, boxes)
                                for k, c in enumerate(per_image)]
                at += len(per_image)
                prep.image = None  # the pixels are not needed any more
        return busy

    def write(self, records: Sequence[PointRecord], deletes: Sequence[str]) -> None:
        """Stage 3: durable upserts and deletes. StoreError propagates: nothing is done."""
        self.store.upsert(records)
        self.store.delete(deletes)

    def is_unchanged(self, event: ImageUploaded, digest: str, payload: dict[str, Any]) -> bool:
        """True when the store already holds exactly this upload (bytes, uri, metadata, model)."""
        return (
            payload.get("sha256") == digest
            and payload.get("uri") == event.uri
            and payload.get("metadata") == event.metadata
            and payload.get("model") == self.embedder.info.name
            and payload.get("detector") == self.cropper.signature
        )

    def _record(self, event: ImageUploaded, prep: Prepared, crop: Crop, vector: Any,
                index: int, boxes: int) -> PointRecord:
        """The point of an image (index 0) or of its index-th detected object."""
        payload: dict[str, Any] = {
            "image_id": event.image_id,
            "uri": event.uri,  # never the inline bytes
            "metadata": event.metadata,
            "model": self.embedder.info.name,
            "sha256": prep.sha256,
            "event_id": event.event_id,
            "ingested_at": datetime.now(timezone.utc).isoformat(),
            "size": list(prep.size),
            "crop": crop.payload(),
        }
        if self.cropper.signature is not None:
            payload["detector"] = self.cropper.signature
        if index == 0:
            payload["box_points"] = boxes
        else:
            payload[PARENT_FIELD] = event.image_id
        return PointRecord(event.image_id, vector, payload, crop_index=index)

    # -- a batch -----------------------------------------------------------------------------

    def process(self, items: Sequence[WorkItem]) -> BatchReport:
        """Run one batch through every stage, synchronously (batch tools, tests)."""
        start = time.perf_counter()
        report = BatchReport(results=[])
        uploads = [it for it in items if isinstance(it.event, ImageUploaded)]

        existing: dict[str, StoredImage] = {}
        if self.skip_unchanged and uploads:
            existing = self.store.get(sorted({it.event.image_id for it in uploads}))

        futures = {
            id(it): self._pool.submit(
                self.prepare, it.event, existing.get(it.event.image_id)  # type: ignore[arg-type]
            )
            for it in uploads
        }
        prepared: dict[int, Prepared] = {}
        results: dict[int, ItemResult] = {}
        for it in uploads:
            try:
                prep = futures[id(it)].result()
            except ImgSearchError as exc:
                results[id(it)] = ItemResult(it, "failed", exc)
                continue
            prepared[id(it)] = prep
            report.stage_seconds["fetch"] += prep.fetch_s
            report.stage_seconds["decode"] += prep.decode_s

        # Events for one image_id apply in order: the last successful one decides.
        final: dict[str, WorkItem] = {}
        for it in items:
            if isinstance(it.event, ImageDeleted) or id(it) in prepared:
                final[it.event.image_id] = it

        to_embed = [
            it for it in final.values() if id(it) in prepared and not prepared[id(it)].unchanged
        ]
        busy = self.embed([(it.event, prepared[id(it)]) for it in to_embed])  # type: ignore[misc]
        report.stage_seconds.update(busy)
        records = [r for it in to_embed for r in prepared[id(it)].records]

        t0 = time.perf_counter()
        deletes = [it.event.image_id for it in final.values() if isinstance(it.event, ImageDeleted)]
        self.write(records, deletes)
        report.stage_seconds["upsert"] = time.perf_counter() - t0

        for it in items:
            if id(it) in results:
                report.results.append(results[id(it)])
            elif isinstance(it.event, ImageDeleted):
                report.results.append(ItemResult(it, "deleted"))
            elif prepared[id(it)].unchanged:
                report.results.append(ItemResult(it, "unchanged"))
            else:
                report.results.append(ItemResult(it, "stored"))
        report.wall_seconds = time.perf_counter() - start
        return report
