"""Logical indexes over physical collections: the pointer, its atomic moves, migration
records, and which collection a process opens. Both catalogs: the Qdrant server's (its
aliases, through qdrant-client's local mode) and the embedded store's (a pointer file)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from shared.errors import CollectionMismatchError
from shared.reindex.specs import IndexWatch
from shared.store.aliases import (
    Catalog,
    FileCatalog,
    physical_name,
    spec_digest,
    spec_identity,
)
from shared.store.base import CollectionLayout, CollectionSpec, VectorStore
from shared.store.edge import EdgeStore
from shared.store.factory import choose_collection
from shared.store.qdrant import QdrantCatalog, QdrantStore
from tests.test_store_contract import DIM, SPEC, records

OTHER = CollectionSpec("images", DIM, {"model_name": "other-model", "preprocessing": {"size": 8}},
                       quantization="int8")


class Backend:
    """One store kind: its catalog and a way to open a physical collection of it."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.client = QdrantClient(path=str(root / "local")) if kind == "qdrant" else None
        self.opened: list[VectorStore] = []

    def catalog(self) -> Catalog:
        if self.client is not None:
            return QdrantCatalog(self.client)
        return FileCatalog(self.root / "edge")

    def open(self, spec: CollectionSpec, name: str | None = None) -> VectorStore:
        spec = CollectionSpec(name or spec.name, spec.dim, spec.model,
                              quantization=spec.quantization)
        store: VectorStore
        if self.client is not None:
            store = QdrantStore(self.client, spec)
        else:
            store = EdgeStore(self.root / "edge", spec)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            if self.client is None:
                store.close()
        if self.client is not None:
            self.client.close()


