"""Quantized collections: really quantized, nearly as good as float32, and kept on restart."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from shared.components import Components
from shared.config import load_settings
from shared.errors import CollectionMismatchError
from shared.store.base import CollectionSpec, PointRecord, VectorStore
from shared.store.qdrant import QdrantStore

N_IMAGES = 150


@pytest.fixture(scope="module")
def photos(birds: Path, embedder: Any) -> tuple[list[str], np.ndarray]:
    """150 real bird photos (every 19th of the set) and their real embeddings."""
    from PIL import Image

    with (birds / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))[::19][:N_IMAGES]
    vectors = embedder.embed_images([Image.open(birds / r["path"]).convert("RGB") for r in rows])
    return [f"birds/{r['path']}" for r in rows], vectors


def settings_for(tmp: Path, weights: Path, **options: Any) -> Any:
    return load_settings(
        qdrant_url=None, qdrant_path=tmp / "store", qdrant_collection="quantized",
        model_name="mobilenetv2_100", model_weights=weights, device="cpu",
        vector_indexing_threshold_kb=1, **options,
    )


def fill(store: VectorStore, ids: list[str], vectors: np.ndarray) -> None:
    store.upsert([PointRecord(i, v, {"image_id": i, "metadata": {}})
                  for i, v in zip(ids, vectors, strict=True)])
    store.optimize()


def top10(store: VectorStore, vectors: np.ndarray) -> list[list[str]]:
    return [[h.image_id for h in store.search(v, limit=10)] for v in vectors]


def exact_top10(ids: list[str], vectors: np.ndarray) -> list[list[str]]:
    order = np.argsort(-(vectors @ vectors.T), axis=1, kind="stable")[:, :10]
    return [[ids[j] for j in row] for row in order]


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


def quantized_bytes(tmp: Path) -> int:
    files = list((tmp / "store" / "quantized" / "shard").glob("segments/*/vector_storage/quantized.data"))
    return sum(f.stat().st_size for f in files)


@pytest.mark.parametrize(("options", "bytes_per_vector"), [
    ({"quantization": "int8"}, 1280 + 4),  # a byte per dimension, plus a per-vector offset
    # Binary: a bit per dimension of a random rotation (ReLU features are all >= 0, so
    # their own signs say nothing), rescored with 4x candidates (binary's default).
    ({"quantization": "binary", "vector_reduction": "random", "vector_dim": 1280}, 1280 // 8),
], ids=["int8", "binary-rotated"])
def test_quantized_collection_ranks_like_float32_and_survives_a_restart(
    options: dict[str, Any], bytes_per_vector: int, tmp_path: Path, mobilenet_weights: Path,
    embedder: Any, photos: tuple[list[str], np.ndarray],
) -> None:
    ids, vectors = photos
    settings = settings_for(tmp_path, mobilenet_weights, **options)
    first = Components.load(settings, embedder=embedder)
    try:
        fill(first.store, ids, vectors)
        before = top10(first.store, vectors)
    finally:
        first.close()
    # The quantized copy exists: search really runs on it.
    assert quantized_bytes(tmp_path) == bytes_per_vector * N_IMAGES
    # With rescoring, the top 10 are (nearly) the exact float32 top 10; each photo first.
    assert all(row[0] == i for row, i in zip(before, ids, strict=True))
    assert recall(before, exact_top10(ids, vectors)) >= 0.95

    again = Components.load(settings, embedder=embedder)
    try:
        assert again.store.count() == N_IMAGES
        assert top10(again.store, vectors) == before
    finally:
        again.close()


def test_binary_without_rotation_loses_what_rotation_keeps(
    tmp_path: Path, mobilenet_weights: Path, embedder: Any,
    photos: tuple[list[str], np.ndarray],
) -> None:
    ids, vectors = photos
    truth = exact_top10(ids, vectors)
    results = {}
    for name, options in {"raw": {}, "rotated": {"vector_reduction": "random",
                                                   "vector_dim": 1280}}.items():
        components = Components.load(
            settings_for(tmp_path / name, mobilenet_weights, quantization="binary",
                         quantization_rescore=False, **options), embedder=embedder)
        try:
            fill(components.store, ids, vectors)
            results[name] = recall(top10(components.store, vectors), truth)
        finally:
            components.close()
    # Without rescoring the ranking is the bits' own: the rotation is what makes them work.
    assert results["rotated"] >= 0.6 > results["raw"] + 0.1, results


def test_reopening_with_other_quantization_is_a_clear_error(
    tmp_path: Path, mobilenet_weights: Path, embedder: Any,
    photos: tuple[list[str], np.ndarray],
) -> None:
    ids, vectors = photos
    first = Components.load(settings_for(tmp_path, mobilenet_weights, quantization="int8"),
                            embedder=embedder)
    fill(first.store, ids[:5], vectors[:5])
    first.close()
    for other in ("none", "binary"):
        with pytest.raises(CollectionMismatchError, match="built with QUANTIZATION=int8"):
            Components.load(settings_for(tmp_path, mobilenet_weights, quantization=other),
                            embedder=embedder)
    # Query-time options may change freely.
    reopened = Components.load(
        settings_for(tmp_path, mobilenet_weights, quantization="int8",
                     quantization_rescore=False, quantization_oversampling=3.0),
        embedder=embedder)
    try:
        assert reopened.store.search(vectors[2], limit=1)[0].image_id == ids[2]
    finally:
        reopened.close()


# Local mode is an exact scan: it warns that the rescoring parameters (for a server) do nothing.
@pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning")
def test_qdrant_client_store_records_quantization(
    tmp_path: Path, photos: tuple[list[str], np.ndarray],
) -> None:
    """The server backend, through qdrant-client's local mode: it takes the quantization
    config and search parameters, and the collection remembers its quantization."""
    ids, vectors = photos
    spec = CollectionSpec("q", 1280, {"model_name": "mobilenetv2_100"}, quantization="int8",
                          oversampling=2.0, indexing_threshold_kb=1)
    store = QdrantStore(QdrantClient(path=str(tmp_path / "local")), spec)
    try:
        fill(store, ids[:20], vectors[:20])
        assert store.search(vectors[4], limit=1)[0].image_id == ids[4]
        assert (store.stored_metadata or {})["imgsearch"]["quantization"] == "int8"
    finally:
        store.close()
    with pytest.raises(CollectionMismatchError, match="QUANTIZATION=int8"):
        QdrantStore(QdrantClient(path=str(tmp_path / "local")),
                    CollectionSpec("q", 1280, {"model_name": "mobilenetv2_100"}))
