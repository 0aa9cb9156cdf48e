"""The vector store interface both backends implement, and the types it speaks."""

from __future__ import annotations

import abc
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.errors import CollectionMismatchError

# Point ids are derived from image ids, so a replayed event overwrites instead of duplicating.
POINT_NAMESPACE = uuid.UUID("5b0c2a5e-63a1-4d55-9a4e-8f1f0f3c9d21")

FilterValue = str | int | float | bool
# Metadata filters: {"label": "goldfinch"} matches payload metadata.label == "goldfinch".
Filters = Mapping[str, FilterValue]


def point_id(image_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, image_id))


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is built for. Stored with it; checked on every open."""

    name: str
    dim: int
    model: Mapping[str, Any] = field(default_factory=dict)  # ModelInfo.as_metadata()
    distance: str = "cosine"

    def metadata(self) -> dict[str, Any]:
        return {"imgsearch": {"dim": self.dim, "distance": self.distance, **self.model}}

    def check_compatible(self, stored: Mapping[str, Any] | None, stored_dim: int) -> None:
        """Raise CollectionMismatchError if the stored collection was built otherwise."""
        info = (stored or {}).get("imgsearch") or {}
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


class VectorStore(abc.ABC):
    """One collection of image vectors. Every method raises StoreError on failure;
    ``upsert`` and ``delete`` return only once the write is durable."""

    spec: CollectionSpec

    @abc.abstractmethod
    def upsert(self, records: Sequence[PointRecord]) -> None: ...

    @abc.abstractmethod
    def delete(self, image_ids: Sequence[str]) -> None: ...

    @abc.abstractmethod
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
    ) -> list[Hit]: ...

    @abc.abstractmethod
    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> dict[str, StoredImage]:
        """Stored images by id; missing ids are absent from the result."""

    @abc.abstractmethod
    def count(self, filters: Filters | None = None) -> int: ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreError unless the store answers."""

    def optimize(self) -> None:
        """Give the store a chance to build indexes while the writer is idle."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def payload_key(filter_key: str) -> str:
    """Filter keys name metadata fields; the payload nests them under ``metadata``."""
    return f"metadata.{filter_key}"