@pytest.fixture(params=["qdrant", "edge"], ids=["qdrant-client", "edge"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    yield b
    b.close()


def test_the_first_collection_serves_under_its_name_until_a_swap(backend: Backend) -> None:
    catalog = backend.catalog()
    assert catalog.resolve("images") is None
    first = backend.open(SPEC)
    first.upsert(records(3))
    assert catalog.resolve("images") == "images"  # every deployment before re-indexing
    target = physical_name("images", dict(OTHER.metadata()))
    assert target.startswith("images--") and len(target) == len("images--") + 12
    backend.open(OTHER, target).upsert(records(2, seed=1))
    assert catalog.collections("images") == ["images", target]

    catalog.switch("images", target)
    assert catalog.resolve("images") == target
    catalog.switch("images", "images")  # a rollback to the first collection
    assert catalog.resolve("images") == "images"
    catalog.switch("images", target)

    with pytest.raises(CollectionMismatchError, match="serves"):
        catalog.drop("images", target)
    catalog.drop("images", "images")
    assert catalog.resolve("images") == target
    assert catalog.collections("images") == [target]
    if backend.kind == "qdrant":
        # The first collection's name is free: the alias takes it, as Qdrant users expect.
        aliases = {a.alias_name: a.collection_name
                   for a in backend.client.get_aliases().aliases}  # type: ignore[union-attr]
        assert aliases == {"images": target}
        assert backend.client.count("images").count == 2  # type: ignore[union-attr]


def test_a_switch_is_one_atomic_step_readers_never_see_no_collection(backend: Backend) -> None:
    catalog = backend.catalog()
    backend.open(SPEC).upsert(records(2))
    target = physical_name("images", dict(OTHER.metadata()))
    backend.open(OTHER, target)
    seen: set[Any] = set()
    stop = threading.Event()

    def read() -> None:
        reader = backend.catalog()
        while not stop.is_set():
            seen.add(reader.resolve("images"))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(40):
            catalog.switch("images", target)
            catalog.switch("images", "images")
    finally:
        stop.set()
        thread.join(10)
    assert seen <= {"images", target} and None not in seen


def test_records_merge_by_top_level_key(backend: Backend) -> None:
    catalog = backend.catalog()
    assert catalog.read_record("images") is None
    catalog.update_record("images", {"migration": {"id": "m-1"}, "state": {"name": "backfilling"}})
    catalog.update_record("images", {"progress": {"done": 5}})
    record = catalog.update_record("images", {"state": {"name": "ready"}, "gate": None})
    assert record == {"migration": {"id": "m-1"}, "state": {"name": "ready"},
                      "progress": {"done": 5}}
    catalog.update_record("images", {"state": None})
    assert catalog.read_record("images") == {"migration": {"id": "m-1"}, "progress": {"done": 5}}
    assert "images--reindex" not in catalog.collections("images")  # never a collection of it


def test_concurrent_record_writers_of_different_keys_lose_nothing(tmp_path: Path) -> None:
    catalog = FileCatalog(tmp_path)

    def write(key: str) -> None:
        for n in range(30):
            FileCatalog(tmp_path).update_record("images", {key: n})

    threads = [threading.Thread(target=write, args=(k,)) for k in ("progress", "state", "gate")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert catalog.read_record("images") == {"progress": 29, "state": 29, "gate": 29}


def test_spec_identity_ignores_layout_and_load_settings() -> None:
    base = SPEC.metadata()
    same = CollectionSpec("x", DIM, SPEC.model, layout=CollectionLayout(shards=6),
                          load={"model_name": "test-model"}, rescore=False).metadata()
    assert spec_digest(base) == spec_digest(same)
    assert spec_digest(base) != spec_digest(OTHER.metadata())
    assert spec_identity(OTHER.metadata())["quantization"] == "int8"


def test_a_process_opens_the_collection_built_for_its_spec(backend: Backend) -> None:
    catalog = backend.catalog()
    assert choose_collection(catalog, SPEC) == "images"  # nothing yet: the first one
    backend.open(SPEC)
    assert choose_collection(catalog, SPEC) == "images"
    # Another spec and no migration: the serving one, whose check then refuses it.
    assert choose_collection(catalog, OTHER) == "images"
    target = physical_name("images", dict(OTHER.metadata()))
    backend.open(OTHER, target)
    catalog.update_record("images", {"migration": {"id": "m", "active": True,
                                                   "source": "images", "target": target}})
    assert choose_collection(catalog, OTHER) == target  # a worker started for the target
    assert choose_collection(catalog, SPEC) == "images"
    catalog.switch("images", target)
    assert choose_collection(catalog, SPEC) == "images"  # the source, after the swap
    assert choose_collection(catalog, OTHER) == target


def test_a_watch_hears_of_a_migration_written_by_another_process(tmp_path: Path) -> None:
    """What a worker or API replica does: poll the catalog, act on a change, within
    REINDEX_POLL_S, without a restart."""
    EdgeStore(tmp_path, SPEC).close()
    heard: list[Any] = []
    watch = IndexWatch(FileCatalog(tmp_path), "images", 0.2, on_change=heard.append)
    watch.start()
    try:
        deadline = time.monotonic() + 5
        while not heard and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard and heard[-1].serving == "images" and heard[-1].active is None
        other = FileCatalog(tmp_path)  # another process's view of the same directory
        EdgeStore(tmp_path, CollectionSpec("images--0123456789ab", DIM, SPEC.model)).close()
        started = time.monotonic()
        other.update_record("images", {"migration": {
            "id": "m-x", "active": True, "source": "images", "target": "images--0123456789ab",
            "source_load": {}, "target_load": {}}, "state": {"name": "backfilling"}})
        while (not heard[-1].active) and time.monotonic() - started < 5:
            time.sleep(0.05)
        assert heard[-1].active is not None and heard[-1].needed == (
            "images", "images--0123456789ab")
        assert time.monotonic() - started < 1.0
        other.switch("images", "images--0123456789ab")
        while heard[-1].serving != "images--0123456789ab" and time.monotonic() - started < 5:
            time.sleep(0.05)
        assert heard[-1].serving == "images--0123456789ab"
    finally:
        watch.stop()


