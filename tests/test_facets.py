"""Facets: the stored values of a metadata key, so filters are chosen, not guessed.

Both stores count images (never their box points) by value; GET /facets answers with each
value's exact `filter`, which /search then matches, whatever the value looks like.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from query_api.app import create_app
from query_api.routes_facets import filter_text
from query_api.server import BackgroundServer
from shared.components import Components
from shared.events import ImageUploaded
from shared.pipeline.stages import WorkItem
from shared.store.base import PARENT_FIELD, FacetUnavailableError, PointRecord, VectorStore
from tests.conftest import free_port
from tests.faults import FlakyStore
from tests.query_api_support import api_settings, bird_rows, index, pick
from tests.test_store_contract import DIM, open_edge, open_qdrant, unit

KEY = "facet-key-0123456789abcdef"


@pytest.fixture(params=[open_qdrant, open_edge], ids=["qdrant-client", "edge"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    s = request.param(tmp_path)
    yield s
    s.close()


def _gallery(labels: list[str]) -> list[PointRecord]:
    rng = np.random.default_rng(1)
    out = []
    for i, label in enumerate(labels):
        payload = {"image_id": f"img-{i}", "uri": f"file:///photos/{i}.jpg",
                   "metadata": {"label": label, "n": i % 3, "in_stock": i % 2 == 0}}
        out.append(PointRecord(f"img-{i}", unit(rng.normal(size=DIM)), payload))
        # Each image also has a detected object (a box point) with the same metadata.
        out.append(PointRecord(f"img-{i}", unit(rng.normal(size=DIM)),
                               {**payload, PARENT_FIELD: f"img-{i}"}, crop_index=1))
    return out


def test_facets_count_images_by_stored_value(store: VectorStore) -> None:
    store.upsert(_gallery(["Blue_Jay"] * 5 + ["Cedar_Waxwing"] * 3 + ["3"]))
    counts = store.facets("label")
    assert [(c.value, c.count) for c in counts] == [("Blue_Jay", 5), ("Cedar_Waxwing", 3),
                                                   ("3", 1)]
    assert [c.value for c in store.facets("label", limit=1)] == ["Blue_Jay"]
    # A wrapper that keeps the real store as `inner` passes facets and listing through.
    assert FlakyStore(store).facets("label") == counts


def test_scroll_lists_each_image_once_with_the_asked_fields(store: VectorStore) -> None:
    store.upsert(_gallery([f"l{i}" for i in range(23)]))
    listed = list(store.scroll_images(("uri",), batch_size=5))
    assert sorted(s.image_id for s in listed) == sorted(f"img-{i}" for i in range(23))
    assert all(set(s.payload) == {"image_id", "uri"} for s in listed)
    assert all(s.vector is None for s in listed)


def test_the_embedded_store_says_which_keys_have_facets(tmp_path: Path) -> None:
    store = open_edge(tmp_path)
    try:
        store.upsert(_gallery(["a", "b"]))
        with pytest.raises(FacetUnavailableError, match="facet keys: label"):
            store.facets("in_stock")
    finally:
        store.close()
    # Reopened, the index is there already (made when the collection was created).
    again = open_edge(tmp_path)
    try:
        assert {c.value for c in again.facets("label")} == {"a", "b"}
    finally:
        again.close()


@pytest.mark.parametrize("value,text", [
    ("Blue_Jay", "label=Blue_Jay"), ("Cedar Waxwing", "label=Cedar Waxwing"),
    ("3", 'label="3"'), ("true", 'label="true"'), ("89.5", 'label="89.5"'),
    ('"quoted"', 'label=""quoted""'), (True, "label=true"), (7, "label=7"),
])
def test_a_facet_filter_reads_back_as_its_value(value: Any, text: str) -> None:
    from query_api.params import parse_filter_value

    assert filter_text("label", value) == text
    assert parse_filter_value(text.partition("=")[2]) == value


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, embedder: Any, mobilenet_weights: Path,
         data_dir: Path, birds: Path) -> Iterator[Components]:
    """Real photos with shop-like metadata: a label that looks like a number, booleans,
    floats."""
    settings = api_settings(tmp_path_factory.mktemp("facet-store"), mobilenet_weights,
                            [data_dir], api_warmup=False)
    components = Components.load(settings, embedder=embedder)
    photos = pick(bird_rows(birds), train=1, test=0)[:12]
    items = []
    for n, bird in enumerate(photos):
        metadata = {"label": "3" if n < 4 else bird.label, "in_stock": n % 2 == 0,
                    "price": 89.5 if n % 3 == 0 else 12.0}
        items.append(WorkItem(bird.image_id, ImageUploaded(
            event_id=f"shop-{n}", source="tests", image_id=bird.image_id,
            uri=bird.path.as_uri(), image_bytes=None, metadata=metadata)))
    index(components, items)
    try:
        yield components
    finally:
        components.close()


def test_facets_over_http_then_filter_with_them(shop: Components, birds: Path) -> None:
    settings = shop.settings.model_copy(update={"api_port": free_port()})
    photo = next(iter(sorted((birds / "Blue_Jay").glob("*.jpg"))))
    with BackgroundServer(create_app(shop, settings=settings), port=settings.api_port) as server, \
            httpx.Client(base_url=server.url, timeout=60) as api:
        facets = api.get("/facets", params={"key": "label"}).json()
        assert facets["key"] == "label"
        three = next(v for v in facets["values"] if v["value"] == "3")
        assert three == {"value": "3", "count": 4, "filter": 'label="3"'}
        assert facets["values"][0] == three  # most frequent first

        def search(*filters: str) -> list[dict[str, Any]]:
            response = api.post("/search", params=[("limit", 50), *[("filter", f) for f in filters]],
                                content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
            return list(response.json()["hits"])

        hits = search(three["filter"])
        assert len(hits) == 4 and {h["metadata"]["label"] for h in hits} == {"3"}
        # Typed values match as documented: booleans, floats, and both at once.
        assert {h["metadata"]["in_stock"] for h in search("in_stock=true")} == {True}
        assert len(search("in_stock=true")) == 6
        assert {h["metadata"]["price"] for h in search("price=89.5")} == {89.5}
        assert len(search("price=89.5", "in_stock=true")) == 2

        refused = api.get("/facets", params={"key": "in_stock"})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "facet_unavailable"
        bad = api.get("/facets", params={"key": "no spaces"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"

    # With API keys, facets are data: they need a key like /search.
    keyed = shop.settings.model_copy(update={"api_port": free_port(),
                                             "api_keys": [SecretStr(KEY)]})
    with BackgroundServer(create_app(shop, settings=keyed), port=keyed.api_port) as server:
        assert httpx.get(f"{server.url}/facets", timeout=30).status_code == 401
        ok = httpx.get(f"{server.url}/facets", headers={"X-API-Key": KEY}, timeout=30)
        assert ok.status_code == 200 and ok.json()["values"]
