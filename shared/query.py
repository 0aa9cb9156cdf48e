"""The one query path: decode -> crop policy -> views -> embed -> merge -> search.

Every query goes through ``QueryEmbedder``: the API (query_api/engine.py, which runs
each step where its micro-batchers want it), ``imgsearch search`` and ``imgsearch eval``
(which call ``embed_bytes`` / ``embed_images`` directly). So a query is treated as the
gallery was, everywhere:

* **decode**: at the smallest JPEG scale that covers the model's resize, or the
  detector's working size when the query is cropped (shared/images.py);
* **crop policy**: ``none`` (the whole image), ``largest`` or ``all`` (the whole image and
  each object); the gallery's CROP_MODE by default when a detector is configured;
* **views**: the model's own preprocessing, plus the full frame with
  QUERY_FULL_FRAME_VIEW;
* **embed** (through any engine), then **merge**: one vector per crop, the normalised
  sum of its views;
* **search**: one search per crop vector, merged so each image keeps its best score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from shared.config import Settings
from shared.detection.boxes import Crop, whole_box
from shared.detection.cropper import DETECT_DECODE_NEED, Cropper, shrink_for_detection
from shared.errors import ConfigError
from shared.images import Decoded, DecodeNeed, decode
from shared.models.base import EmbeddingModel, merge_views
from shared.store.base import Filters, Hit, VectorStore, best_per_image

QueryCrop = Literal["none", "largest", "all"]
QUERY_CROPS: tuple[QueryCrop, ...] = ("none", "largest", "all")


@dataclass(frozen=True)
class QueryVectors:
    """One query image's vectors: one per crop (the whole image unless cropped)."""

    vectors: list[np.ndarray]
    crops: list[dict[str, Any]]  # Crop.payload() of each vector's crop

    @property
    def vector(self) -> np.ndarray:
        return self.vectors[0]


