"""The embedded store: Qdrant's own engine (HNSW, WAL) in-process, through qdrant-edge-py.

Layout of ``QDRANT_PATH``::

    <QDRANT_PATH>/<collection>/collection.json   what the collection was built for
    <QDRANT_PATH>/<collection>/shard/            Qdrant Edge's WAL and segments
    <QDRANT_PATH>/aliases.json                   which collection serves each index
    <QDRANT_PATH>/reindex-<index>.json           its migration record (shared/store/aliases.py)
    <QDRANT_PATH>/imgsearch-blobs/               kept copies of inline uploads (shared/blobs.py)

An index's collections are ``<index>`` (its first) and ``<index>--<spec digest>`` (built
by re-indexes); one process may hold several.

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
    FACET_KEYS,
    PARENT_FIELD,
    CollectionSpec,
    FacetCount,
    SearchQuery,
    payload_key,
)
from shared.store.points import (
    CollectionStore,
    Condition,
    DeleteIds,
    DeleteWhere,
    HasId,
    IsEmpty,
    Match,
    MatchAny,
    NoFacetIndex,
    Page,
    PointFilter,
    Range,
    Upsert,
    WriteOp,
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


def _sdk_filter(where: PointFilter | None) -> qe.Filter | None:
    if where is None:
        return None
    return qe.Filter(must=[_condition(c) for c in where.must] or None,
                     must_not=[_condition(c) for c in where.must_not] or None)


def _condition(c: Condition) -> Any:
    if isinstance(c, Range):
        return qe.FieldCondition(c.key, range=qe.RangeFloat(gte=c.gte, lte=c.lte))
    if isinstance(c, Match):
        if isinstance(c.value, bool):
            # The binding reads a Python bool as the integer 0/1 (bool subclasses int), which
            # never equals a stored boolean; numpy's bool_ is not an int and arrives as a bool.
            return qe.FieldCondition(c.key, match=qe.MatchValue(np.bool_(c.value)))  # type: ignore[arg-type]
        return qe.FieldCondition(c.key, match=qe.MatchValue(c.value))
    if isinstance(c, MatchAny):
        return qe.FieldCondition(c.key, match=qe.MatchAny(list(c.values)))
    if isinstance(c, IsEmpty):
        return qe.IsEmptyCondition(c.key)
    assert isinstance(c, HasId)
    return qe.HasIdCondition(set(c.point_ids))


def _index_parents(shard: qe.EdgeShard) -> None:
    # Every upsert and delete filters on the parent field: keep that an index lookup.
    shard.update(qe.UpdateOperation.create_field_index(PARENT_FIELD, qe.PayloadSchemaType.Keyword))
    shard.flush()


# Payload indexes that can be counted by value (Qdrant facets need one of these).
_FACET_SCHEMAS = {qe.PayloadSchemaType.Keyword, qe.PayloadSchemaType.Integer,
                  qe.PayloadSchemaType.Bool}


def _index_facet_keys(shard: qe.EdgeShard) -> None:
    """Keyword indexes on FACET_KEYS (GET /facets), made once per collection."""
    schema = shard.info().payload_schema
    missing = [payload_key(k) for k in FACET_KEYS if payload_key(k) not in schema]
    for field in missing:
        shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
    if missing:
        shard.flush()


class EdgeStore(CollectionStore):
    def __init__(self, root: Path, spec: CollectionSpec) -> None:
        self.spec = spec
        self.directory = Path(root) / spec.name
        self._spec_file = self.directory / "collection.json"
        self._shard_dir = self.directory / "shard"
        # Writes are serialised so that flush() covers exactly the batch that asked for it.
        self._write_lock = threading.Lock()
        self._dirty = False
        self._closed = False
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
        layout = self.spec.layout
        # One process holds the one shard: there is nothing to spread, replicate or order.
        cluster_only = {"QDRANT_SHARDS": layout.shards,
                        "QDRANT_REPLICATION_FACTOR": layout.replication_factor,
                        "QDRANT_WRITE_CONSISTENCY": layout.write_consistency,
                        "QDRANT_WRITE_ORDERING": None if layout.write_ordering == "weak"
                        else layout.write_ordering}
        ignored = [f"{k}={v}" for k, v in cluster_only.items() if v is not None]
        if ignored:
            log.info("the embedded store is one shard in one process; %s apply only to a "
                     "Qdrant server (QDRANT_URL)", ", ".join(ignored))
        if self._spec_file.exists():
            stored = json.loads(self._spec_file.read_text())
            self.spec.check_compatible(stored.get("metadata"), int(stored.get("dim", -1)))
            self.stored_metadata = stored.get("metadata") or {}
            shard = qe.EdgeShard.load(str(self._shard_dir))
            # Edge keeps what the shard was created with; a difference is only reported.
            built_file = self._shard_dir / "edge_config.json"
            built = json.loads(built_file.read_text()) if built_file.exists() else None
            vectors = ((built or {}).get("vectors") or {}).get("") or {}
            hnsw = (built or {}).get("hnsw_config") or {}
            for variable, want, have in (
                ("QDRANT_HNSW_M", layout.hnsw_m, hnsw.get("m", 16)),
                ("QDRANT_HNSW_EF_CONSTRUCT", layout.hnsw_ef_construct,
                 hnsw.get("ef_construct", 100)),
                ("QDRANT_ON_DISK_VECTORS", layout.on_disk_vectors, bool(vectors.get("on_disk"))),
                ("QDRANT_ON_DISK_PAYLOAD", layout.on_disk_payload,
                 bool((built or {}).get("on_disk_payload"))),
            ):
                if built is not None and want is not None and want != have:
                    log.warning("embedded collection %s was built with %s=%s, not %s: it keeps "
                                "its own value (rebuild it with imgsearch index into a new "
                                "QDRANT_PATH to change it)", self.directory, variable, have, want)
            if PARENT_FIELD not in shard.info().payload_schema:
                _index_parents(shard)  # a collection created before box points existed
            _index_facet_keys(shard)  # a collection created before facets existed
            return shard
        metadata = self.spec.metadata()  # raises before anything is created if it cannot be
        log.info("creating embedded collection %s (%d-d)", self.directory, self.spec.dim)
        self.directory.mkdir(parents=True, exist_ok=True)
        threshold = self.spec.indexing_threshold_kb
        hnsw = None
        if layout.hnsw_m is not None or layout.hnsw_ef_construct is not None:
            # Qdrant's defaults for what is left unset (m 16, ef_construct 100, 10 MB).
            hnsw = qe.HnswIndexConfig(m=layout.hnsw_m or 16,
                                      ef_construct=layout.hnsw_ef_construct or 100,
                                      full_scan_threshold=10_000)
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=self.spec.dim,
                distance=_DISTANCES[self.spec.distance],
                quantization_config=_quantization_config(self.spec.quantization),
                on_disk=layout.on_disk_vectors,
            ),
            on_disk_payload=layout.on_disk_payload,
            hnsw_config=hnsw,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=threshold) if threshold else None,
        )
        shard = qe.EdgeShard.create(str(self._shard_dir), config)
        _index_parents(shard)
        _index_facet_keys(shard)
        # Written last and atomically: a directory without it is an interrupted creation.
        tmp = self._spec_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dim": self.spec.dim, "metadata": metadata}, indent=2))
        tmp.replace(self._spec_file)
        self.stored_metadata = metadata
        return shard

    # -- the SDK calls (shared/store/points.py has the logic) ------------------------------------

    def _write(self, operations: Sequence[WriteOp], what: str) -> None:
        updates: list[Any] = []
        for op in operations:
            if isinstance(op, Upsert):
                updates.append(qe.UpdateOperation.upsert_points([
                    qe.Point(r.point_id, r.vector.astype(np.float32).tolist(), r.payload)
                    for r in op.records]))
            elif isinstance(op, DeleteWhere):
                updates.append(qe.UpdateOperation.delete_points_by_filter(_sdk_filter(op.where)))
            else:
                assert isinstance(op, DeleteIds)
                updates.append(qe.UpdateOperation.delete_points(list(op.point_ids)))
        # Writes are serialised so that flush() covers exactly the batch that asked for it.
        with self._write_lock:
            for update in updates:
                self._call(lambda u=update: self.shard.update(u), what)
            # The WAL has the write; flush makes it durable before the caller commits offsets.
            self._call(self.shard.flush, "flush")
            self._dirty = True

    def _query(self, query: SearchQuery, where: PointFilter | None,
               n: int) -> list[tuple[float, dict[str, Any]]]:
        request = qe.QueryRequest(
            limit=n,
            query=qe.Query.Nearest(query.vector.tolist()),
            with_payload=True,
            filter=_sdk_filter(where),
            score_threshold=query.score_threshold,
            params=self._search_params,
        )
        found = self._call(lambda: self.shard.query(request), "search")
        return [(float(p.score), p.payload) for p in found]

    def _retrieve(self, point_ids: Sequence[str],
                  with_vector: bool) -> list[tuple[dict[str, Any], list[float] | None]]:
        ids: list[Any] = list(point_ids)
        records = self._call(
            lambda: self.shard.retrieve(ids, with_payload=True, with_vector=with_vector),
            "retrieve")
        return [(dict(r.payload or {}), r.vector if isinstance(r.vector, list) else None)
                for r in records]

    def _count(self, where: PointFilter | None) -> int:
        request = qe.CountRequest(exact=True, filter=_sdk_filter(where))
        return int(self._call(lambda: self.shard.count(request), "count"))

    def _scroll(self, where: PointFilter, fields: Sequence[str], offset: Any,
                limit: int) -> Page:
        request = qe.ScrollRequest(offset=offset, limit=limit, filter=_sdk_filter(where),
                                   with_payload=qe.PayloadSelector.Include(list(fields)),
                                   with_vector=False)
        records, next_offset = self._call(lambda: self.shard.scroll(request), "scroll")
        if next_offset is not None and not isinstance(next_offset, int):
            next_offset = str(next_offset)  # a UUID: kept as text in checkpoints
        return Page([dict(r.payload or {}) for r in records], next_offset)

    def _facet_counts(self, field: str, where: PointFilter, limit: int) -> list[FacetCount]:
        index = self._call(self.shard.info, "facets").payload_schema.get(field)
        if index is None or index.data_type not in _FACET_SCHEMAS:
            raise NoFacetIndex()
        request = qe.FacetRequest(field, limit=limit, exact=True, filter=_sdk_filter(where))
        found = self._call(lambda: self.shard.facet(request), "facets")
        return [FacetCount(h.value, int(h.count)) for h in found.hits]

    def _store_metadata(self, metadata: dict[str, Any]) -> None:
        with self._write_lock:
            tmp = self._spec_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"dim": self.spec.dim, "metadata": metadata}, indent=2))
            tmp.replace(self._spec_file)

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
        """Flush and release the shard; closing again does nothing."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            if not self._spec_file.exists():
                # The collection was dropped (a finished re-index): nothing to keep.
                try:
                    self.shard.close()
                except Exception as exc:  # noqa: BLE001 - its files are gone already
                    log.debug("closing dropped collection %s: %s", self.directory, exc)
                return
            self._call(self.shard.flush, "flush")
            self._call(self.shard.close, "close")
