"""The one query path (shared/query.py): ``imgsearch search`` and ``imgsearch eval`` embed
queries as the API does, honouring QUERY_FULL_FRAME_VIEW and the detector's crop policy.

Queries are birds pasted small into unrelated scenes (as in docs/detection.md), against a
gallery of the birds' own photos; with DETECTOR set, the gallery is cropped at ingest,
and a query embedded whole would be compared with crops.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imgsearch.cli import cli
from shared.components import Components
from shared.config import load_settings
from shared.detection import Cropper, Detector
from shared.events import ImageUploaded
from shared.pipeline.stages import WorkItem
from shared.query import QueryEmbedder, search
from tests.conftest import MOBILENET, asset
from tests.test_detection import BACKGROUND_CLASSES, composite, require_yolov5

SPECIES = 12


@pytest.fixture(scope="module")
def yolo() -> Path:
    require_yolov5()
    return asset("weights/yolov5n.pt")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory, yolo: Path) -> Path:
    """A dataset: one photo per species (gallery) and each pasted into a scene (query)."""
    birds, sample = asset("data/birds"), asset("data/imagenet-sample")
    folder = tmp_path_factory.mktemp("scenes")
    first: dict[str, str] = {}
    with (birds / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test" and len(first) < SPECIES:
                first.setdefault(row["label"], row["path"])
    with (sample / "labels.csv").open() as handle:
        candidates = [Image.open(sample / r["path"]).convert("RGB")
                      for r in csv.DictReader(handle) if r["name"] in BACKGROUND_CLASSES]
    detector = Detector(yolo)
    backgrounds = [s for s, found in zip(candidates, detector.detect(candidates), strict=True)
                   if not found]
    rng = random.Random(3)
    rows = []
    for n, (label, path) in enumerate(first.items()):
        bird = Image.open(birds / path).convert("RGB")
        (folder / f"gallery-{n}.jpg").write_bytes((birds / path).read_bytes())
        composite(bird, backgrounds[n % len(backgrounds)], rng).save(
            folder / f"query-{n}.jpg", quality=92)
        rows += [(f"gallery-{n}.jpg", label, "train"), (f"query-{n}.jpg", label, "test")]
    with (folder / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    return folder


def as_env(settings_values: dict[str, Any]) -> dict[str, str]:
    return {k.upper(): str(v) for k, v in settings_values.items()}


@pytest.fixture(scope="module")
def cropped_gallery(scenes: Path, yolo: Path, mobilenet_weights: Path, embedder: Any,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The gallery indexed with DETECTOR=yolov5, CROP_MODE=largest (store closed after)."""
    store, cache = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("cache")
    values = {"qdrant_path": store, "model_name": MOBILENET, "model_weights": mobilenet_weights,
              "device": "cpu", "image_file_roots": str(scenes), "engine_cache_dir": cache,
              "embed_engine": "torch", "detector_engine": "torch", "detector": "yolov5",
              "detector_weights": str(yolo), "crop_mode": "largest"}
    settings = load_settings(**values)
    components = Components.load(settings, embedder=embedder)
    gallery = sorted(scenes.glob("gallery-*.jpg"))
    try:
        report = components.ingest([WorkItem(p.name, ImageUploaded(
            f"e-{p.name}", "test", p.name, p.as_uri(), None)) for p in gallery])
        assert report.count("stored") == len(gallery)
        # What the one query path answers, per query, in this process.
        query = components.query()
        expected = {}
        for path in sorted(scenes.glob("query-*.jpg")):
            hits = search(components.store, query.embed_bytes(path.read_bytes()).vectors,
                          limit=3)
            expected[path.name] = [(h.image_id, h.score) for h in hits]
        whole = QueryEmbedder(embedder)  # the same queries, embedded whole
        uncropped = {path.name: search(components.store, whole.embed_bytes(
            path.read_bytes()).vectors, limit=1)[0].image_id
                     for path in sorted(scenes.glob("query-*.jpg"))}
    finally:
        components.close()
    yield {"values": values, "expected": expected, "uncropped": uncropped, "settings": settings}