class QueryEmbedder:
    def __init__(self, embedder: EmbeddingModel, cropper: Cropper | None = None, *,
                 full_frame: bool = False, default_crop: QueryCrop | None = None,
                 max_pixels: int = 40_000_000) -> None:
        self.embedder = embedder
        self.cropper = cropper or Cropper(None)
        self.full_frame = full_frame
        # Queries are treated as the gallery was: the ingest workers' CROP_MODE by default.
        self.default_crop: QueryCrop = default_crop or (
            self.cropper.mode if self.cropper.detects else "none")
        self.max_pixels = max_pixels

    @classmethod
    def from_settings(cls, settings: Settings, embedder: EmbeddingModel,
                      cropper: Cropper | None = None) -> QueryEmbedder:
        return cls(embedder, cropper, full_frame=settings.query_full_frame_view,
                   max_pixels=settings.image_max_pixels)

    @property
    def detects(self) -> bool:
        return self.cropper.detects

    def check_crop(self, crop: QueryCrop) -> None:
        if crop not in QUERY_CROPS:
            raise ConfigError(f"crop must be none, largest or all, not {crop!r}")
        if crop != "none" and not self.cropper.detects:
            raise ConfigError(
                f"crop={crop} needs an object detector, and this one runs without one "
                "(DETECTOR=none); use crop=none or set DETECTOR=yolov5")

    # -- the steps ---------------------------------------------------------------------------

    def decode_need(self, crop: QueryCrop) -> DecodeNeed:
        need = self.embedder.decode_need
        return need | DETECT_DECODE_NEED if crop != "none" else need

    def decode(self, data: bytes, crop: QueryCrop = "none") -> Decoded:
        """The query's pixels, as small as what follows allows (ImageError if bad)."""
        return decode(data, max_pixels=self.max_pixels, need=self.decode_need(crop))

    def crops(self, items: Sequence[tuple[Decoded, QueryCrop]]) -> list[list[Crop]]:
        """Each decoded query's crops (``Crop.image`` set): the detector runs once for all
        the queries that ask for a crop."""
        out: list[list[Crop]] = [[Crop(whole_box(d.size), image=d.image)] for d, _ in items]
        cropped = [i for i, (_, mode) in enumerate(items) if mode != "none"]
        if cropped:
            self.check_crop(items[cropped[0]][1])
            found = self.cropper.crops_for(
                [shrink_for_detection(items[i][0].image) for i in cropped],
                [items[i][0].size for i in cropped],
                [items[i][1] for i in cropped])  # type: ignore[misc]
            for i, crops in zip(cropped, found, strict=True):
                out[i] = crops
        return out

    def views(self, crops: Sequence[Crop]) -> list[np.ndarray]:
        """Each crop's model inputs: one per view, crop after crop."""
        return [view for c in crops for view in self.embedder.preprocess_views(
            c.image, full_frame=self.full_frame)]  # type: ignore[arg-type]

    @property
    def views_per_crop(self) -> int:
        return 2 if self.full_frame else 1

    def merge(self, vectors: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """One vector per crop from the views' vectors (in ``views``' order)."""
        n = self.views_per_crop
        rows = [np.asarray(v, dtype=np.float32) for v in vectors]
        if n == 1:
            return rows
        return [merge_views(np.stack(rows[i:i + n])) for i in range(0, len(rows), n)]

    # -- all at once (the CLI, eval) ---------------------------------------------------------

    def embed_bytes(self, data: bytes, crop: QueryCrop | None = None) -> QueryVectors:
        mode = crop or self.default_crop
        self.check_crop(mode)
        return self._embed([self.decode(data, mode)], mode, batch_size=32)[0]

    def embed_images(self, images: Sequence[Image.Image], crop: QueryCrop | None = None,
                     *, batch_size: int = 32) -> list[QueryVectors]:
        """Query vectors of images in memory (eval's edited copies), in batches."""
        return self.embed_decoded([Decoded(image, image.size) for image in images], crop,
                                  batch_size=batch_size)

    def embed_decoded(self, decoded: Sequence[Decoded], crop: QueryCrop | None = None,
                      *, batch_size: int = 32) -> list[QueryVectors]:
        """Query vectors of images decoded by ``decode`` (with the same ``crop``)."""
        mode = crop or self.default_crop
        self.check_crop(mode)
        return self._embed(decoded, mode, batch_size=batch_size)

    def _embed(self, decoded: Sequence[Decoded], mode: QueryCrop,
               batch_size: int) -> list[QueryVectors]:
        out: list[QueryVectors] = []
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start:start + batch_size]
            crops = self.crops([(d, mode) for d in chunk])
            flat = [c for per_image in crops for c in per_image]
            inputs = self.views(flat)
            vectors = [v for i in range(0, len(inputs), batch_size)
                       for v in self.embedder.embed(inputs[i:i + batch_size])]
            merged = self.merge(vectors)
            at = 0
            for per_image in crops:
                out.append(QueryVectors(merged[at:at + len(per_image)],
                                        [c.payload() for c in per_image]))
                at += len(per_image)
        return out


def search(store: VectorStore, vectors: np.ndarray | Sequence[np.ndarray], *,
           limit: int = 10, offset: int = 0, score_threshold: float | None = None,
           filters: Filters | None = None, exclude: Sequence[str] = ()) -> list[Hit]:
    """Search with one vector, or with several (a query's crops) merged: each image keeps
    the best score any of them gave it."""
    many = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
    if len(many) == 1:
        return store.search(many[0], limit=limit, offset=offset, score_threshold=score_threshold,
                            filters=filters or None, exclude_image_ids=exclude)
    found: list[Hit] = []
    for vector in many:  # every page of the merge needs each search's whole prefix
        found += store.search(vector, limit=offset + limit, offset=0,
                              score_threshold=score_threshold, filters=filters or None,
                              exclude_image_ids=exclude)
    return best_per_image(found)[offset:offset + limit]
