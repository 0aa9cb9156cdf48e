"""One contract, two backends: the Qdrant server client (tested through qdrant-client's
local mode, the nearest thing to a server here) and the embedded Qdrant Edge store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from shared.errors import CollectionMismatchError, StoreError
from shared.store.base import PARENT_FIELD, CollectionSpec, PointRecord, VectorStore
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


# -- box points (CROP_MODE=all): an image's detected objects are points of their own ---------


def with_boxes(image_id: str, vectors: list[np.ndarray], label: str = "x") -> list[PointRecord]:
    """The image's own point (vectors[0]) and one box point per further vector."""
    base = {"image_id": image_id, "uri": f"file:///x/{image_id}.jpg", "metadata": {"label": label}}
    own = PointRecord(image_id, vectors[0], {**base, "box_points": len(vectors) - 1})
    boxes = [PointRecord(image_id, v, {**base, PARENT_FIELD: image_id, "crop": {"box": [k]}},
                         crop_index=k)
             for k, v in enumerate(vectors[1:], start=1)]
    return [own, *boxes]


def points_in(store: VectorStore) -> int:
    """Every point, box points included: what the store holds underneath."""
    if isinstance(store, EdgeStore):
        import qdrant_edge as qe

        return int(store.shard.count(qe.CountRequest(exact=True)))
    assert isinstance(store, QdrantStore)
    return int(store.client.count(store.spec.name, exact=True).count)


def test_box_points_count_once_and_search_returns_each_image_once(store: VectorStore) -> None:
    rng = np.random.default_rng(3)
    target = unit(rng.normal(size=DIM))
    near = [unit(target + 0.05 * rng.normal(size=DIM)) for _ in range(4)]
    store.upsert(with_boxes("scene", [near[0], near[1], near[2]]))  # two objects like target
    store.upsert(with_boxes("other", [near[3]]))
    store.upsert(records(30, seed=4))
    assert store.count() == 32 and points_in(store) == 34

    hits = store.search(target, limit=10)
    ids = [h.image_id for h in hits]
    assert len(ids) == len(set(ids)) == 10, ids
    assert set(ids[:2]) == {"scene", "other"}
    # The image's best point stands for it, and it says which part matched.
    scene = next(h for h in hits if h.image_id == "scene")
    assert scene.score == pytest.approx(max(float(v @ target) for v in near[:3]), abs=1e-4)
    # Paging over images, not points: pages neither overlap nor skip.
    pages = [h.image_id for off in (0, 5) for h in store.search(target, limit=5, offset=off)]
    assert pages == ids
    # Excluding an image excludes its objects too (similar-images search).
    assert "scene" not in [h.image_id for h in store.search(target, exclude_image_ids=["scene"])]


def test_reingest_replaces_box_points_and_delete_removes_them(store: VectorStore) -> None:
    rng = np.random.default_rng(5)
    vectors = [unit(rng.normal(size=DIM)) for _ in range(4)]
    store.upsert(with_boxes("scene", vectors))  # the image and 3 objects
    store.upsert(records(3, seed=6))
    assert points_in(store) == 7

    store.upsert(with_boxes("scene", vectors[:2]))  # re-ingested: one object now
    assert points_in(store) == 5 and store.count() == 4
    assert store.search(vectors[3], limit=1)[0].score < 0.99  # the dropped object is gone

    store.upsert([PointRecord("scene", vectors[0], {"image_id": "scene"})])  # no crops at all
    assert points_in(store) == 4

    store.upsert(with_boxes("scene", vectors))
    store.delete(["scene"])
    assert points_in(store) == 3 and store.count() == 3
    assert "scene" not in [h.image_id for h in store.search(vectors[2], limit=10)]


# Every metadata value type a producer may send, and the filter values that must find it.
TYPED = {
    "t-str": {"label": "sneaker", "code": "123"},
    "t-true": {"in_stock": True, "n": 1},
    "t-false": {"in_stock": False, "n": 0},
    "t-int": {"n": 3, "big": 2**62},
    "t-float": {"n": 3.0, "price": 89.5},
    "t-neg": {"price": -0.25, "big": -(2**63)},
}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"label": "sneaker"}, {"t-str"}),
        ({"code": "123"}, {"t-str"}),  # text that looks like a number stays text
        ({"code": 123}, set()),
        ({"in_stock": True}, {"t-true"}),
        ({"in_stock": False}, {"t-false"}),
        ({"n": 1}, {"t-true"}),  # a number never matches a boolean, nor the reverse
        ({"n": True}, set()),
        ({"n": 3}, {"t-int", "t-float"}),  # JSON does not tell 3 from 3.0
        ({"n": 3.0}, {"t-int", "t-float"}),
        ({"price": 89.5}, {"t-float"}),
        ({"price": -0.25}, {"t-neg"}),
        ({"big": 2**62}, {"t-int"}),
        ({"big": -(2**63)}, {"t-neg"}),
        ({"price": 89.5, "n": 3}, {"t-float"}),
        ({"price": 89.5, "n": 4}, set()),
    ],
    ids=lambda v: repr(v),
)
def test_filters_match_every_value_type(store: VectorStore, filters: dict, expected: set) -> None:
    rng = np.random.default_rng(7)
    store.upsert([
        PointRecord(image_id, unit(rng.normal(size=DIM)),
                    {"image_id": image_id, "uri": None, "metadata": meta})
        for image_id, meta in TYPED.items()
    ])
    found = {h.image_id for h in store.search(unit(rng.normal(size=DIM)), limit=10, filters=filters)}
    assert found == expected
    assert store.count(filters) == len(expected)


# -- one query object, one forwarding base (shared/store/base.py) ------------------------------


def test_a_search_query_is_what_the_keywords_build(store: VectorStore) -> None:
    from shared.store.base import SearchQuery

    recs = records(30)
    store.upsert(recs)
    query = SearchQuery(recs[2].vector, limit=7, offset=2, score_threshold=-1.0,
                        filters={"label": "even"}, exclude_image_ids=["img-4"])
    by_object = store.search(query)
    by_keywords = store.search(recs[2].vector, limit=7, offset=2, score_threshold=-1.0,
                               filters={"label": "even"}, exclude_image_ids=["img-4"])
    assert [h.image_id for h in by_object] == [h.image_id for h in by_keywords]
    assert len(by_object) == 7 and "img-4" not in [h.image_id for h in by_object]


def test_a_forwarding_store_forwards_everything_and_can_fail_all_of_it(
        store: VectorStore) -> None:
    from shared.store.base import ForwardingStore
    from tests.faults import FlakyStore

    recs = records(12)
    plain = ForwardingStore(store)
    plain.upsert(recs)
    assert plain.count() == 12 and plain.spec is store.spec
    assert [i.image_id for i in plain.scroll_images(batch_size=5)] == [
        i.image_id for i in store.scroll_images(batch_size=5)]
    flaky = FlakyStore(store)
    flaky.fail_for(30)
    for call in (lambda: flaky.search(recs[0].vector), lambda: flaky.get(["img-1"]),
                 lambda: flaky.count(), lambda: flaky.upsert(recs[:1]),
                 lambda: flaky.delete(["img-1"]), lambda: flaky.facets("label"),
                 lambda: list(flaky.scroll_images()), flaky.ping):
        with pytest.raises(StoreError, match="injected outage"):
            call()
    assert flaky.refused_calls == 8
    flaky.fail_for(0)
    assert flaky.count() == 12
