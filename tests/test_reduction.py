"""Dimension reduction: the maths, the file, and collections that keep their projection."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsearch.files import ImageFile
from imgsearch.index import file_event
from shared.components import Components
from shared.config import load_settings
from shared.errors import CollectionMismatchError, ConfigError
from shared.pipeline.stages import WorkItem
from shared.reduction import Reduction, fit_pca, random_projection
from shared.store.projected import ProjectedStore

# -- the maths ------------------------------------------------------------------------------


def test_random_projection_is_orthonormal_and_seeded() -> None:
    a = random_projection(1280, 320, seed=7)
    assert a.matrix.shape == (1280, 320) and a.matrix.dtype == np.float32
    assert np.allclose(a.matrix.T @ a.matrix, np.eye(320), atol=1e-5)
    assert np.array_equal(a.matrix, random_projection(1280, 320, seed=7).matrix)
    assert a.fingerprint == random_projection(1280, 320, seed=7).fingerprint
    assert a.fingerprint != random_projection(1280, 320, seed=8).fingerprint
    assert a.identity() == {"method": "random", "in_dim": 1280, "out_dim": 320, "seed": 7}


def test_apply_normalises_and_lift_round_trips() -> None:
    reduction = random_projection(64, 16, seed=0)
    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    y = reduction.apply(x)
    assert y.shape == (5, 16)
    assert np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
    # A stored (reduced) vector lifted back to the model's space reduces to itself.
    assert np.allclose(reduction.apply(reduction.lift(y)), y, atol=1e-6)
    assert reduction.apply(x[0]).shape == (16,)
    with pytest.raises(ConfigError, match="maps 64-d"):
        reduction.apply(np.ones(32, dtype=np.float32))


def test_pca_finds_the_subspace_the_data_lives_in() -> None:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(50, 6)))[0]  # a 6-d subspace of R^50
    data = rng.normal(size=(400, 6)) @ basis.T
    pca = fit_pca(data, 6)
    assert pca.method == "pca" and pca.fitted_on == 400
    # Same subspace: projecting the basis on the fitted axes loses nothing.
    assert np.allclose(np.linalg.norm(pca.matrix.T @ basis, axis=0), 1.0, atol=1e-5)
    # Cosine similarities between points of that subspace survive the reduction exactly.
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    reduced = pca.apply(data)
    assert np.allclose(reduced @ reduced.T, unit @ unit.T, atol=1e-4)
    with pytest.raises(ConfigError, match="at least 8 sample"):
        fit_pca(data[:5], 8)


def test_file_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pca = fit_pca(rng.normal(size=(100, 40)), 12)
    pca.save(tmp_path / "pca.npz")
    loaded = Reduction.load(tmp_path / "pca.npz")
    assert np.array_equal(loaded.matrix, pca.matrix)
    assert (loaded.method, loaded.fitted_on, loaded.fingerprint) == ("pca", 100, pca.fingerprint)
    meta = json.loads(json.dumps(pca.to_metadata()))  # as a collection stores it
    assert np.array_equal(Reduction.from_metadata(meta).matrix, pca.matrix)


def test_altered_projections_are_refused(tmp_path: Path) -> None:
    meta = random_projection(32, 8, seed=1).to_metadata()
    meta["fingerprint"] = "0" * 16
    with pytest.raises(ConfigError, match="altered"):
        Reduction.from_metadata(meta)
    np.savez(tmp_path / "skew.npz", matrix=np.ones((32, 8), dtype=np.float32),
             method=np.array("pca"), seed=np.array(-1), fitted_on=np.array(10))
    with pytest.raises(ConfigError, match="not orthonormal"):
        Reduction.load(tmp_path / "skew.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a numpy file")
    with pytest.raises(ConfigError, match="not a reduction file"):
        Reduction.load(tmp_path / "junk.npz")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vector_reduction": "random"}, "needs VECTOR_DIM"),
    ({"vector_reduction": "pca"}, "VECTOR_REDUCTION=pca needs"),
    ({"vector_dim": 320}, "VECTOR_REDUCTION=none"),
])
def test_settings_refuse_incomplete_reductions(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**overrides)


# -- collections that keep their projection -------------------------------------------------

N_IMAGES = 60


@pytest.fixture(scope="module")
def photos(birds: Path) -> list[ImageFile]:
    """60 bird photos, 12 species x 5, so there are near neighbours to find."""
    with (birds / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    species = sorted({r["label"] for r in rows})[:12]
    chosen = [r for s in species for r in [x for x in rows if x["label"] == s][:5]]
    return [ImageFile((birds / r["path"]).resolve(), f"birds/{r['path']}", r["label"])
            for r in chosen]


@pytest.fixture(scope="module")
def vectors(photos: list[ImageFile], embedder: Any) -> np.ndarray:
    from PIL import Image

    return embedder.embed_images([Image.open(p.path).convert("RGB") for p in photos])


def settings_for(tmp: Path, birds: Path, weights: Path, **vector_options: Any) -> Any:
    return load_settings(
        qdrant_url=None, qdrant_path=tmp / "store", qdrant_collection="reduced",
        model_name="mobilenetv2_100", model_weights=weights, device="cpu",
        image_file_roots=[birds], **vector_options,
    )


def index(components: Components, photos: list[ImageFile]) -> None:
    report = components.ingest([WorkItem(p.image_id, file_event(p, label_from_folder=True))
                                for p in photos])
    assert report.count("stored") == len(photos), report.summary()
    components.store.optimize()


def answers(components: Components, vectors: np.ndarray) -> list[list[tuple[str, float]]]:
    return [[(h.image_id, round(h.score, 5)) for h in components.store.search(v, limit=5)]
            for v in vectors]


@pytest.fixture
def pca_file(tmp_path: Path, vectors: np.ndarray) -> Path:
    path = tmp_path / "pca.npz"
    fit_pca(vectors, 32).save(path)
    return path


@pytest.mark.parametrize("method", ["random", "pca"])
def test_collection_keeps_its_projection_across_a_restart(
    method: str, tmp_path: Path, birds: Path, mobilenet_weights: Path, embedder: Any,
    photos: list[ImageFile], vectors: np.ndarray, pca_file: Path,
) -> None:
    options: dict[str, Any] = {"vector_reduction": method, "vector_dim": 32}
    if method == "pca":
        options["vector_reduction_file"] = pca_file
    first = Components.load(settings_for(tmp_path, birds, mobilenet_weights, **options),
                            embedder=embedder)
    try:
        assert isinstance(first.store, ProjectedStore)
        assert first.store.spec.dim == 32 and first.store.reduction.out_dim == 32
        index(first, photos)
        before = answers(first, vectors)
        matrix = first.store.reduction.matrix.copy()
        # Search by a stored image's vector (what the API's search-by-id does): itself first.
        stored = first.store.get([photos[7].image_id], with_vector=True)[photos[7].image_id]
        assert stored.vector is not None and stored.vector.shape == (1280,)
        assert first.store.search(stored.vector, limit=1)[0].image_id == photos[7].image_id
    finally:
        first.close()

    # Every image finds itself first, and mostly its own species next.
    assert all(row[0][0] == p.image_id for row, p in zip(before, photos, strict=True))
    # Reopen from the same directory. A PCA collection needs no file any more: the
    # projection is read from the collection itself.
    options.pop("vector_reduction_file", None)
    if method == "pca":
        pca_file.unlink()
    again = Components.load(settings_for(tmp_path, birds, mobilenet_weights, **options),
                            embedder=embedder)
    try:
        assert isinstance(again.store, ProjectedStore)
        assert np.array_equal(again.store.reduction.matrix, matrix)
        assert again.store.count() == len(photos)
        assert answers(again, vectors) == before
    finally:
        again.close()


@pytest.mark.parametrize(("reopen", "message"), [
    ({}, "configured for none"),  # VECTOR_REDUCTION=none
    ({"vector_reduction": "random", "vector_dim": 32, "vector_reduction_seed": 1},
     r"configured for \{.*'seed': 1"),
    ({"vector_reduction": "random", "vector_dim": 64}, r"configured for \{.*'out_dim': 64"),
    ({"vector_reduction": "pca", "vector_dim": 32}, r"configured for \{'method': 'pca'"),
])
def test_reopening_with_another_reduction_is_a_clear_error(
    reopen: dict[str, Any], message: str, tmp_path: Path, birds: Path, mobilenet_weights: Path,
    embedder: Any, photos: list[ImageFile],
) -> None:
    settings = settings_for(tmp_path, birds, mobilenet_weights, vector_reduction="random",
                            vector_dim=32)
    first = Components.load(settings, embedder=embedder)
    index(first, photos[:10])
    first.close()
    with pytest.raises(CollectionMismatchError, match=message):
        Components.load(settings_for(tmp_path, birds, mobilenet_weights, **reopen),
                        embedder=embedder)


def test_unreduced_collection_refuses_a_reducing_process(
    tmp_path: Path, birds: Path, mobilenet_weights: Path, embedder: Any,
    photos: list[ImageFile],
) -> None:
    first = Components.load(settings_for(tmp_path, birds, mobilenet_weights), embedder=embedder)
    assert not isinstance(first.store, ProjectedStore)
    index(first, photos[:5])
    first.close()
    with pytest.raises(CollectionMismatchError, match="reduction none"):
        Components.load(settings_for(tmp_path, birds, mobilenet_weights,
                                     vector_reduction="random", vector_dim=32), embedder=embedder)


def test_pca_collection_cannot_be_created_without_a_fitted_projection(
    tmp_path: Path, birds: Path, mobilenet_weights: Path, embedder: Any,
) -> None:
    settings = settings_for(tmp_path, birds, mobilenet_weights, vector_reduction="pca",
                            vector_dim=32)
    with pytest.raises(ConfigError, match="VECTOR_REDUCTION_FILE"):
        Components.load(settings, embedder=embedder)
    # Nothing half-made is left behind to confuse the next start.
    assert not (tmp_path / "store" / "reduced").exists()


def test_a_projection_file_must_fit_the_settings(
    tmp_path: Path, birds: Path, mobilenet_weights: Path, embedder: Any, pca_file: Path,
) -> None:
    with pytest.raises(ConfigError, match="makes 32-d vectors, VECTOR_DIM=16"):
        Components.load(settings_for(tmp_path, birds, mobilenet_weights, vector_reduction="pca",
                                     vector_dim=16, vector_reduction_file=pca_file),
                        embedder=embedder)
    with pytest.raises(ConfigError, match="holds a pca projection, not random"):
        Components.load(settings_for(tmp_path, birds, mobilenet_weights,
                                     vector_reduction="random", vector_dim=32,
                                     vector_reduction_file=pca_file), embedder=embedder)
