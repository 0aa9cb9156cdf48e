"""One contract, two backends: the Qdrant server client (tested through qdrant-client's
local mode, the nearest thing to a server here) and the embedded Qdrant Edge store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from shared.errors import CollectionMismatchError, StoreError
from shared.store.base import CollectionSpec, PointRecord, VectorStore
from shared.store.edge import EdgeStore
from shared.store.qdrant import QdrantStore

DIM = 16
SPEC = CollectionSpec("images", DIM, {"model_name": "test-model", "preprocessing": {"size": 8}})


def open_qdrant(path: Path, spec: CollectionSpec = SPEC) -> VectorStore:
    return QdrantStore(QdrantClient(path=str(path / "qdrant-local")), spec)


def open_edge(path: Path, spec: CollectionSpec = SPEC) -> VectorStore:
    return EdgeStore(path / "edge", spec)


Opener = Callable[..., VectorStore]


@pytest.fixture(params=[open_qdrant, open_edge], ids=["qdrant-client", "edge"])
def opener(request: pytest.FixtureRequest) -> Opener:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def store(opener: Opener, tmp_path: Path) -> Iterator[VectorStore]:
    s = opener(tmp_path)
    yield s
    s.close()


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def records(n: int, seed: int = 0) -> list[PointRecord]:
    rng = np.random.default_rng(seed)
    return [
        PointRecord(f"img-{i}", unit(rng.normal(size=DIM)),
                    {"image_id": f"img-{i}", "uri": f"file:///x/{i}.jpg",
                     "metadata": {"label": "even" if i % 2 == 0 else "odd", "n": i}})
        for i in range(n)
    ]


def test_upsert_is_idempotent(store: VectorStore) -> None:
    recs = records(20)
    store.upsert(recs)
    store.upsert(recs)  # a replay
    assert store.count() == 20


def test_search_ranks_the_exact_vector_first(store: VectorStore) -> None:
    recs = records(50)
    store.upsert(recs)
    hits = store.search(recs[7].vector, limit=5)
    assert hits[0].image_id == "img-7"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].payload["uri"] == "file:///x/7.jpg"


def test_pages_do_not_overlap_and_cover_the_ranking(store: VectorStore) -> None:
    recs = records(40)
    store.upsert(recs)
    full = [h.image_id for h in store.search(recs[0].vector, limit=30)]
    pages = [h.image_id for off in range(0, 30, 10)
             for h in store.search(recs[0].vector, limit=10, offset=off)]
    assert pages == full


def test_threshold_filters_and_exclusion(store: VectorStore) -> None:
    recs = records(40)
    store.upsert(recs)
    query = recs[4].vector
    assert all(h.score >= 0.3 for h in store.search(query, limit=40, score_threshold=0.3))
    evens = store.search(query, limit=40, filters={"label": "even"})
    assert evens and all(h.payload["metadata"]["label"] == "even" for h in evens)
    both = store.search(query, limit=40, filters={"label": "even", "n": 4})
    assert [h.image_id for h in both] == ["img-4"]
    assert "img-4" not in [h.image_id for h in store.search(query, limit=40, exclude_image_ids=["img-4"])]
    assert store.count({"label": "odd"}) == 20


def test_get_and_delete(store: VectorStore) -> None:
    recs = records(10)
    store.upsert(recs)
    got = store.get(["img-3", "missing"], with_vector=True)
    assert list(got) == ["img-3"]
    assert got["img-3"].vector is not None
    assert float(np.dot(got["img-3"].vector, recs[3].vector)) == pytest.approx(1.0, abs=1e-5)
    store.delete(["img-3", "missing"])
    assert store.count() == 9
    assert "img-3" not in [h.image_id for h in store.search(recs[3].vector, limit=10)]


def test_data_persists_across_reopen(opener: Opener, tmp_path: Path) -> None:
    s = opener(tmp_path)
    s.upsert(records(12))
    s.close()
    s = opener(tmp_path)
    try:
        assert s.count() == 12
    finally:
        s.close()


@pytest.mark.parametrize(
    "other",
    [
        CollectionSpec("images", DIM * 2, {"model_name": "bigger-model"}),
        CollectionSpec("images", DIM, {"model_name": "another-model"}),
        CollectionSpec("images", DIM, {"model_name": "test-model", "preprocessing": {"size": 9}}),
    ],
)
def test_a_collection_built_for_another_model_is_refused(opener: Opener, tmp_path: Path,
                                                         other: CollectionSpec) -> None:
    opener(tmp_path).close()
    with pytest.raises(CollectionMismatchError, match="images") as info:
        opener(tmp_path, other)
    assert not info.value.retriable


def test_embedded_store_refuses_a_second_holder(tmp_path: Path) -> None:
    first = open_edge(tmp_path)
    try:
        with pytest.raises(StoreError, match="another process") as info:
            open_edge(tmp_path)
        assert not info.value.retriable
    finally:
        first.close()
