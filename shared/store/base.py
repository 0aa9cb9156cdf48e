"""The vector store interface both backends implement, and the types it speaks."""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

import numpy as np

from shared.errors import CollectionMismatchError, ConfigError

# Point ids are derived from image ids, so a replayed event overwrites instead of duplicating.
POINT_NAMESPACE = uuid.UUID("5b0c2a5e-63a1-4d55-9a4e-8f1f0f3c9d21")

FilterValue = str | int | float | bool
# Metadata filters: {"label": "goldfinch"} matches payload metadata.label == "goldfinch".
Filters = Mapping[str, FilterValue]


# --- Crops (CROP_MODE=all, shared/detection.py) ---
# Each detected object of an image is a point of its own ("box point"), beside the image's
# own point. Box points carry the image's id as ``image_id`` (so hits group back to it)
# and again under PARENT_FIELD, which the image's own point never has: a filter on it
# finds or excludes an image's box points, and a keyword index keeps that cheap.
PARENT_FIELD = "parent_image_id"
CROP_NAMESPACE = uuid.UUID("0d8e5d8a-6c1b-4f7e-a5f3-43b8a1c2e7d4")
# Grouped search asks the store for more points until it has enough distinct images;
# never more than this many in one query.
MAX_GROUP_FETCH = 10_000


def point_id(image_id: str, crop_index: int = 0) -> str:
    """The point of an image (crop_index 0) or of its crop_index-th detected object.

    Box points use their own namespace, so no image id can collide with one.
    """
    if crop_index == 0:
        return str(uuid.uuid5(POINT_NAMESPACE, image_id))
    return str(uuid.uuid5(CROP_NAMESPACE, f"{crop_index}:{image_id}"))


# --- Facets (GET /facets, the page's filter choices) ---
# Metadata keys every collection keeps a keyword index on, so their values can be counted
# (Qdrant facets need one) and filtered on cheaply. Only `label`: it is what `imgsearch up`,
# `index` and `publish --label-from-folder` write, and every index costs on each write.
FACET_KEYS: tuple[str, ...] = ("label",)
FACET_LIMIT = 100


@dataclass(frozen=True)
class FacetCount:
    value: FilterValue
    count: int


class FacetUnavailableError(ConfigError):
    """A facet asked for on a metadata key the collection has no suitable index for."""

    reason = "facet_unavailable"


# --- Vectors: reduction and quantization ---
# Binary codes need a wider candidate list to rescore: on the birds set, recall of the exact
# float32 top 10 went 0.68 (x1), 0.96 (x4), 0.99 (x8). int8 needs none (0.985 at x1).
DEFAULT_OVERSAMPLING: dict[str, float] = {"binary": 4.0}


