"""A store whose collection holds reduced vectors, speaking the embedder's space outside.

Ingest and query both go through the store, so reducing here is the one place that
guarantees they use the same projection: ``upsert`` reduces the records' vectors,
``search`` reduces the query vector, and ``get(with_vector=True)`` maps stored vectors back
into the embedder's space (``Reduction.lift``), so a stored image's vector can be searched
with like any other. The projection comes from the collection's own metadata, never from
the caller's configuration, so every process uses the exact matrix the collection was
built with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.reduction import Reduction
from shared.store.base import (
    ForwardingStore,
    Hit,
    PointRecord,
    SearchQuery,
    StoredImage,
    VectorStore,
)


class ProjectedStore(ForwardingStore):
    def __init__(self, inner: VectorStore, reduction: Reduction) -> None:
        super().__init__(inner)
        self.reduction = reduction

    @classmethod
    def around(cls, inner: VectorStore) -> VectorStore:
        """Wrap ``inner`` if its collection was built with a reduction; else return it."""
        info = (inner.stored_metadata or {}).get("imgsearch") or {}
        stored = info.get("reduction")
        if not stored:
            return inner
        reduction = Reduction.from_metadata(stored)
        if reduction.out_dim != inner.spec.dim:
            raise ConfigError(
                f"collection {inner.spec.name!r} stores {inner.spec.dim}-d vectors but its "
                f"reduction produces {reduction.out_dim}-d ones: the collection is corrupt"
            )
        return cls(inner, reduction)

    def upsert(self, records: Sequence[PointRecord]) -> None:
        if not records:
            return
        reduced = self.reduction.apply(np.stack([r.vector for r in records]))
        self.inner.upsert(
            [replace(r, vector=v) for r, v in zip(records, reduced, strict=True)]
        )

    def search(self, query: SearchQuery | np.ndarray, /, **options: Any) -> list[Hit]:
        q = SearchQuery.of(query, **options)
        return self.inner.search(replace(q, vector=self.reduction.apply(q.vector)))

    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        found = self.inner.get(image_ids, with_vector=with_vector)
        if not with_vector:
            return found
        return {
            key: StoredImage(
                item.image_id,
                item.payload,
                None if item.vector is None else self.reduction.lift(item.vector),
            )
            for key, item in found.items()
        }
