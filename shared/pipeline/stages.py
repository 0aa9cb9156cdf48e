"""The ingest pipeline's stages: fetch, decode, (detect,) embed, upsert.

This module is what each stage *does*; shared/pipeline/scheduler.py decides when, on
which thread and in which batch, for every entrance alike (the Kafka worker, ``imgsearch
index`` and ``up``, ``imgsearch eval``, the benchmarks). A stage raises ImgSearchError for
a bad event; an unexpected exception met while handling one event is wrapped as
``InternalError`` naming the stage, so the scheduler can dead-letter that event alone.

With a detector (DETECTOR=yolov5), the decoded image waits for the embed stage, which
finds the objects of a whole batch in one forward pass on the model's device, cuts the
crops from the same decoded pixels and embeds them: CROP_MODE=largest stores one point
per image (its largest object, or the whole image), CROP_MODE=all stores the whole image
plus one box point per object (shared/store/base.py).
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from PIL import Image

from shared.detection.boxes import Crop, whole_box
from shared.detection.cropper import DETECT_DECODE_NEED, Cropper, shrink_for_detection
from shared.errors import ImgSearchError, InternalError
from shared.events import Event, ImageUploaded
from shared.fetch import ImageFetcher
from shared.images import decode, sha256_hex
from shared.models.base import EmbeddingModel
from shared.pipeline.retry import Backoff, retrying
from shared.store.base import PARENT_FIELD, PointRecord, StoredImage, VectorStore

log = logging.getLogger(__name__)

# A fetch is retried FETCH_RETRIES times (timeouts, 5xx), quickly: the event waits for it.
FETCH_BACKOFF = Backoff(base_s=0.25, max_s=8.0)

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
class Prepared:
    """An upload after fetch and decode: ready for the model, unless already stored."""

    sha256: str
    fetch_s: float
    decode_s: float
    size: tuple[int, int] = (0, 0)  # the original's (width, height), EXIF-oriented
    tensor: np.ndarray | None = None  # the model's input for the whole image (no detector)
    image: Image.Image | None = None  # decoded pixels for the detector, until embed()
    records: list[PointRecord] = field(default_factory=list)  # set by embed()

    @property
    def unchanged(self) -> bool:
        """The store already holds exactly this upload: nothing to embed or write."""
        return self.tensor is None and self.image is None and not self.records


@functools.cache
def _probe_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (90, 140, 200)).save(out, format="JPEG")
    return out.getvalue()


class IngestPipeline:
    def __init__(
        self,
        embedder: EmbeddingModel,
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
        # JPEGs decode at the smallest DCT scale that covers what comes next: the model's
        # resize, or the detector's working size (shared/images.py).
        self.decode_need = embedder.decode_need
        if self.cropper.detects:
            self.decode_need = self.decode_need | DETECT_DECODE_NEED
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
        uri = event.uri
        assert uri is not None
        return retrying(
            lambda: self.fetcher.fetch(uri), backoff=FETCH_BACKOFF, attempts=self.fetch_retries,
            on_failure=lambda exc, attempt, delay: log.info(
                "retrying fetch of %s in %.2fs (attempt %d): %s", uri, delay, attempt, exc),
        )

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
        """Stage 1: fetch, hash, decode, preprocess. Raises ImgSearchError for a bad event
        (InternalError for an unexpected exception, naming fetch or decode)."""
        stage = "fetch"
        try:
            t0 = time.perf_counter()
            data = self._fetch(event)
            t1 = time.perf_counter()
            stage = "decode"
            digest = sha256_hex(data)
            if existing is not None and self.is_unchanged(event, digest, existing.payload):
                return Prepared(digest, t1 - t0, 0.0)
            decoded = decode(data, max_pixels=self.max_pixels, need=self.decode_need)
            if self.cropper.detects:
                prepared = Prepared(digest, t1 - t0, 0.0, decoded.size,
                                    image=shrink_for_detection(decoded.image))
            else:
                prepared = Prepared(digest, t1 - t0, 0.0, decoded.size,
                                    tensor=self.embedder.preprocess(decoded.image))
            prepared.decode_s = time.perf_counter() - t1
            return prepared
        except Exception as exc:  # one event's problem, whatever it is
            raise InternalError.wrap(exc, stage) from exc

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

    def probe(self) -> None:
        """Decode and embed a small generated photo; raises if the stages themselves are
        broken (the model, the detector), which tells a bad batch from a broken pipeline."""
        event = ImageUploaded("probe", "imgsearch", "probe", None, _probe_jpeg())
        prepared = self.prepare(event, None)
        self.embed([(event, prepared)])

    def write(self, records: Sequence[PointRecord], deletes: Sequence[str]) -> None:
        """Stage 3: durable upserts and deletes. StoreError propagates: nothing is done
        (a failed batch is retried whole, or split to find the record the store refuses)."""
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
