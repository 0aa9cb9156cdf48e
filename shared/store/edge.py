"""The embedded store: Qdrant's own engine (HNSW, WAL) in-process, through qdrant-edge-py.

Layout of ``QDRANT_PATH``::

    <QDRANT_PATH>/<collection>/collection.json   what the collection was built for
    <QDRANT_PATH>/<collection>/shard/            Qdrant Edge's WAL and segments

One process holds a shard at a time (Qdrant locks the WAL). Run the API and workers
together with ``imgsearch up``, or use a Qdrant server (QDRANT_URL) to scale out.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

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

_DISTANCES = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot}


# --- Vectors: reduction and quantization ---
def _quantization_config(kind: str) -> Any:
    """Quantized copies live in RAM; the float32 originals stay for rescoring."""
    if kind == "int8":
        return qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True)
    if kind == "binary":
        return qe.BinaryQuantizationConfig(always_ram=True)
    return None


def _search_params(spec: CollectionSpec) -> qe.SearchParams | None:
    if spec.quantization == "none":
        return None
    return qe.SearchParams(
        quantization=qe.QuantizationSearchParams(
            rescore=spec.rescore, oversampling=spec.oversampling
        )
    )


def _filter(
    filters: Filters | None, exclude_ids: Sequence[str], *, images_only: bool = False
) -> qe.Filter | None:
    must: list[Any] = [
        qe.FieldCondition(payload_key(k), match=qe.MatchValue(v)) for k, v in (filters or {}).items()
    ]
    if images_only:  # the images' own points, not their box points
        must.append(qe.IsEmptyCondition(PARENT_FIELD))
    must_not: list[Any] = []
    if exclude_ids:
        must_not.append(qe.HasIdCondition({point_id(i) for i in exclude_ids}))
        must_not.append(_parents(exclude_ids))
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


def _parents(image_ids: Sequence[str]) -> qe.FieldCondition:
    """The box points of these images."""
    return qe.FieldCondition(PARENT_FIELD, match=qe.MatchAny(list(image_ids)))


def _box_points_of(image_ids: Sequence[str]) -> Any:
    return qe.UpdateOperation.delete_points_by_filter(qe.Filter(must=[_parents(image_ids)]))


def _index_parents(shard: qe.EdgeShard) -> None:
    # Every upsert and delete filters on the parent field: keep that an index lookup.
    shard.update(qe.UpdateOperation.create_field_index(PARENT_FIELD, qe.PayloadSchemaType.Keyword))
    shard.flush()


class EdgeStore(VectorStore):
    def __init__(self, root: Path, spec: CollectionSpec) -> None:
        self.spec = spec
        self.directory = Path(root) / spec.name
        self._spec_file = self.directory / "collection.json"
        self._shard_dir = self.directory / "shard"
        # Writes are serialised so that flush() covers exactly the batch that asked for it.
        self._write_lock = threading.Lock()
        self._dirty = False
        self._search_params = _search_params(spec)
        self.shard = self._call(self._open, "open")

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except (StoreError, ConfigError):  # ours already: a config error is not retriable
            raise
        except Exception as exc:  # the binding raises plain Exception with the engine's text
            text = str(exc)
            if "WouldBlock" in text:
                raise StoreError(
                    f"the embedded store {self.directory} is open in another process. It serves "
                    "one process: run the API and workers together (imgsearch up), or use a "
                    "Qdrant server with QDRANT_URL.",
                    retriable=False,
                ) from exc
            raise StoreError(f"embedded store {what} failed: {text}") from exc

    def _open(self) -> qe.EdgeShard:
        if self._spec_file.exists():
            stored = json.loads(self._spec_file.read_text())
            self.spec.check_compatible(stored.get("metadata"), int(stored.get("dim", -1)))
            self.stored_metadata = stored.get("metadata") or {}
            shard = qe.EdgeShard.load(str(self._shard_dir))
            if PARENT_FIELD not in shard.info().payload_schema:
                _index_parents(shard)  # a collection created before box points existed
            return shard
        metadata = self.spec.metadata()  # raises before anything is created if it cannot be
        log.info("creating embedded collection %s (%d-d)", self.directory, self.spec.dim)
        self.directory.mkdir(parents=True, exist_ok=True)
        threshold = self.spec.indexing_threshold_kb
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=self.spec.dim,
                distance=_DISTANCES[self.spec.distance],
                quantization_config=_quantization_config(self.spec.quantization),
            ),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=threshold) if threshold else None,
        )
        shard = qe.EdgeShard.create(str(self._shard_dir), config)
        _index_parents(shard)
        # Written last and atomically: a directory without it is an interrupted creation.
        tmp = self._spec_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dim": self.spec.dim, "metadata": metadata}, indent=2))
        tmp.replace(self._spec_file)
        self.stored_metadata = metadata
        return shard

    def upsert(self, records: Sequence[PointRecord]) -> None:
        if not records:
            return
        points = [
            qe.Point(r.point_id, r.vector.astype(np.float32).tolist(), r.payload) for r in records
        ]
        images = sorted({r.image_id for r in records if r.crop_index == 0})
        with self._write_lock:
            if images:  # the images' old box points go first; the batch brings the current ones
                self._call(lambda: self.shard.update(_box_points_of(images)), "upsert")
            self._call(lambda: self.shard.update(qe.UpdateOperation.upsert_points(points)), "upsert")
            # The WAL has the write; flush makes it durable before the caller commits offsets.
            self._call(self.shard.flush, "flush")
            self._dirty = True

    def delete(self, image_ids: Sequence[str]) -> None:
        if not image_ids:
            return
        ids: list[Any] = [point_id(i) for i in image_ids]
        with self._write_lock:
            self._call(lambda: self.shard.update(_box_points_of(image_ids)), "delete")
            self._call(lambda: self.shard.update(qe.UpdateOperation.delete_points(ids)), "delete")
            self._call(self.shard.flush, "flush")
            self._dirty = True

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
        query = qe.Query.Nearest(vector.astype(np.float32).tolist())
        query_filter = _filter(filters, exclude_image_ids)

        def points(n: int) -> list[Hit]:
            request = qe.QueryRequest(
                limit=n,
                query=query,
                with_payload=True,
                filter=query_filter,
                score_threshold=score_threshold,
                params=self._search_params,
            )
            found = self._call(lambda: self.shard.query(request), "search")
            return [
                Hit(str(p.payload["image_id"]), float(p.score), dict(p.payload))
                for p in found
                if p.payload
            ]

        return group_hits(points, limit=limit, offset=offset)

    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        if not image_ids:
            return {}
        ids: list[Any] = [point_id(i) for i in image_ids]
        records = self._call(
            lambda: self.shard.retrieve(ids, with_payload=True, with_vector=with_vector), "retrieve"
        )
        found = {}
        for rec in records:
            payload = dict(rec.payload or {})
            vector = (
                np.asarray(rec.vector, dtype=np.float32)
                if with_vector and isinstance(rec.vector, list)
                else None
            )
            found[str(payload["image_id"])] = StoredImage(payload["image_id"], payload, vector)
        return found

    def count(self, filters: Filters | None = None) -> int:
        request = qe.CountRequest(exact=True, filter=_filter(filters, (), images_only=True))
        return int(self._call(lambda: self.shard.count(request), "count"))

    def ping(self) -> None:
        self._call(self.shard.info, "ping")

    def optimize(self) -> None:
        """Build HNSW indexes and merge segments; Edge has no background optimizer.

        The engine holds the GIL while it optimizes (measured: 28 s at 30k x 128-d, the
        whole process stalled), so this is never run behind the caller's back: the batch
        tools call it when they finish (``imgsearch index``, ``imgsearch up``).
        """
        with self._write_lock:
            if not self._dirty:
                return
            self._call(self.shard.optimize, "optimize")
            self._dirty = False

    def close(self) -> None:
        with self._write_lock:
            self._call(self.shard.flush, "flush")
            self._call(self.shard.close, "close")
