"""A Qdrant server through qdrant-client (production), or qdrant-client's local mode (tests)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models

from shared.errors import ConfigError, StoreError
from shared.store.base import (
    PARENT_FIELD,
    CollectionSpec,
    Filters,
    Hit,
    PointRecord,
    StoredImage,
    VectorStore,
    group_hits,
    payload_key,
    point_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_DISTANCES = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT}


# --- Vectors: reduction and quantization ---
def _quantization_config(kind: str) -> models.QuantizationConfig | None:
    """Quantized copies live in RAM; the float32 originals stay for rescoring."""
    if kind == "int8":
        return models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(
                type=models.ScalarType.INT8, quantile=0.99, always_ram=True
            )
        )
    if kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None


def _search_params(spec: CollectionSpec) -> models.SearchParams | None:
    if spec.quantization == "none":
        return None
    return models.SearchParams(
        quantization=models.QuantizationSearchParams(
            rescore=spec.rescore, oversampling=spec.oversampling
        )
    )


def _filter(
    filters: Filters | None, exclude_ids: Sequence[str], *, images_only: bool = False
) -> models.Filter | None:
    must: list[Any] = [
        models.FieldCondition(key=payload_key(k), match=models.MatchValue(value=v))
        for k, v in (filters or {}).items()
    ]
    if images_only:  # the images' own points, not their box points
        must.append(models.IsEmptyCondition(is_empty=models.PayloadField(key=PARENT_FIELD)))
    must_not: list[Any] = []
    if exclude_ids:
        must_not.append(models.HasIdCondition(has_id=[point_id(i) for i in exclude_ids]))
        must_not.append(_parents(exclude_ids))
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def _parents(image_ids: Sequence[str]) -> models.FieldCondition:
    """The box points of these images."""
    return models.FieldCondition(key=PARENT_FIELD, match=models.MatchAny(any=list(image_ids)))


def _box_points_of(image_ids: Sequence[str]) -> models.DeleteOperation:
    return models.DeleteOperation(
        delete=models.FilterSelector(filter=models.Filter(must=[_parents(image_ids)]))
    )


class QdrantStore(VectorStore):
    def __init__(self, client: QdrantClient, spec: CollectionSpec, *, create: bool = True) -> None:
        self.client = client
        self.spec = spec
        self._call(lambda: self._ensure_collection(create), "open collection")

    @classmethod
    def connect(
        cls, url: str, spec: CollectionSpec, *, api_key: str | None = None, timeout_s: float = 10.0
    ) -> QdrantStore:
        client = QdrantClient(url=url, api_key=api_key, timeout=int(max(1, timeout_s)))
        return cls(client, spec)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except (StoreError, ConfigError):  # ours already: a config error is not retriable
            raise
        except Exception as exc:  # qdrant-client raises httpx, grpc and its own errors
            raise StoreError(f"Qdrant {what} failed: {type(exc).__name__}: {exc}") from exc

    def _ensure_collection(self, create: bool) -> None:
        name = self.spec.name
        if not self.client.collection_exists(name):
            if not create:
                raise StoreError(f"collection {name!r} does not exist", retriable=False)
            metadata = self.spec.metadata()
            log.info("creating collection %r (%d-d, %s)", name, self.spec.dim, self.spec.distance)
            threshold = self.spec.indexing_threshold_kb
            self.client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=self.spec.dim, distance=_DISTANCES[self.spec.distance]
                ),
                metadata=metadata,
                quantization_config=_quantization_config(self.spec.quantization),
                optimizers_config=(
                    models.OptimizersConfigDiff(indexing_threshold=threshold) if threshold else None
                ),
            )
            self.stored_metadata = metadata
            self._index_parents()
            return
        info = self.client.get_collection(name)
        vectors = info.config.params.vectors
        stored_dim = vectors.size if isinstance(vectors, models.VectorParams) else -1
        self.spec.check_compatible(info.config.metadata, stored_dim)
        self.stored_metadata = info.config.metadata or {}
        if PARENT_FIELD not in (info.payload_schema or {}):
            self._index_parents()  # a collection created before box points existed

    def _index_parents(self) -> None:
        # Every upsert and delete filters on the parent field: keep that an index lookup.
        with warnings.catch_warnings():
            # Local mode (tests, scripts) scans instead and says so; a server builds the index.
            warnings.filterwarnings("ignore", "Payload indexes have no effect in the local Qdrant")
            self.client.create_payload_index(
                self.spec.name, PARENT_FIELD, field_schema=models.PayloadSchemaType.KEYWORD,
                wait=True,
            )

    def upsert(self, records: Sequence[PointRecord]) -> None:
        if not records:
            return
        points = [
            models.PointStruct(
                id=r.point_id, vector=r.vector.astype(np.float32).tolist(), payload=r.payload
            )
            for r in records
        ]
        images = sorted({r.image_id for r in records if r.crop_index == 0})
        operations: list[Any] = [_box_points_of(images)] if images else []
        operations.append(models.UpsertOperation(upsert=models.PointsList(points=points)))
        # One ordered request: the images' old box points go, then the batch is written.
        # wait=True: Qdrant answers once the writes are applied and in its WAL.
        self._call(
            lambda: self.client.batch_update_points(self.spec.name, operations, wait=True),
            "upsert",
        )

    def delete(self, image_ids: Sequence[str]) -> None:
        if not image_ids:
            return
        operations = [
            _box_points_of(image_ids),
            models.DeleteOperation(
                delete=models.PointIdsList(points=[point_id(i) for i in image_ids])
            ),
        ]
        self._call(
            lambda: self.client.batch_update_points(self.spec.name, operations, wait=True),
            "delete",
        )

    def search(
        self,
        vector: np.ndarray,
        *,
        limit: int = 10,
        offset: int = 0,
        score_threshold: float | None = None,
        filters: Filters | None = None,
        exclude_image_ids: Sequence[str] = (),
        with_payload: bool = True,
    ) -> list[Hit]:
        query = vector.astype(np.float32).tolist()
        query_filter = _filter(filters, exclude_image_ids)

        def points(n: int) -> list[Hit]:
            response = self._call(
                lambda: self.client.query_points(
                    self.spec.name,
                    query=query,
                    limit=n,
                    score_threshold=score_threshold,
                    query_filter=query_filter,
                    with_payload=True if with_payload else ["image_id"],
                    search_params=_search_params(self.spec),
                ),
                "search",
            )
            return [
                Hit(str(p.payload["image_id"]), float(p.score), dict(p.payload))
                for p in response.points
                if p.payload
            ]

        return group_hits(points, limit=limit, offset=offset)

    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        if not image_ids:
            return {}
        records = self._call(
            lambda: self.client.retrieve(
                self.spec.name,
                ids=[point_id(i) for i in image_ids],
                with_payload=True,
                with_vectors=with_vector,
            ),
            "retrieve",
        )
        found = {}
        for rec in records:
            payload = dict(rec.payload or {})
            vector = np.asarray(rec.vector, dtype=np.float32) if with_vector and rec.vector else None
            found[str(payload["image_id"])] = StoredImage(payload["image_id"], payload, vector)
        return found

    def count(self, filters: Filters | None = None) -> int:
        result = self._call(
            lambda: self.client.count(
                self.spec.name, count_filter=_filter(filters, (), images_only=True), exact=True
            ),
            "count",
        )
        return int(result.count)

    def ping(self) -> None:
        # collection_exists, not get_collection: the latter ships the whole collection
        # metadata, which holds a stored projection matrix (megabytes) when one is used.
        if not self._call(lambda: self.client.collection_exists(self.spec.name), "ping"):
            raise StoreError(f"collection {self.spec.name!r} is gone from {self.client}")

    def close(self) -> None:
        self.client.close()
