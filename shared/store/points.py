"""What both backends do the same way, over the few calls their SDKs spell differently.

``CollectionStore`` implements the VectorStore interface once: how an image maps to its
points (its own point, and its box points under PARENT_FIELD), which filter each call
needs, how writes are ordered, how hits group back into images. A backend (edge.py,
qdrant.py) implements only the SDK calls underneath: run one ordered write, query, retrieve,
count, scroll a page, count facet values, and turn the SDK-neutral filter below into its
own. Errors come out as StoreError from the backend's ``_call``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.store.base import (
    FACET_KEYS,
    FACET_LIMIT,
    PARENT_FIELD,
    FacetCount,
    FacetUnavailableError,
    Filters,
    FilterValue,
    Hit,
    PointRecord,
    SearchQuery,
    StoredImage,
    VectorStore,
    group_hits,
    numeric_match,
    payload_key,
    point_id,
)

# -- an SDK-neutral filter ----------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """``key`` equals ``value`` exactly (text, booleans, integers past 2**53)."""

    key: str
    value: FilterValue


@dataclass(frozen=True)
class Range:
    """``key`` is a number in ``[gte, lte]`` (so 3 finds 3 and 3.0)."""

    key: str
    gte: float
    lte: float


@dataclass(frozen=True)
class MatchAny:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class IsEmpty:
    key: str


@dataclass(frozen=True)
class HasId:
    point_ids: tuple[str, ...]


Condition = Match | Range | MatchAny | IsEmpty | HasId


@dataclass(frozen=True)
class PointFilter:
    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


def metadata_condition(key: str, value: FilterValue) -> Condition:
    number = numeric_match(value)
    path = payload_key(key)
    return Match(path, value) if number is None else Range(path, number, number)


def box_points_of(image_ids: Sequence[str]) -> MatchAny:
    """The box points of these images."""
    return MatchAny(PARENT_FIELD, tuple(image_ids))


OWN_POINTS = IsEmpty(PARENT_FIELD)  # an image's own point, not its box points


def point_filter(filters: Filters | None, exclude_ids: Sequence[str] = (), *,
                 images_only: bool = False) -> PointFilter | None:
    must: list[Condition] = [metadata_condition(k, v) for k, v in (filters or {}).items()]
    if images_only:
        must.append(OWN_POINTS)
    must_not: list[Condition] = []
    if exclude_ids:  # an excluded image takes its box points with it
        must_not += [HasId(tuple(point_id(i) for i in exclude_ids)), box_points_of(exclude_ids)]
    if not must and not must_not:
        return None
    return PointFilter(tuple(must), tuple(must_not))


# -- ordered writes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upsert:
    records: Sequence[PointRecord]


@dataclass(frozen=True)
class DeleteWhere:
    where: PointFilter


@dataclass(frozen=True)
class DeleteIds:
    point_ids: tuple[str, ...]


WriteOp = Upsert | DeleteWhere | DeleteIds


@dataclass
class Page:
    """One page of a scroll: payloads, and where the next page starts (None: the end)."""

    payloads: list[dict[str, Any]]
    next_offset: Any = None


class NoFacetIndex(Exception):
    """Raised by a backend's ``_facet_counts`` for a field it cannot count by value."""