# --- Collection layout (QDRANT_SHARDS ... QDRANT_HNSW_EF_CONSTRUCT, docs/scaling.md) ---
@dataclass(frozen=True)
class CollectionLayout:
    """How a collection is spread and stored: not part of what its vectors mean, so a
    collection opened with another layout holds the same answers. None everywhere means
    "the engine's default" and is never checked against an existing collection."""

    shards: int | None = None
    replication_factor: int | None = None
    write_consistency: int | None = None  # replicas that must confirm each write
    write_ordering: str = "weak"  # weak | medium | strong, sent with every write
    on_disk_vectors: bool | None = None
    on_disk_payload: bool | None = None
    hnsw_m: int | None = None
    hnsw_ef_construct: int | None = None


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is built for. Stored with it; checked on every open."""

    name: str
    dim: int
    model: Mapping[str, Any] = field(default_factory=dict)  # ModelInfo.as_metadata()
    distance: str = "cosine"
    # --- Vectors: reduction and quantization (shared/reduction.py, docs/quality.md) ---
    # Reduction.to_metadata() (matrix included) to create a collection; {"identity": {...}}
    # alone is enough to open an existing one. None: the model's full vectors.
    reduction: Mapping[str, Any] | None = None
    quantization: str = "none"  # none | int8 | binary; part of the collection
    # Query-time and build-time knobs, not part of the collection's identity.
    rescore: bool = True
    oversampling: float | None = None
    indexing_threshold_kb: int | None = None
    layout: CollectionLayout = field(default_factory=CollectionLayout)
    # --- Re-index (shared/reindex/, docs/migration.md) ---
    # The settings that load this collection's model and vectors (shared/reindex/spec.py),
    # kept with it so that another process can serve it or migrate away from it. Not part
    # of the identity.
    load: Mapping[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        # The collection's own dim and distance win over the model's (they differ after a reduction).
        info: dict[str, Any] = {**self.model, "dim": self.dim, "distance": self.distance}
        if self.load:
            info["load"] = dict(self.load)
        if self.reduction is not None:
            if "matrix_b64" not in self.reduction:
                raise ConfigError(
                    f"cannot create collection {self.name!r} with a "
                    f"{self.reduction.get('identity', {}).get('method')} reduction: its matrix "
                    "is unknown. Set VECTOR_REDUCTION_FILE to a fitted projection (imgsearch "
                    "eval DATASET --variants pca:N --save-reductions DIR)."
                )
            info["reduction"] = dict(self.reduction)
        info["quantization"] = self.quantization
        return {"imgsearch": info}

    def check_vectors(self, info: Mapping[str, Any]) -> None:
        """Raise CollectionMismatchError unless the stored reduction/quantization agree."""
        want = (self.reduction or {}).get("identity")
        have = (info.get("reduction") or {}).get("identity")
        if (want is None) != (have is None) or (
            want is not None and any(have.get(k) != v for k, v in want.items())
        ):
            raise CollectionMismatchError(
                f"collection {self.name!r} was built with reduction {have or 'none'}, but "
                f"this process is configured for {want or 'none'}. Set VECTOR_REDUCTION, "
                "VECTOR_DIM and VECTOR_REDUCTION_SEED to match, or use another QDRANT_COLLECTION."
            )
        have_q = info.get("quantization", "none")
        if have_q != self.quantization:
            raise CollectionMismatchError(
                f"collection {self.name!r} was built with QUANTIZATION={have_q}, this process "
                f"has QUANTIZATION={self.quantization}; set it to {have_q} or use another "
                "QDRANT_COLLECTION"
            )

    def check_compatible(self, stored: Mapping[str, Any] | None, stored_dim: int) -> None:
        """Raise CollectionMismatchError if the stored collection was built otherwise."""
        info = (stored or {}).get("imgsearch") or {}
        self.check_vectors(info)
        want_model = self.model.get("model_name")
        have_model = info.get("model_name")
        if stored_dim != self.dim or (want_model and have_model and want_model != have_model):
            raise CollectionMismatchError(
                f"collection {self.name!r} holds {stored_dim}-d vectors from model "
                f"{have_model or 'unknown'}, but this process embeds {self.dim}-d vectors "
                f"with {want_model}. Use another QDRANT_COLLECTION, or MODEL_NAME={have_model}."
            )
        want_pre = self.model.get("preprocessing")
        have_pre = info.get("preprocessing")
        if want_pre and have_pre and want_pre != have_pre:
            raise CollectionMismatchError(
                f"collection {self.name!r} was built with preprocessing {have_pre}, "
                f"this process uses {want_pre}; queries would not match the gallery"
            )


@dataclass(frozen=True)
class PointRecord:
    image_id: str
    vector: np.ndarray
    payload: dict[str, Any]
    crop_index: int = 0  # 0: the image's own point; k >= 1: its k-th box point

    @property
    def point_id(self) -> str:
        return point_id(self.image_id, self.crop_index)


@dataclass(frozen=True)
class Hit:
    image_id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class StoredImage:
    image_id: str
    payload: dict[str, Any]
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchQuery:
    """One search, as every store and decorator receives it: the vector, the page, the
    score threshold, the metadata filters and the images to leave out. Results are
    grouped by image (each image once, at its best point)."""

    vector: np.ndarray
    limit: int = 10
    offset: int = 0
    score_threshold: float | None = None
    filters: Filters | None = None
    exclude_image_ids: Sequence[str] = ()
    with_payload: bool = True

    @classmethod
    def of(cls, query: SearchQuery | np.ndarray, **options: Any) -> SearchQuery:
        """``query`` itself (with ``options`` replaced), or a query for a bare vector."""
        if isinstance(query, SearchQuery):
            return replace(query, **options) if options else query
        return cls(np.asarray(query), **options)


class VectorStore(abc.ABC):
    """One collection of image vectors. Every method raises StoreError on failure;
    ``upsert`` and ``delete`` return only once the write is durable.

    An image is its own point plus, with CROP_MODE=all, one box point per detected
    object. Every method speaks of images: ``upsert`` replaces an image's box points with
    those in the batch, ``delete`` removes them all, ``search`` returns each image once
    (at its best-matching point), ``count`` counts images.

    Implementations: the backends (shared/store/points.py's CollectionStore, under
    edge.py and qdrant.py) and decorators (ForwardingStore below: projection, the tests'
    fault injection, the API's pinned serving store).
    """

    spec: CollectionSpec
    # The collection's metadata as stored (CollectionSpec.metadata() of its creator).
    stored_metadata: Mapping[str, Any] | None = None

    @abc.abstractmethod
    def upsert(self, records: Sequence[PointRecord]) -> None: ...

    @abc.abstractmethod
    def delete(self, image_ids: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def search(self, query: SearchQuery | np.ndarray, /, **options: Any) -> list[Hit]:
        """Search with a SearchQuery; ``search(vector, limit=5)`` is shorthand for
        ``search(SearchQuery(vector, limit=5))``."""

    @abc.abstractmethod
    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        """Stored images by id; missing ids are absent from the result."""

    @abc.abstractmethod
    def count(self, filters: Filters | None = None) -> int: ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreError unless the store answers."""

    def optimize(self) -> None:
        """Build search indexes now, where the backend needs to be told (the embedded one)."""

    # --- Facets and listing: the page's filter choices, `imgsearch up`'s folder mirror ---
    # Payload-only reads: they never touch a vector.

    @abc.abstractmethod
    def facets(self, key: str, *, limit: int = FACET_LIMIT) -> list[FacetCount]:
        """The stored values of metadata ``key`` with how many images have each, most
        frequent first, at most ``limit``. Box points are not counted. Raises
        FacetUnavailableError for a key the collection has no facet index for."""

    @abc.abstractmethod
    def scroll_page(self, fields: Sequence[str] = ("image_id", "uri"), *, offset: Any = None,
                    limit: int = 1000) -> tuple[list[StoredImage], Any]:
        """One page of images (their own points, not box points) with only ``fields`` of
        their payload, no vectors, from ``offset`` (None: the start); and the offset of the
        next page (None after the last). Offsets are point ids, JSON-serialisable, so a
        long scan (a re-index) can resume where it stopped."""

    def scroll_images(self, fields: Sequence[str] = ("image_id", "uri"), *,
                      batch_size: int = 1000) -> Iterator[StoredImage]:
        """Every image, page after page (see ``scroll_page``)."""
        offset: Any = None
        while True:
            images, offset = self.scroll_page(fields, offset=offset, limit=batch_size)
            yield from images
            if offset is None or not images:
                return

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ForwardingStore(VectorStore):
    """A decorator: every call goes to ``inner``. Subclasses override the calls they
    change (ProjectedStore: vectors in and out) or ``_forward`` to act before any call
    (the tests' FlakyStore), and may make ``inner`` a property (the API's store pinned to
    the collection a request is served from)."""

    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner

    def _forward(self, what: str) -> VectorStore:
        """The store that serves this call (``what`` names it, for subclasses)."""
        return self.inner

    @property  # type: ignore[override]
    def spec(self) -> CollectionSpec:
        return self.inner.spec

    @property  # type: ignore[override]
    def stored_metadata(self) -> Mapping[str, Any] | None:
        return self.inner.stored_metadata

    def upsert(self, records: Sequence[PointRecord]) -> None:
        self._forward("upsert").upsert(records)

    def delete(self, image_ids: Sequence[str]) -> None:
        self._forward("delete").delete(image_ids)

    def search(self, query: SearchQuery | np.ndarray, /, **options: Any) -> list[Hit]:
        return self._forward("search").search(SearchQuery.of(query, **options))

    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        return self._forward("get").get(image_ids, with_vector=with_vector)

    def count(self, filters: Filters | None = None) -> int:
        return self._forward("count").count(filters)

    def ping(self) -> None:
        self._forward("ping").ping()

    def optimize(self) -> None:
        self._forward("optimize").optimize()

    def facets(self, key: str, *, limit: int = FACET_LIMIT) -> list[FacetCount]:
        return self._forward("facets").facets(key, limit=limit)

    def scroll_page(self, fields: Sequence[str] = ("image_id", "uri"), *, offset: Any = None,
                    limit: int = 1000) -> tuple[list[StoredImage], Any]:
        return self._forward("scroll").scroll_page(fields, offset=offset, limit=limit)

    def close(self) -> None:
        self.inner.close()


def innermost(store: VectorStore) -> VectorStore:
    """The backend under any decorators."""
    while isinstance(store, ForwardingStore):
        store = store.inner
    return store


def group_hits(fetch: Callable[[int], list[Hit]], *, limit: int, offset: int) -> list[Hit]:
    """Page ``offset:offset+limit`` of distinct images from a point search.

    ``fetch(n)`` returns the best ``n`` points, best first. An image whose box points
    also match appears once, with its best point. Without box points the first fetch
    already holds enough distinct images, so this costs one query.
    """
    want = offset + limit
    size = want
    while True:
        points = fetch(size)
        images = best_per_image(points)
        if len(images) >= want or len(points) < size or size >= MAX_GROUP_FETCH:
            return images[offset:want]
        size = min(MAX_GROUP_FETCH, size * 4)


def best_per_image(hits: Sequence[Hit]) -> list[Hit]:
    """Each image's best hit, best first (hits of an image's box points fold into it)."""
    best: dict[str, Hit] = {}
    for hit in sorted(hits, key=lambda h: h.score, reverse=True):
        best.setdefault(hit.image_id, hit)
    return list(best.values())


# Integers up to 2**53 are exact as doubles, which Qdrant compares ranges in.
_EXACT_AS_FLOAT = 2**53


def numeric_match(value: FilterValue) -> float | None:
    """The number a filter value must equal, matched as a range ``[v, v]`` so that ``3``
    finds both 3 and 3.0 (JSON does not tell them apart); None for text, booleans and
    integers too large to compare as doubles (those match exactly)."""
    if isinstance(value, (bool, str)):
        return None
    if isinstance(value, int) and abs(value) > _EXACT_AS_FLOAT:
        return None
    return float(value)


def payload_key(filter_key: str) -> str:
    """Filter keys name metadata fields; the payload nests them under ``metadata``."""
    return f"metadata.{filter_key}"
