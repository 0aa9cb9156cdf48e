"""Inference engines: every installed engine gives torch's vectors and boxes, exports are
cached by key, checked before use, rebuilt when damaged, built once under concurrency,
and a collection built with one engine answers queries from another."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imgsearch.files import find_images
from shared.embedding import Embedder
from shared.errors import ModelError
from shared.images import decode_image
from shared.models.choice import AUTO_ORDER, installed
from shared.models.export import (
    MANIFEST,
    MODEL_FILE,
    ExportCache,
    ExportKey,
    check_vectors,
    export_onnx,
    verified,
)
from tests.conftest import MOBILENET, REPO, asset

EXPORTED = [e for e in ("onnxruntime", "openvino") if installed(e)]


def require(engine: str) -> None:
    if not installed(engine):
        message = f"{engine} is not installed: pip install -e '.[dev]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def engines(mobilenet_weights: Path, cache_dir: Path) -> Iterator[dict[str, Embedder]]:
    built = {}
    for name in ("onnxruntime", "openvino"):
        require(name)
        built[name] = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine=name,
                               cache_dir=cache_dir)
    yield built
    for embedder in built.values():
        embedder.close()


@pytest.fixture(scope="module")
def photos(birds: Path) -> list[Image.Image]:
    files = list(find_images([birds]))[::150][:16]
    files += list(find_images([asset("data/imagenet-sample")]))[::60][:8]
    return [decode_image(f.path.read_bytes(), max_pixels=10**8) for f in files]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_every_engine_gives_torchs_vectors(engine: str, engines: dict[str, Embedder],
                                           embedder: Any, photos: list[Image.Image]) -> None:
    exported = engines[engine]
    assert exported.engine == engine and embedder.engine == "torch"
    assert exported.info == embedder.info  # what a collection records: engine-free
    inputs = [embedder.preprocess(p) for p in photos]
    reference = embedder.embed(inputs)
    for batch in (inputs, inputs[:1]):  # a batch and batch 1 (the API's lone query)
        vectors = exported.embed(batch)
        cosines = np.sum(vectors * reference[:len(batch)], axis=1)
        assert cosines.min() >= 0.9999, cosines.min()


def test_auto_takes_the_first_installed_engine_of_the_measured_order(
        mobilenet_weights: Path, cache_dir: Path) -> None:
    expected = next(e for e in AUTO_ORDER["cpu"] if installed(e))
    auto = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine="auto",
                    cache_dir=cache_dir)
    try:
        assert auto.engine == expected
    finally:
        auto.close()


def test_the_cache_is_keyed_and_reused(engines: dict[str, Embedder], cache_dir: Path,
                                       mobilenet_weights: Path) -> None:
    [entry] = [p for p in cache_dir.iterdir() if p.name.startswith("embedder-")]
    manifest = json.loads((entry / MANIFEST).read_text())
    key = manifest["key"]
    assert key["model"] == MOBILENET and key["input_size"] == [3, 224, 224]
    assert len(key["weights"]) == 16 and key["exporter"] == f"torch {torch.__version__}"
    assert key["opset"] == 18
    assert any(p.name.startswith("openvino-") for p in entry.iterdir())  # OpenVINO's blob
    # Another weights digest or input size is another entry.
    base = ExportKey("embedder", MOBILENET, key["weights"], (3, 224, 224))
    assert base.dirname == entry.name
    assert ExportKey("embedder", MOBILENET, "0" * 16, (3, 224, 224)).dirname != entry.name
    assert ExportKey("embedder", MOBILENET, key["weights"], (3, 256, 256)).dirname != entry.name
    # A second load reuses the file: no export.
    before = (entry / MODEL_FILE).stat().st_mtime_ns
    again = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine="onnxruntime",
                     cache_dir=cache_dir)
    again.close()
    assert (entry / MODEL_FILE).stat().st_mtime_ns == before


def test_a_damaged_cache_file_is_detected_and_rebuilt(mobilenet_weights: Path, tmp_path: Path,
                                                      embedder: Any,
                                                      photos: list[Image.Image]) -> None:
    require("onnxruntime")
    first = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine="onnxruntime",
                     cache_dir=tmp_path)
    first.close()
    [entry] = [p for p in tmp_path.iterdir() if p.name.startswith("embedder-")]
    model = entry / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # flipped bytes in the weights
    model.write_bytes(bytes(data))
    rebuilt = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine="onnxruntime",
                       cache_dir=tmp_path)
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        assert hashlib.sha256(model.read_bytes()).hexdigest() == manifest["sha256"]
        inputs = [embedder.preprocess(p) for p in photos[:4]]
        assert np.sum(rebuilt.embed(inputs) * embedder.embed(inputs), axis=1).min() >= 0.9999
    finally:
        rebuilt.close()


def test_an_intact_but_wrong_export_is_caught_by_the_check(
        mobilenet_weights: Path, tmp_path: Path) -> None:
    """A cache entry whose file and manifest agree but hold another model's export (a
    stale or tampered cache): the check against torch on the probe batch catches it
    before first use, and it is rebuilt; a fresh export that disagrees is refused."""
    require("onnxruntime")
    import timm

    from shared.models.onnx_engine import OnnxRuntimeEngine

    first = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine="onnxruntime",
                     cache_dir=tmp_path)
    first.close()
    [entry] = [p for p in tmp_path.iterdir() if p.name.startswith("embedder-")]
    manifest = json.loads((entry / MANIFEST).read_text())
    other = timm.create_model(MOBILENET, pretrained=False, num_classes=0).eval()
    example = torch.zeros(1, 3, 224, 224)
    export_onnx(other, example, entry / MODEL_FILE)  # random weights, same key
    manifest["sha256"] = hashlib.sha256((entry / MODEL_FILE).read_bytes()).hexdigest()
    (entry / MANIFEST).write_text(json.dumps(manifest))
    fixed = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", engine="onnxruntime",
                     cache_dir=tmp_path)
    fixed.close()
    assert json.loads((entry / MANIFEST).read_text())["sha256"] != manifest["sha256"]

    # Refusal: an export that cannot match the reference is never used.
    probe = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        reference = timm.create_model(MOBILENET, pretrained=False, num_classes=0).eval()(
            probe).numpy()
    key = ExportKey("embedder", "mismatch-test", "0" * 16, (3, 224, 224))
    cache = ExportCache(tmp_path / "refuse")

    def agrees(engine: Any) -> str | None:
        cosine = check_vectors(reference, engine.run(probe.numpy()))
        return None if cosine >= 0.9999 else f"lowest cosine {cosine:.4f}"

    with pytest.raises(ModelError, match="does not match torch.*EMBED_ENGINE=torch"):
        verified("onnxruntime", "mismatch-test", cache, key,
                 lambda path: export_onnx(other, example, path),
                 lambda path: OnnxRuntimeEngine(path), agrees)


def test_two_processes_building_the_same_cache_end_with_one_valid_entry(
        mobilenet_weights: Path, tmp_path: Path) -> None:
    require("onnxruntime")
    command = [sys.executable, "-c", "from imgsearch.cli import main; main()", "engines",
               "build", "--engine", "onnxruntime", "--model", MOBILENET, "--weights",
               str(mobilenet_weights), "--cache-dir", str(tmp_path)]
    env = {**os.environ, "DETECTOR": "none"}
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    entries = sorted(p.name for p in tmp_path.iterdir())
    built = [name for name in entries if name.startswith("embedder-")]
    assert len(built) == 1, entries
    assert not [n for n in entries if n.startswith((".build-", ".trash-"))], entries
    key = ExportKey(**{k: v for k, v in json.loads(
        (tmp_path / built[0] / MANIFEST).read_text())["key"].items()
        if k in ("kind", "model", "weights")}, input_size=(3, 224, 224))
    assert ExportCache(tmp_path).find(key) is not None


def test_a_collection_built_with_torch_answers_queries_from_another_engine(
        make_settings: Any, birds: Path, engines: dict[str, Embedder], embedder: Any) -> None:
    from imgsearch.files import find_images as find
    from shared.components import Components
    from shared.events import ImageUploaded
    from shared.pipeline.stages import WorkItem
    from shared.query import QueryEmbedder, search

    files = list(find([birds]))[::100][:24]
    settings = make_settings(embed_engine="torch")
    components = Components.load(settings, embedder=embedder)
    try:
        report = components.ingest([
            WorkItem(f.image_id, ImageUploaded(f"e{n}", "test", f.image_id, f.path.as_uri(),
                                               None)) for n, f in enumerate(files)])
        assert report.count("stored") == len(files)
        for engine, other in engines.items():
            query = QueryEmbedder.from_settings(settings, other)
            for f in files:
                [hit] = search(components.store, query.embed_bytes(f.path.read_bytes()).vectors,
                               limit=1)
                assert hit.image_id == f.image_id and hit.score > 0.999, (engine, f, hit)
    finally:
        components.close()


def test_engines_list_says_what_auto_picks(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from imgsearch.cli import cli

    result = CliRunner().invoke(cli, ["engines", "list"],
                                env={"ENGINE_CACHE_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["auto_order"][0] == next(e for e in AUTO_ORDER["cpu"] if installed(e))
    assert shown["cache_dir"] == str(tmp_path)


# -- the detector -----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_detector_gives_torchs_boxes_on_every_engine(engine: str, cache_dir: Path) -> None:
    from tests.test_detection import require_yolov5

    require_yolov5()
    require(engine)
    from shared.detection import Detector

    weights = asset("weights/yolov5n.pt")
    images = [Image.open(asset(f"data/detect/{name}.jpg")).convert("RGB")
              for name in ("bus", "zidane")]
    reference = Detector(weights).detect(images)
    exported = Detector(weights, engine=engine, cache_dir=cache_dir)
    assert exported.engine == engine and exported.model is None
    for batch in (images, images[1:]):
        found = exported.detect(batch)
        for theirs, ours in zip(reference[-len(batch):], found, strict=True):
            assert [d.class_name for d in theirs] == [d.class_name for d in ours]
            for a, b in zip(theirs, ours, strict=True):
                assert np.abs(np.subtract(a.box, b.box)).max() <= 1.0, (a, b)
                assert abs(a.confidence - b.confidence) < 1e-3
    exported.close()


def test_gpu_providers_are_tensorrt_then_cuda_then_cpu(tmp_path: Path) -> None:
    """No GPU here: the provider lists ONNX Runtime gets on CUDA machines, as data."""
    from shared.errors import ConfigError
    from shared.models.onnx_engine import CPU, CUDA, TENSORRT, providers_for

    assert providers_for("cpu", [TENSORRT, CUDA, CPU]) == [CPU]
    chosen = providers_for("cuda:1", [TENSORRT, CUDA, CPU], cache_dir=tmp_path,
                           input_shape=(3, 224, 224), max_batch=64)
    assert [p if isinstance(p, str) else p[0] for p in chosen] == [TENSORRT, CUDA, CPU]
    trt = chosen[0][1]
    assert trt["device_id"] == 1 and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_profile_max_shapes"] == "input:64x3x224x224"
    assert providers_for("cuda", [CUDA, CPU]) == [(CUDA, {"device_id": 0}), CPU]
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        providers_for("cuda", [CPU])