def test_cli_search_crops_its_query_as_the_gallery_was(cropped_gallery: dict[str, Any],
                                                       scenes: Path) -> None:
    env = as_env(cropped_gallery["values"])
    runner = CliRunner()
    matched_originals = 0
    for name, expected in cropped_gallery["expected"].items():
        result = runner.invoke(cli, ["search", str(scenes / name), "--limit", "3"], env=env)
        assert result.exit_code == 0, result.output
        hits = [(h["image_id"], h["score"]) for h in json.loads(result.stdout)["hits"]]
        assert [h[0] for h in hits] == [e[0] for e in expected]
        assert np.allclose([h[1] for h in hits], [e[1] for e in expected], atol=1e-4)
        matched_originals += hits[0][0] == name.replace("query", "gallery")
    whole = sum(top == name.replace("query", "gallery")
                for name, top in cropped_gallery["uncropped"].items())
    print(f"\n  CLI search, pasted birds: original first {matched_originals}/{SPECIES} "
          f"(whole-image queries: {whole}/{SPECIES})")
    assert matched_originals > whole


def test_eval_with_a_detector_crops_its_queries_as_the_gallery_was(
        cropped_gallery: dict[str, Any], scenes: Path, mobilenet_weights: Path) -> None:
    """eval's R@1 is what the query path gives for the same queries against the same
    cropped gallery, not what whole-image queries would."""
    from imgsearch.evaluation.dataset import load_dataset
    from imgsearch.evaluation.runner import EvalOptions, ModelChoice, Variant, evaluate

    values = cropped_gallery["values"]
    base = {k: v for k, v in values.items() if k not in ("qdrant_path", "image_file_roots",
                                                         "model_name", "model_weights")}
    report = evaluate([load_dataset(scenes)], [ModelChoice(MOBILENET, mobilenet_weights)],
                      [Variant()], EvalOptions(ks=(1,), latency_sample=2, batch_size=8),
                      base=base)
    [run] = report.runs
    measured = run.variants[0].labels["R@1"]  # type: ignore[index]
    dataset = scenes.name
    expected = np.mean([hits[0][0] == name.replace("query", "gallery")
                        for name, hits in cropped_gallery["expected"].items()])
    whole = np.mean([top == name.replace("query", "gallery")
                     for name, top in cropped_gallery["uncropped"].items()])
    assert run.label_queries == SPECIES, dataset
    assert measured == pytest.approx(expected, abs=1e-9), (measured, expected, whole)
    assert measured > whole


def test_cli_search_uses_the_full_frame_view_when_set(
        birds: Path, embedder: Any, mobilenet_weights: Path, tmp_path: Path) -> None:
    from imgsearch.files import find_images

    files = list(find_images([birds]))[::200][:12]
    values = {"qdrant_path": tmp_path / "store", "model_name": MOBILENET,
              "model_weights": mobilenet_weights, "device": "cpu", "image_file_roots": str(birds),
              "engine_cache_dir": tmp_path / "cache", "embed_engine": "torch"}
    components = Components.load(load_settings(**values), embedder=embedder)
    try:
        components.ingest([WorkItem(f.image_id, ImageUploaded(
            f"e{n}", "test", f.image_id, f.path.as_uri(), None)) for n, f in enumerate(files)])
        stored = components.store.get([files[5].image_id], with_vector=True)[files[5].image_id]
    finally:
        components.close()
    picture = Image.open(files[5].path).convert("RGB")
    w, h = picture.size
    copy = picture.crop((round(w * 0.2), round(h * 0.2), round(w * 0.8), round(h * 0.8)))
    buffer = io.BytesIO()
    copy.save(buffer, format="PNG")
    query = tmp_path / "copy.png"
    query.write_bytes(buffer.getvalue())
    scores = {}
    for full_frame in (False, True):
        env = as_env({**values, "query_full_frame_view": full_frame})
        result = CliRunner().invoke(cli, ["search", str(query), "--limit", "1"], env=env)
        assert result.exit_code == 0, result.output
        [hit] = json.loads(result.stdout)["hits"]
        assert hit["image_id"] == files[5].image_id
        expected = QueryEmbedder(embedder, Cropper(None), full_frame=full_frame).embed_images(
            [copy])[0].vector
        assert hit["score"] == pytest.approx(float(expected @ stored.vector), abs=1e-4)
        scores[full_frame] = hit["score"]
    assert abs(scores[True] - scores[False]) > 1e-3  # two different query vectors
