"""A Qdrant server through qdrant-client (production), or qdrant-client's local mode (tests)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from shared.errors import CollectionMismatchError, ConfigError, StoreError, StoreRejectedError
from shared.store.aliases import LIVE_SUFFIX, RECORD_SUFFIX, Catalog, is_physical_of
from shared.store.base import (
    FACET_KEYS,
    PARENT_FIELD,
    CollectionLayout,
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


# --- Collection layout (shards, replicas, write consistency, on disk, HNSW) ---
def _hnsw_config(layout: CollectionLayout) -> models.HnswConfigDiff | None:
    if layout.hnsw_m is None and layout.hnsw_ef_construct is None:
        return None
    return models.HnswConfigDiff(m=layout.hnsw_m, ef_construct=layout.hnsw_ef_construct)


def _check_layout(name: str, layout: CollectionLayout, info: models.CollectionInfo) -> None:
    """Compare the configured layout with an existing collection's.

    Shards and replicas decide where every point lives and what a node failure costs; a
    process configured for another plan refuses to start (CollectionMismatchError) rather
    than run on a layout the capacity plan did not size. The rest can be changed on the
    live collection, so a difference is a warning that gives the request to send.
    Values the server does not report (None, as in qdrant-client's local mode) are skipped.
    """
    params = info.config.params
    vectors = params.vectors if isinstance(params.vectors, models.VectorParams) else None
    hnsw = info.config.hnsw_config
    fixed = [
        ("QDRANT_SHARDS", layout.shards, params.shard_number, "shard(s)"),
        ("QDRANT_REPLICATION_FACTOR", layout.replication_factor, params.replication_factor,
         "replica(s) per shard"),
    ]
    for variable, want, have, what in fixed:
        if want is None or have is None or want == have:
            continue
        if variable == "QDRANT_SHARDS":
            how = (
                "Shards are fixed when a collection is created. To keep this collection, set "
                f"{variable}={have} (or unset it); to move to {want} shards, create a new "
                f"collection (another QDRANT_COLLECTION with {variable}={want}), publish the "
                "images into it and switch the API over (docs/operations.md, 'Change a "
                "collection's layout')."
            )
        else:
            how = (
                f"Existing shards do not gain or lose replicas by themselves. To keep it, set "
                f"{variable}={have} (or unset it); to change it, send PATCH /collections/{name} "
                f'{{"params": {{"replication_factor": {want}}}}} and then add or drop each '
                "shard's replicas with POST /collections/" + name + "/cluster "
                "(replicate_shard / drop_replica), as docs/operations.md, 'Change a "
                "collection's layout', shows."
            )
        raise CollectionMismatchError(
            f"collection {name!r} has {have} {what}, but this process has {variable}={want}. "
            + how
        )
    adjustable = [
        ("QDRANT_WRITE_CONSISTENCY", layout.write_consistency, params.write_consistency_factor,
         {"params": {"write_consistency_factor": layout.write_consistency}}),
        ("QDRANT_ON_DISK_PAYLOAD", layout.on_disk_payload, params.on_disk_payload,
         {"params": {"on_disk_payload": layout.on_disk_payload}}),
        # A server reports on_disk unset for vectors kept in RAM, Qdrant's default.
        ("QDRANT_ON_DISK_VECTORS", layout.on_disk_vectors,
         bool(vectors.on_disk) if vectors is not None else None,
         {"vectors": {"": {"on_disk": layout.on_disk_vectors}}}),
        ("QDRANT_HNSW_M", layout.hnsw_m, hnsw.m if hnsw else None,
         {"hnsw_config": {"m": layout.hnsw_m}}),
        ("QDRANT_HNSW_EF_CONSTRUCT", layout.hnsw_ef_construct,
         hnsw.ef_construct if hnsw else None,
         {"hnsw_config": {"ef_construct": layout.hnsw_ef_construct}}),
    ]
    for variable, want, have, patch in adjustable:
        if want is None or have is None or want == have:
            continue
        log.warning(
            "collection %r has %s, but %s=%s: the collection's value applies. To change it, "
            "send PATCH /collections/%s %s (Qdrant rebuilds in the background), or set %s=%s",
            name, f"{variable.removeprefix('QDRANT_').lower()}={have}", variable, want, name,
            json.dumps(patch), variable, have,
        )


def _already_exists(exc: UnexpectedResponse) -> bool:
    # 409 from Qdrant 1.x servers that have the AlreadyExists error; 400 from older ones.
    return exc.status_code == 409 or (
        exc.status_code == 400 and b"already exists" in (exc.content or b""))


def _sdk_filter(where: PointFilter | None) -> models.Filter | None:
    if where is None:
        return None
    return models.Filter(must=[_condition(c) for c in where.must] or None,
                         must_not=[_condition(c) for c in where.must_not] or None)


def _condition(c: Condition) -> Any:
    if isinstance(c, Range):
        return models.FieldCondition(key=c.key, range=models.Range(gte=c.gte, lte=c.lte))
    if isinstance(c, Match):
        return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))
    if isinstance(c, MatchAny):
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.values)))
    if isinstance(c, IsEmpty):
        return models.IsEmptyCondition(is_empty=models.PayloadField(key=c.key))
    assert isinstance(c, HasId)
    return models.HasIdCondition(has_id=list(c.point_ids))


class QdrantStore(CollectionStore):
    def __init__(self, client: QdrantClient, spec: CollectionSpec, *, create: bool = True) -> None:
        self.client = client
        self.spec = spec
        self._ordering = models.WriteOrdering(spec.layout.write_ordering)
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
        except UnexpectedResponse as exc:
            status = exc.status_code or 0
            if 400 <= status < 500 and status not in (408, 429):
                # The server refused this request as invalid: retrying it cannot help.
                raise StoreRejectedError(
                    f"Qdrant {what} refused (HTTP {status}): {str(exc)[:500]}") from exc
            raise StoreError(f"Qdrant {what} failed (HTTP {status}): {str(exc)[:500]}") from exc
        except Exception as exc:  # qdrant-client raises httpx, grpc and its own errors
            raise StoreError(f"Qdrant {what} failed: {type(exc).__name__}: {exc}") from exc

    def _ensure_collection(self, create: bool) -> None:
        name = self.spec.name
        if not self.client.collection_exists(name):
            if not create:
                raise StoreError(f"collection {name!r} does not exist", retriable=False)
            metadata = self.spec.metadata()
            layout = self.spec.layout
            log.info("creating collection %r (%d-d, %s, %s)", name, self.spec.dim,
                     self.spec.distance, layout)
            threshold = self.spec.indexing_threshold_kb
            try:
                self._create(name, metadata, layout, threshold)
            except UnexpectedResponse as exc:
                # Workers and API replicas start together: one creates the collection, the
                # others open it (and check it, as any existing collection) instead of failing.
                if not _already_exists(exc):
                    raise
                log.info("collection %r was created by another process meanwhile", name)
            else:
                self.stored_metadata = metadata
                self._index_parents()
                self._index_facet_keys()
                return
        info = self.client.get_collection(name)
        vectors = info.config.params.vectors
        stored_dim = vectors.size if isinstance(vectors, models.VectorParams) else -1
        self.spec.check_compatible(info.config.metadata, stored_dim)
        _check_layout(name, self.spec.layout, info)
        self.stored_metadata = info.config.metadata or {}
        if PARENT_FIELD not in (info.payload_schema or {}):
            self._index_parents()  # a collection created before box points existed
        if any(payload_key(k) not in (info.payload_schema or {}) for k in FACET_KEYS):
            self._index_facet_keys()  # a collection created before facets existed

    def _create(self, name: str, metadata: dict[str, Any], layout: CollectionLayout,
                threshold: int | None) -> None:
        self.client.create_collection(
            name,
            vectors_config=models.VectorParams(
                size=self.spec.dim, distance=_DISTANCES[self.spec.distance],
                on_disk=layout.on_disk_vectors,
            ),
            shard_number=layout.shards,
            replication_factor=layout.replication_factor,
            write_consistency_factor=layout.write_consistency,
            on_disk_payload=layout.on_disk_payload,
            hnsw_config=_hnsw_config(layout),
            metadata=metadata,
            quantization_config=_quantization_config(self.spec.quantization),
            optimizers_config=(
                models.OptimizersConfigDiff(indexing_threshold=threshold) if threshold else None
            ),
        )

    def _index_parents(self) -> None:
        # Every upsert and delete filters on the parent field: keep that an index lookup.
        with warnings.catch_warnings():
            # Local mode (tests, scripts) scans instead and says so; a server builds the index.
            warnings.filterwarnings("ignore", "Payload indexes have no effect in the local Qdrant")
            self.client.create_payload_index(
                self.spec.name, PARENT_FIELD, field_schema=models.PayloadSchemaType.KEYWORD,
                wait=True,
            )

    def _index_facet_keys(self) -> None:
        # GET /facets counts these keys' values; a server needs a keyword index for that.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Payload indexes have no effect in the local Qdrant")
            for key in FACET_KEYS:
                self.client.create_payload_index(
                    self.spec.name, payload_key(key),
                    field_schema=models.PayloadSchemaType.KEYWORD, wait=True,
                )

    # -- the SDK calls (shared/store/points.py has the logic) ------------------------------------

    def _write(self, operations: Sequence[WriteOp], what: str) -> None:
        ops: list[Any] = []
        for op in operations:
            if isinstance(op, Upsert):
                ops.append(models.UpsertOperation(upsert=models.PointsList(points=[
                    models.PointStruct(id=r.point_id, vector=r.vector.astype(np.float32).tolist(),
                                       payload=r.payload)
                    for r in op.records])))
            elif isinstance(op, DeleteWhere):
                ops.append(models.DeleteOperation(
                    delete=models.FilterSelector(filter=_sdk_filter(op.where))))
            else:
                assert isinstance(op, DeleteIds)
                ops.append(models.DeleteOperation(
                    delete=models.PointIdsList(points=list(op.point_ids))))
        # One ordered request. wait=True: Qdrant answers once the writes are applied and in
        # its WAL, on at least QDRANT_WRITE_CONSISTENCY replicas of each shard (a shortfall
        # is a retriable error).
        self._call(
            lambda: self.client.batch_update_points(
                self.spec.name, ops, wait=True, ordering=self._ordering
            ),
            what,
        )

    def _query(self, query: SearchQuery, where: PointFilter | None,
               n: int) -> list[tuple[float, dict[str, Any]]]:
        response = self._call(
            lambda: self.client.query_points(
                self.spec.name,
                query=query.vector.tolist(),
                limit=n,
                score_threshold=query.score_threshold,
                query_filter=_sdk_filter(where),
                with_payload=True if query.with_payload else ["image_id"],
                search_params=_search_params(self.spec),
            ),
            "search",
        )
        return [(float(p.score), p.payload) for p in response.points if p.payload]

    def _retrieve(self, point_ids: Sequence[str],
                  with_vector: bool) -> list[tuple[dict[str, Any], list[float] | None]]:
        records = self._call(
            lambda: self.client.retrieve(self.spec.name, ids=list(point_ids), with_payload=True,
                                         with_vectors=with_vector),
            "retrieve",
        )
        return [(dict(r.payload or {}), r.vector if isinstance(r.vector, list) else None)
                for r in records]

    def _count(self, where: PointFilter | None) -> int:
        result = self._call(
            lambda: self.client.count(self.spec.name, count_filter=_sdk_filter(where), exact=True),
            "count",
        )
        return int(result.count)

    def _scroll(self, where: PointFilter, fields: Sequence[str], offset: Any,
                limit: int) -> Page:
        records, next_offset = self._call(
            lambda: self.client.scroll(self.spec.name, scroll_filter=_sdk_filter(where),
                                       limit=limit, offset=offset, with_payload=list(fields),
                                       with_vectors=False),
            "scroll",
        )
        return Page([dict(r.payload or {}) for r in records], next_offset)

    def _store_metadata(self, metadata: dict[str, Any]) -> None:
        # Qdrant merges metadata by top-level key: the "imgsearch" key is replaced whole.
        self._call(lambda: self.client.update_collection(self.spec.name, metadata=metadata),
                   "update metadata")

    def _facet_counts(self, field: str, where: PointFilter, limit: int) -> list[FacetCount]:
        try:
            found = self._call(
                lambda: self.client.facet(self.spec.name, field, limit=limit, exact=True,
                                          facet_filter=_sdk_filter(where)),
                "facets",
            )
        except StoreRejectedError as exc:
            # A server answers 400 for a field without a keyword, integer or bool index.
            raise NoFacetIndex(str(exc)) from exc
        return [FacetCount(h.value, int(h.count)) for h in found.hits]

    def ping(self) -> None:
        # collection_exists, not get_collection: the latter ships the whole collection
        # metadata, which holds a stored projection matrix (megabytes) when one is used.
        if not self._call(lambda: self.client.collection_exists(self.spec.name), "ping"):
            # Not an outage: someone deleted it. Writing on would lose events.
            raise StoreError(f"collection {self.spec.name!r} is gone from {self.client}",
                             retriable=False)

    def close(self) -> None:
        self.client.close()


# --- Re-index: aliases and migration records (shared/store/aliases.py) ---


class QdrantCatalog(Catalog):
    """Qdrant aliases as the pointers, collection metadata as the migration records."""

    def __init__(self, client: QdrantClient, *, owns_client: bool = False) -> None:
        self.client = client
        self._owns_client = owns_client

    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None,
                timeout_s: float = 10.0) -> QdrantCatalog:
        client = QdrantClient(url=url, api_key=api_key, timeout=int(max(1, timeout_s)))
        return cls(client, owns_client=True)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except (StoreError, ConfigError):
            raise
        except UnexpectedResponse as exc:
            raise StoreError(f"Qdrant {what} failed (HTTP {exc.status_code}): "
                             f"{str(exc)[:500]}") from exc
        except Exception as exc:  # qdrant-client raises httpx, grpc and its own errors
            raise StoreError(f"Qdrant {what} failed: {type(exc).__name__}: {exc}") from exc

    def _aliases(self) -> dict[str, str]:
        found = self._call(self.client.get_aliases, "list aliases")
        return {a.alias_name: a.collection_name for a in found.aliases}

    def pointer(self, logical: str) -> str | None:
        aliases = self._aliases()
        return aliases.get(logical) or aliases.get(logical + LIVE_SUFFIX)

    def exists(self, physical: str) -> bool:
        # collection_exists is true for an alias too: only a real collection counts here.
        if physical in self._aliases():
            return False
        return bool(self._call(lambda: self.client.collection_exists(physical), "exists"))

    def collections(self, logical: str) -> list[str]:
        found = self._call(self.client.get_collections, "list collections")
        return sorted(c.name for c in found.collections if is_physical_of(logical, c.name))

    def stored_metadata(self, physical: str) -> Mapping[str, Any] | None:
        if not self.exists(physical):
            return None
        info = self._call(lambda: self.client.get_collection(physical), "read collection")
        return info.config.metadata or {}

    def _alias_ops(self, logical: str, physical: str | None) -> list[Any]:
        """Operations that leave exactly one pointer for ``logical``, to ``physical`` (None:
        no pointer, the first collection serves under its own name)."""
        aliases = self._aliases()
        ops: list[Any] = [
            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name))
            for name in (logical, logical + LIVE_SUFFIX) if name in aliases]
        if physical is not None:
            first_exists = self._call(lambda: self.client.collection_exists(logical), "exists") \
                and logical not in aliases
            name = logical + LIVE_SUFFIX if first_exists else logical
            ops.append(models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=physical, alias_name=name)))
        return ops

    def switch(self, logical: str, physical: str) -> None:
        if not self.exists(physical):
            raise CollectionMismatchError(f"collection {physical!r} does not exist")
        ops = self._alias_ops(logical, None if physical == logical else physical)
        if ops:  # one request: Qdrant applies all of it or none
            self._call(lambda: self.client.update_collection_aliases(
                change_aliases_operations=ops), "switch alias")

    def drop(self, logical: str, physical: str) -> None:
        self._refuse_serving(logical, physical)
        if self.exists(physical):
            self._call(lambda: self.client.delete_collection(physical), "drop collection")
        if physical == logical:
            # The first collection's name is free now: the pointer takes it.
            serving = self.pointer(logical)
            if serving is not None:
                ops = self._alias_ops(logical, serving)
                self._call(lambda: self.client.update_collection_aliases(
                    change_aliases_operations=ops), "move alias")

    def read_record(self, logical: str) -> dict[str, Any] | None:
        name = logical + RECORD_SUFFIX
        if not self._call(lambda: self.client.collection_exists(name), "read record"):
            return None
        info = self._call(lambda: self.client.get_collection(name), "read record")
        record = {k: v for k, v in (info.config.metadata or {}).items() if v is not None}
        return record or None

    def update_record(self, logical: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        name = logical + RECORD_SUFFIX
        body = dict(patch)
        if not self._call(lambda: self.client.collection_exists(name), "write record"):
            try:  # metadata only: one dimension, never a point
                self._call(lambda: self.client.create_collection(
                    name, vectors_config=models.VectorParams(size=1,
                                                             distance=models.Distance.COSINE),
                    metadata={k: v for k, v in body.items() if v is not None}),
                    "create record")
            except StoreError:
                if not self._call(lambda: self.client.collection_exists(name), "write record"):
                    raise
            else:
                return self.read_record(logical) or {}
        # Qdrant merges metadata by top-level key; a null value is read as absent.
        self._call(lambda: self.client.update_collection(name, metadata=body), "write record")
        return self.read_record(logical) or {}

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
