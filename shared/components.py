"""Build the long-lived parts (model, store, fetcher, pipeline) from Settings, once."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shared.config import Settings
from shared.detection import Cropper
from shared.embedding import Embedder
from shared.fetch import ImageFetcher
from shared.pipeline import IngestPipeline
from shared.reduction import reduction_spec
from shared.store.base import DEFAULT_OVERSAMPLING, CollectionSpec, VectorStore
from shared.store.factory import open_store
from shared.store.projected import ProjectedStore

log = logging.getLogger(__name__)


def collection_spec(settings: Settings, embedder: Embedder) -> CollectionSpec:
    # --- Vectors: reduction and quantization ---
    reduction = reduction_spec(settings, embedder.dim)
    return CollectionSpec(
        name=settings.qdrant_collection,
        dim=int(reduction["identity"]["out_dim"]) if reduction else embedder.dim,
        model=embedder.info.as_metadata(),
        reduction=reduction,
        quantization=settings.quantization,
        rescore=settings.quantization_rescore,
        oversampling=(settings.quantization_oversampling
                      or DEFAULT_OVERSAMPLING.get(settings.quantization)),
        indexing_threshold_kb=settings.vector_indexing_threshold_kb,
    )


@dataclass
class Components:
    settings: Settings
    embedder: Embedder
    store: VectorStore
    fetcher: ImageFetcher
    # What to embed of each image; the whole image without a detector (DETECTOR=none).
    cropper: Cropper = field(default_factory=lambda: Cropper(None))

    @classmethod
    def load(cls, settings: Settings, *, embedder: Embedder | None = None) -> Components:
        """Load the model (and detector), then open (or create) the collection they must
        agree with."""
        if embedder is None:
            log.info("loading model %s on %s", settings.model_name, settings.device)
            embedder = Embedder.from_settings(settings)
        log.info("model %s: %d-d vectors, device %s, weights %s", embedder.info.name,
                 embedder.dim, embedder.device, embedder.info.weights)
        # On the embedder's device, so detection batches share it (and its GPU memory).
        cropper = Cropper.from_settings(settings, device=embedder.device)
        # A collection built with a reduction is used through its own stored projection.
        store = ProjectedStore.around(open_store(settings, collection_spec(settings, embedder)))
        log.info("store: %s collection %r", settings.store_location, settings.qdrant_collection)
        return cls(settings, embedder, store, ImageFetcher.from_settings(settings), cropper)

    def pipeline(self, *, skip_unchanged: bool = True) -> IngestPipeline:
        return IngestPipeline(
            self.embedder,
            self.store,
            self.fetcher,
            max_pixels=self.settings.image_max_pixels,
            decode_workers=self.settings.decode_workers,
            embed_batch_size=self.settings.batch_size,
            fetch_retries=self.settings.fetch_retries,
            skip_unchanged=skip_unchanged,
            cropper=self.cropper,
        )

    def close(self) -> None:
        self.fetcher.close()
        self.store.close()