class CollectionStore(VectorStore):
    """The VectorStore both backends are: shared logic over abstract SDK calls."""

    # -- the SDK calls a backend implements ---------------------------------------------------

    @abc.abstractmethod
    def _write(self, operations: Sequence[WriteOp], what: str) -> None:
        """Apply ``operations`` in order and make them durable before returning."""

    @abc.abstractmethod
    def _query(self, query: SearchQuery, where: PointFilter | None,
               n: int) -> list[tuple[float, dict[str, Any]]]:
        """The best ``n`` points for ``query.vector``: (score, payload), best first."""

    @abc.abstractmethod
    def _retrieve(self, point_ids: Sequence[str],
                  with_vector: bool) -> list[tuple[dict[str, Any], list[float] | None]]:
        """(payload, vector or None) of the points that exist."""

    @abc.abstractmethod
    def _count(self, where: PointFilter | None) -> int: ...

    @abc.abstractmethod
    def _scroll(self, where: PointFilter, fields: Sequence[str], offset: Any,
                limit: int) -> Page: ...

    @abc.abstractmethod
    def _facet_counts(self, field: str, where: PointFilter,
                      limit: int) -> list[FacetCount]:
        """Counts by value; raises NoFacetIndex when ``field`` cannot be counted."""

    @abc.abstractmethod
    def _store_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the collection's stored metadata (CollectionSpec.metadata())."""

    def record_load(self, load: Mapping[str, Any]) -> None:
        """Keep how to load this collection's model in its metadata, for a collection made
        before that was kept (shared/reindex/spec.py): a re-index must be able to serve it
        while it builds the next one."""
        metadata = dict(self.stored_metadata or {})
        info = dict(metadata.get("imgsearch") or {})
        if info.get("load") == dict(load):
            return
        info["load"] = dict(load)
        metadata["imgsearch"] = info
        self._store_metadata(metadata)
        self.stored_metadata = metadata

    # -- the interface, once ----------------------------------------------------------------------

    def upsert(self, records: Sequence[PointRecord]) -> None:
        if not records:
            return
        images = sorted({r.image_id for r in records if r.crop_index == 0})
        operations: list[WriteOp] = []
        if images:  # the images' old box points go first; the batch brings the current ones
            operations.append(DeleteWhere(PointFilter(must=(box_points_of(images),))))
        operations.append(Upsert(records))
        self._write(operations, "upsert")

    def delete(self, image_ids: Sequence[str]) -> None:
        if not image_ids:
            return
        self._write([DeleteWhere(PointFilter(must=(box_points_of(image_ids),))),
                     DeleteIds(tuple(point_id(i) for i in image_ids))], "delete")

    def search(self, query: SearchQuery | np.ndarray, /, **options: Any) -> list[Hit]:
        q = SearchQuery.of(query, **options)
        q = SearchQuery.of(q, vector=np.asarray(q.vector, dtype=np.float32))
        where = point_filter(q.filters, q.exclude_image_ids)

        def points(n: int) -> list[Hit]:
            # Vectors are unit length, so a score is a cosine: at most 1. float32 rounding
            # makes a self-match 1.0000001, which clients would show as more than identical.
            return [Hit(str(payload["image_id"]), min(float(score), 1.0), dict(payload))
                    for score, payload in self._query(q, where, n) if payload]

        return group_hits(points, limit=q.limit, offset=q.offset)

    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        if not image_ids:
            return {}
        found = {}
        for payload, vector in self._retrieve([point_id(i) for i in image_ids], with_vector):
            array = np.asarray(vector, dtype=np.float32) if with_vector and vector else None
            found[str(payload["image_id"])] = StoredImage(payload["image_id"], dict(payload),
                                                          array)
        return found

    def count(self, filters: Filters | None = None) -> int:
        return self._count(point_filter(filters, images_only=True))

    def facets(self, key: str, *, limit: int = FACET_LIMIT) -> list[FacetCount]:
        try:
            return self._facet_counts(payload_key(key), PointFilter(must=(OWN_POINTS,)), limit)
        except NoFacetIndex as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise FacetUnavailableError(
                f"metadata {key!r} has no keyword, integer or boolean index in collection "
                f"{self.spec.name!r}, so its values cannot be counted; facet keys: "
                f"{', '.join(FACET_KEYS)}{detail}"
            ) from exc

    def scroll_page(self, fields: Sequence[str] = ("image_id", "uri"), *, offset: Any = None,
                    limit: int = 1000) -> tuple[list[StoredImage], Any]:
        page = self._scroll(PointFilter(must=(OWN_POINTS,)), sorted({"image_id", *fields}),
                            offset, limit)
        images = [StoredImage(str(p["image_id"]), dict(p)) for p in page.payloads
                  if "image_id" in p]
        return images, page.next_offset
