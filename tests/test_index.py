"""`imgsearch index`: a folder straight into the embedded store, resumable, no Kafka.

Real bird photos, the real mobilenetv2_100 weights, the real embedded store.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imgsearch.cli import cli
from shared.images import decode_image, sha256_hex
from tests.conftest import MOBILENET

SPECIES = ("American_Goldfinch", "Black_footed_Albatross", "Blue_Jay")
CLEAN_ENV = {name: None for name in (
    "QDRANT_URL", "QDRANT_PATH", "IMAGE_FILE_ROOTS", "MODEL_NAME", "MODEL_WEIGHTS",
    "LOG_LEVEL", "KAFKA_BOOTSTRAP_SERVERS")}


@pytest.fixture
def photos(tmp_path: Path, birds: Path) -> Path:
    root = tmp_path / "photos"
    for species in SPECIES:
        shutil.copytree(birds / species, root / species)
    return root


def run_index(paths: list[Path], data: Path, weights: Path) -> Result:
    return CliRunner().invoke(
        cli,
        ["index", *map(str, paths), "--data-dir", str(data), "--model", MOBILENET,
         "--weights", str(weights)],
        env=CLEAN_ENV,
        catch_exceptions=False,
    )


def summary(result: Result) -> dict[str, int]:
    match = re.search(r"stored (\d+), unchanged \(skipped\) (\d+), failed (\d+); .* holds (\d+)",
                      result.stdout)
    assert match, result.output
    return dict(zip(("stored", "unchanged", "failed", "total"), map(int, match.groups()),
                    strict=True))


def open_store(data: Path, embedder: Any) -> Any:
    from shared.components import collection_spec
    from shared.config import load_settings
    from shared.store.edge import EdgeStore

    settings = load_settings(qdrant_path=data, model_name=MOBILENET)
    return EdgeStore(data, collection_spec(settings, embedder))


def test_index_twice_stores_each_image_once_then_skips_all(
        photos: Path, tmp_path: Path, mobilenet_weights: Path, embedder: Any) -> None:
    files = sorted(photos.rglob("*.jpg"))
    data = tmp_path / "data"

    first = run_index([photos], data, mobilenet_weights)
    assert first.exit_code == 0, first.output
    assert summary(first) == {"stored": len(files), "unchanged": 0, "failed": 0,
                              "total": len(files)}

    second = run_index([photos], data, mobilenet_weights)
    assert second.exit_code == 0, second.output
    assert summary(second) == {"stored": 0, "unchanged": len(files), "failed": 0,
                               "total": len(files)}

    with open_store(data, embedder) as store:
        assert store.count() == len(files)
        probe = files[7]
        image_id = f"photos/{probe.relative_to(photos).as_posix()}"
        stored = store.get([image_id])[image_id]
        assert stored.payload["sha256"] == sha256_hex(probe.read_bytes())
        assert stored.payload["uri"] == probe.resolve().as_uri()
        assert stored.payload["metadata"] == {"label": probe.parent.name}
        # The stored vector is the photo's: searching with the photo finds it first.
        vector = embedder.embed_images([decode_image(probe.read_bytes(), max_pixels=10**8)])[0]
        hits = store.search(vector, limit=3)
        assert hits[0].image_id == image_id
        assert hits[0].score > 0.999


def test_index_resumes_and_reports_bad_files(
        photos: Path, tmp_path: Path, mobilenet_weights: Path) -> None:
    files = sorted(photos.rglob("*.jpg"))
    data = tmp_path / "data"
    first = run_index([photos], data, mobilenet_weights)
    assert summary(first)["stored"] == len(files)

    # A changed photo (other bytes under the same name), a new one, and one that is no image.
    changed = files[3]
    changed.write_bytes(files[40].read_bytes())
    new = photos / SPECIES[0] / "new_photo.jpg"
    shutil.copy(files[50], new)
    broken = photos / SPECIES[1] / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG at all")

    second = run_index([photos], data, mobilenet_weights)
    assert second.exit_code == 1, second.output
    assert summary(second) == {"stored": 2, "unchanged": len(files) - 1, "failed": 1,
                               "total": len(files) + 1}
    assert f"{broken.resolve()}: undecodable:" in second.stderr
