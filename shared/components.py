"""Build the long-lived parts (model, store, fetcher, pipeline) from Settings, once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.blobs import BlobKeepingPipeline, BlobStore, open_blobs
from shared.config import Settings
from shared.detection.cropper import Cropper
from shared.embedding import Embedder
from shared.errors import CollectionMismatchError
from shared.fetch import ImageFetcher
from shared.pipeline.report import BatchReport
from shared.pipeline.scheduler import run_all
from shared.pipeline.stages import IngestPipeline, ItemResult, WorkItem
from shared.query import QueryEmbedder
from shared.reduction import reduction_spec
from shared.reindex.spec import load_settings_of
from shared.store.base import (
    DEFAULT_OVERSAMPLING,
    CollectionLayout,
    CollectionSpec,
    VectorStore,
)
from shared.store.factory import open_store
from shared.store.points import CollectionStore
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
        layout=CollectionLayout(
            shards=settings.qdrant_shards,
            replication_factor=settings.qdrant_replication_factor,
            write_consistency=settings.qdrant_write_consistency,
            write_ordering=settings.qdrant_write_ordering,
            on_disk_vectors=settings.qdrant_on_disk_vectors,
            on_disk_payload=settings.qdrant_on_disk_payload,
            hnsw_m=settings.qdrant_hnsw_m,
            hnsw_ef_construct=settings.qdrant_hnsw_ef_construct,
        ),
        load=load_settings_of(settings),  # how another process loads this spec
    )


@dataclass
class Components:
    settings: Settings
    embedder: Embedder
    store: VectorStore
    fetcher: ImageFetcher
    # What to embed of each image; the whole image without a detector (DETECTOR=none).
    cropper: Cropper = field(default_factory=lambda: Cropper(None))
    # Kept copies of inline uploads, for re-indexing (shared/blobs.py); None: none kept.
    blobs: BlobStore | None = None

    @classmethod
    def load(cls, settings: Settings, *, embedder: Embedder | None = None,
             collection: str | None = None) -> Components:
        """Load the model (and detector), then open (or create) the collection they must
        agree with: the physical ``collection`` of the index when given, else the one
        shared/store/factory.py's ``choose_collection`` picks. A process configured for a
        spec the index has migrated away from follows the index (shared/reindex/follow.py)."""
        if embedder is None:
            log.info("loading model %s on %s (EMBED_ENGINE=%s)", settings.model_name,
                     settings.device, settings.embed_engine)
            embedder = Embedder.from_settings(settings)
        log.info("model %s: %d-d vectors, engine %s on %s, weights %s", embedder.info.name,
                 embedder.dim, embedder.engine, embedder.device, embedder.info.weights)
        # On the embedder's device, so detection batches share it (and its GPU memory).
        cropper = Cropper.from_settings(settings, device=embedder.device)
        spec = collection_spec(settings, embedder)
        try:
            opened = open_store(settings, spec, physical=collection)
        except CollectionMismatchError as exc:
            from shared.reindex.follow import followed_settings

            followed = None if collection else followed_settings(settings, spec, exc)
            if followed is None:
                raise
            same = followed.model_name == settings.model_name and \
                followed.model_weights == settings.model_weights
            return cls.load(followed, embedder=embedder if same else None)
        if isinstance(opened, CollectionStore) and "load" not in \
                ((opened.stored_metadata or {}).get("imgsearch") or {}):
            try:  # a collection made before specs were kept: keep this one's
                opened.record_load(load_settings_of(settings))
            except Exception as exc:  # noqa: BLE001 - only a later re-index needs it
                log.warning("could not record how to load collection %r: %s",
                            opened.spec.name, exc)
        # A collection built with a reduction is used through its own stored projection.
        store = ProjectedStore.around(opened)
        log.info("store: %s collection %r (index %r)", settings.store_location,
                 store.spec.name, settings.qdrant_collection)
        return cls(settings, embedder, store, ImageFetcher.from_settings(settings), cropper,
                   open_blobs(settings))

    def query(self) -> QueryEmbedder:
        """The one query path (shared/query.py) over this model, detector and settings:
        what ``imgsearch search`` and eval use (the API wraps the same in its batchers)."""
        return QueryEmbedder.from_settings(self.settings, self.embedder, self.cropper)

    def pipeline(self, *, skip_unchanged: bool = True, keep_blobs: bool = True,
                 cls: type[IngestPipeline] = IngestPipeline, **extra: Any) -> IngestPipeline:
        """The ingest pipeline of this spec. With a blob store, it keeps inline uploads
        (shared/blobs.py) unless ``keep_blobs`` is off (a second spec's dual-write, the
        re-index, which reads them); ``cls`` and ``extra``: a pipeline subclass and its
        own arguments."""
        if keep_blobs and self.blobs is not None and cls is IngestPipeline:
            cls = BlobKeepingPipeline
            extra = {"blobs": self.blobs, "max_side": self.settings.blob_max_side,
                     "quality": self.settings.blob_jpeg_quality, **extra}
        return cls(
            self.embedder,
            self.store,
            self.fetcher,
            max_pixels=self.settings.image_max_pixels,
            decode_workers=self.settings.decode_workers,
            embed_batch_size=self.settings.batch_size,
            fetch_retries=self.settings.fetch_retries,
            skip_unchanged=skip_unchanged,
            cropper=self.cropper,
            **extra,
        )

    def ingest(self, items: Iterable[WorkItem], *, skip_unchanged: bool = True,
               progress: Callable[[ItemResult], None] | None = None,
               give_up_after_s: float | None = 120.0) -> BatchReport:
        """Run events straight through the scheduler, without Kafka (``imgsearch index``,
        eval, tests): the same stages, batching and retries as the workers."""
        pipeline = self.pipeline(skip_unchanged=skip_unchanged)
        try:
            return run_all(pipeline, items, batch_size=self.settings.batch_size,
                           prepare_workers=self.settings.decode_workers,
                           max_wait_s=min(0.05, self.settings.batch_max_wait_ms / 1000),
                           give_up_after_s=give_up_after_s, progress=progress)
        finally:
            pipeline.close()

    def close(self) -> None:
        self.fetcher.close()
        self.store.close()
        if self.blobs is not None:
            self.blobs.close()
