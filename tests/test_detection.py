"""Optional YOLOv5 cropping: real weights, real photos, real model, real store.

The tests that run the detector need the ``yolov5`` package (``pip install
'imgsearch[detect]'``). Without it they skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import load_settings
from shared.detection import (
    INSTALL_HINT,
    Cropper,
    Detection,
    Detector,
    crop,
    resolve_weights,
    select_crops,
)
from shared.errors import ConfigError, ModelError
from tests.conftest import REPO, asset

# ImageNet-sample classes that are scenery and textures: unrelated backgrounds for birds.
BACKGROUND_CLASSES = (
    "alp", "cliff", "geyser", "promontory", "seashore", "volcano", "rapeseed", "maze",
    "quilt", "tile_roof", "breakwater", "viaduct", "worm_fence", "stupa", "obelisk",
    "water_tower", "cliff_dwelling", "manhole_cover", "bell_cote", "dome", "greenhouse",
)


def det(box: Sequence[float], conf: float = 0.9, name: str = "thing") -> Detection:
    return Detection((float(box[0]), float(box[1]), float(box[2]), float(box[3])), conf, name)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def classes(found: Sequence[Detection]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in found:
        counts[d.class_name] = counts.get(d.class_name, 0) + 1
    return counts


def assert_same_detections(a: Sequence[Detection], b: Sequence[Detection], *,
                           min_iou: float, min_conf: float = 0.0) -> None:
    """Every confident detection of ``a`` has one of the same class in ``b`` that
    overlaps it by ``min_iou``, and the other way round."""
    for left, right in ((a, b), (b, a)):
        for d in left:
            if d.confidence < min_conf:
                continue
            best = max((iou(d.box, o.box) for o in right if o.class_name == d.class_name),
                       default=0.0)
            assert best >= min_iou, f"{d} has no match in {list(right)} (best IoU {best:.2f})"


# -- crop selection and cutting: pure, no model -------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        ([(0, 0, 10, 10), (0, 0, 50, 40), (10, 10, 30, 30)], (0, 0, 50, 40)),
        ([(5, 5, 105, 15), (0, 0, 40, 40)], (0, 0, 40, 40)),  # 1000 px < 1600 px
        ([(0, 0, 20, 20)], (0, 0, 20, 20)),
    ],
)
def test_largest_picks_the_largest_box(
    boxes: list[tuple[int, ...]], expected: tuple[int, ...]
) -> None:
    crops = select_crops([det(b) for b in boxes], "largest", (200, 100))
    assert [c.box for c in crops] == [tuple(float(v) for v in expected)]
    assert not crops[0].whole and crops[0].detection is not None


def test_largest_tie_goes_to_the_more_confident_box() -> None:
    a, b = det((0, 0, 10, 10), 0.4, "cat"), det((20, 20, 30, 30), 0.8, "dog")
    assert select_crops([a, b], "largest", (40, 40))[0].detection == b


def test_largest_falls_back_to_the_whole_image() -> None:
    crops = select_crops([], "largest", (640, 480))
    assert len(crops) == 1 and crops[0].whole and crops[0].box == (0.0, 0.0, 640.0, 480.0)
    assert crops[0].payload() == {"cropped": False, "box": [0.0, 0.0, 640.0, 480.0]}


def test_all_gives_the_whole_image_and_every_box() -> None:
    found = [det((1, 2, 30, 40), 0.9, "person"), det((50, 50, 60, 70), 0.3, "tie")]
    crops = select_crops(found, "all", (100, 100))
    assert crops[0].whole and crops[0].box == (0.0, 0.0, 100.0, 100.0)
    assert [c.detection for c in crops[1:]] == found
    assert crops[1].payload() == {"cropped": True, "box": [1.0, 2.0, 30.0, 40.0],
                                  "class": "person", "confidence": 0.9}
    assert [c.whole for c in select_crops([], "all", (100, 100))] == [True]


def test_crop_cuts_the_box_from_pixels_decoded_at_another_scale() -> None:
    # A red square at (400..600, 200..300) of an 800x600 original, decoded at half scale.
    original = Image.new("RGB", (800, 600), (0, 0, 255))
    original.paste((255, 0, 0), (400, 200, 600, 300))
    decoded = original.resize((400, 300), Image.Resampling.NEAREST)
    piece = crop(decoded, (400.0, 200.0, 600.0, 300.0), original_size=(800, 600))
    assert piece.size == (100, 50)
    assert np.asarray(piece).reshape(-1, 3).min(0).tolist() == [255, 0, 0]
    assert np.asarray(piece).reshape(-1, 3).max(0).tolist() == [255, 0, 0]
    # Fractional boxes round outwards; the whole box returns the decoded image itself.
    assert crop(original, (10.2, 10.7, 20.1, 30.0)).size == (11, 20)
    assert crop(decoded, (0.0, 0.0, 800.0, 600.0), original_size=(800, 600)) is decoded


def test_cropper_without_detector_embeds_the_whole_image() -> None:
    image = Image.new("RGB", (32, 24))
    [[only]] = Cropper(None, "all").crops_for([image])
    assert only.whole and only.image is image and only.box == (0.0, 0.0, 32.0, 24.0)


# -- configuration and loading errors ------------------------------------------------------


def test_settings_default_to_no_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.detector == "none" and settings.crop_mode == "largest"
    monkeypatch.setenv("DETECTOR_CLASSES", "person, traffic light,tie")
    assert load_settings().detector_classes == ["person", "traffic light", "tie"]


def test_settings_refuse_a_detector_without_weights() -> None:
    with pytest.raises(ConfigError, match="DETECTOR_WEIGHTS"):
        load_settings(detector="yolov5")
    with pytest.raises(ConfigError, match="DETECTOR_IMG_SIZE"):
        load_settings(detector_img_size=500)


def test_missing_weights_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_weights(str(tmp_path / "yolov5n.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        Detector(tmp_path / "yolov5n.pt")


def test_missing_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the yolov5 package a checkpoint cannot load; the error says what to install."""
    weights = tmp_path / "yolov5n.pt"
    weights.write_bytes(b"checkpoint")
    monkeypatch.setitem(sys.modules, "yolov5", None)  # as if it were not installed
    with pytest.raises(ConfigError) as info:
        Detector(weights)
    assert INSTALL_HINT in str(info.value) and "TorchScript" in str(info.value)


def test_corrupt_torchscript_is_a_model_error(tmp_path: Path) -> None:
    weights = tmp_path / "broken.torchscript"
    with zipfile.ZipFile(weights, "w") as archive:
        archive.writestr("broken/constants.pkl", b"not a pickle")
        archive.writestr("broken/code/__torch__.py", b"garbage")
    with pytest.raises(ModelError, match="TorchScript"):
        Detector(weights)


# -- the real detector ----------------------------------------------------------------------


def require_yolov5() -> None:
    if importlib.util.find_spec("yolov5") is None:
        message = f"the yolov5 package is not installed: {INSTALL_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def yolo_weights() -> Path:
    require_yolov5()
    return asset("weights/yolov5n.pt")


@pytest.fixture(scope="module")
def detector(yolo_weights: Path) -> Detector:
    return Detector(yolo_weights, device="cpu")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    folder = asset("data/detect")
    return {name: Image.open(folder / f"{name}.jpg").convert("RGB") for name in ("bus", "zidane")}


@pytest.fixture(scope="module")
def found(detector: Detector, photos: dict[str, Image.Image]) -> dict[str, list[Detection]]:
    return {name: detector.detect([image])[0] for name, image in photos.items()}


def test_bus_has_a_bus_and_several_people(found: dict[str, list[Detection]]) -> None:
    counts = classes(found["bus"])
    assert counts.get("bus") == 1 and counts.get("person", 0) >= 3, counts
    assert set(counts) == {"bus", "person"}, counts
    bus = next(d for d in found["bus"] if d.class_name == "bus")
    assert bus.box[2] - bus.box[0] > 600  # the bus spans most of the 810 px width


def test_zidane_has_people_and_a_tie(found: dict[str, list[Detection]]) -> None:
    assert classes(found["zidane"]) == {"person": 2, "tie": 1}
    tie = next(d for d in found["zidane"] if d.class_name == "tie")
    # The tie hangs below the face of the man on the left, well inside the 1280x720 frame.
    assert 400 < tie.box[0] < tie.box[2] < 520 and 400 < tie.box[1] < tie.box[3] <= 720


def test_detections_are_in_original_pixels_and_most_confident_first(
    found: dict[str, list[Detection]], photos: dict[str, Image.Image]
) -> None:
    for name, detections in found.items():
        width, height = photos[name].size
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        confidences = [d.confidence for d in detections]
        assert confidences == sorted(confidences, reverse=True)


def test_largest_crop_of_bus_is_the_bus(
    detector: Detector, photos: dict[str, Image.Image]
) -> None:
    [[chosen]] = Cropper(detector, "largest").crops_for([photos["bus"]])
    assert chosen.detection is not None and chosen.detection.class_name == "bus"
    x0, y0, x1, y1 = chosen.box
    assert chosen.image is not None
    assert abs(chosen.image.width - (x1 - x0)) <= 2 and abs(chosen.image.height - (y1 - y0)) <= 2
    assert chosen.payload()["cropped"] is True and chosen.payload()["class"] == "bus"


def test_all_crops_index_every_box_plus_the_whole_image(
    detector: Detector, photos: dict[str, Image.Image], found: dict[str, list[Detection]]
) -> None:
    [crops] = Cropper(detector, "all").crops_for([photos["zidane"]])
    assert crops[0].whole and crops[0].image is photos["zidane"]
    assert [c.detection for c in crops[1:]] == found["zidane"]
    for c in crops[1:]:
        assert c.image is not None and c.image.size[0] >= 1


def test_boxes_map_back_from_a_rescaled_decode(
    detector: Detector, photos: dict[str, Image.Image], found: dict[str, list[Detection]]
) -> None:
    """An image decoded at half scale (JPEG draft) still reports full-size coordinates."""
    bus = photos["bus"]
    half = bus.resize((bus.width // 2, bus.height // 2), Image.Resampling.BILINEAR)
    [scaled] = detector.detect([half], original_sizes=[bus.size])
    assert_same_detections(found["bus"], scaled, min_iou=0.85, min_conf=0.5)


def test_boxes_map_back_through_the_letterbox(
    detector: Detector, photos: dict[str, Image.Image], found: dict[str, list[Detection]]
) -> None:
    """The bus pasted off-centre into a wide grey canvas: another scale and padding in
    the letterbox; the boxes come back shifted by exactly the paste offset."""
    bus = photos["bus"]
    dx, dy = 700, 120
    canvas = Image.new("RGB", (bus.width + 900, bus.height + 300), (114, 114, 114))
    canvas.paste(bus, (dx, dy))
    [padded] = detector.detect([canvas])
    shifted = [Detection((d.box[0] - dx, d.box[1] - dy, d.box[2] - dx, d.box[3] - dy),
                         d.confidence, d.class_name) for d in padded]
    assert_same_detections(found["bus"], shifted, min_iou=0.8, min_conf=0.6)


def test_a_batch_gives_the_same_boxes_as_one_by_one(
    detector: Detector, photos: dict[str, Image.Image]
) -> None:
    images = [photos["bus"], photos["zidane"], photos["zidane"].crop((0, 0, 700, 720)),
              photos["bus"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    batched = detector.detect(images)
    for image, together in zip(images, batched, strict=True):
        [alone] = detector.detect([image])
        assert [d.class_name for d in together] == [d.class_name for d in alone]
        for a, b in zip(together, alone, strict=True):
            assert np.allclose(a.box, b.box, atol=0.5) and abs(a.confidence - b.confidence) < 1e-3


def test_agrees_with_the_yolov5_packages_own_inference(
    yolo_weights: Path, photos: dict[str, Image.Image], found: dict[str, list[Detection]]
) -> None:
    """The letterbox and NMS here are our own (batched); YOLOv5's AutoShape is the
    reference. It pads a photo only to its own rectangle, where ours pads to the square,
    and it resizes with OpenCV, not Pillow: the confident objects must agree, not every
    marginal one."""
    from yolov5.models.common import AutoShape

    fresh = Detector(yolo_weights)
    reference = AutoShape(fresh.model)  # a fresh copy: AutoShape retunes the head it wraps
    for name, image in photos.items():
        with warnings.catch_warnings():
            # AutoShape calls torch.cuda.amp.autocast, which torch 2.15 deprecates.
            warnings.filterwarnings("ignore", category=FutureWarning, module="yolov5")
            frame = reference(image, size=640).xyxy[0].cpu().numpy()
        theirs = [Detection(tuple(float(v) for v in row[:4]), float(row[4]),  # type: ignore[arg-type]
                            fresh.names[int(row[5])]) for row in frame]
        assert_same_detections(found[name], theirs, min_iou=0.85, min_conf=0.6)


def test_class_allow_list(yolo_weights: Path, photos: dict[str, Image.Image]) -> None:
    only_ties = Detector(yolo_weights, classes=["tie"])
    [found] = only_ties.detect([photos["zidane"]])
    assert found and {d.class_name for d in found} == {"tie"}
    with pytest.raises(ConfigError, match="did you mean tie"):
        Detector(yolo_weights, classes=["ties"])


def test_trusted_full_unpickling_loads_the_same_model(
    yolo_weights: Path, photos: dict[str, Image.Image], found: dict[str, list[Detection]]
) -> None:
    trusted = Detector(yolo_weights, trust_pickle=True)
    assert trusted.detect([photos["bus"]])[0] == found["bus"]


def test_a_file_that_is_not_a_checkpoint_is_a_model_error(yolo_weights: Path,
                                                          tmp_path: Path) -> None:
    bad = tmp_path / "yolov5n.pt"
    bad.write_bytes(b"\x80\x04 this is not a torch checkpoint")
    with pytest.raises(ModelError, match="cannot load DETECTOR_WEIGHTS"):
        Detector(bad)


def test_from_settings(yolo_weights: Path) -> None:
    assert Cropper.from_settings(load_settings(), device="cpu").detector is None
    settings = load_settings(detector="yolov5", detector_weights=str(yolo_weights),
                             detector_conf=0.5, crop_mode="all")
    cropper = Cropper.from_settings(settings, device="cpu")
    assert cropper.mode == "all" and cropper.detector is not None
    assert cropper.detector.conf == 0.5 and cropper.detector.info["backend"] == "yolov5"


def test_loading_and_detecting_sends_nothing_over_the_network(yolo_weights: Path) -> None:
    """yolov5 imports ultralytics, which probes public DNS names on import to see whether
    it is online. In a fresh process, every name lookup and connection is recorded."""
    script = f"""
import socket, sys
calls = []
real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *args, **kwargs):
    calls.append(("getaddrinfo", host))
    return real_getaddrinfo(host, *args, **kwargs)
def connect(self, address):
    calls.append(("connect", address))
    return real_connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
from pathlib import Path
import torch
from PIL import Image
from shared.detection import Detector
detector = Detector(Path({str(yolo_weights)!r}))
found = detector.detect([Image.new("RGB", (320, 240), (90, 120, 200))])
print(calls, found)
sys.exit(1 if calls else 0)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def test_torchscript_export_runs_without_the_package(
    yolo_weights: Path, photos: dict[str, Image.Image], found: dict[str, list[Detection]],
    tmp_path: Path,
) -> None:
    """A TorchScript file from YOLOv5's exporter gives the same boxes, in a process
    where the yolov5 package cannot be imported at all."""
    import torch
    from yolov5.export import export_torchscript
    from yolov5.models.yolo import Detect

    model = Detector(yolo_weights).model  # a fresh copy: export mode changes the head
    for module in model.modules():
        if isinstance(module, Detect):
            module.inplace, module.export = False, True
    example = torch.zeros(1, 3, 640, 640)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about the head's shape checks
        model(example)
        exported, _ = export_torchscript(model, example, tmp_path / "yolov5n.pt", False)
    assert exported is not None and Path(exported).is_file()

    script = f"""
import json, sys
sys.modules["yolov5"] = None  # the package-free path must not need it
from pathlib import Path
import torch
from PIL import Image
from shared.detection import Detector
detector = Detector(Path({str(exported)!r}))
images = [Image.open(p).convert("RGB") for p in sys.argv[1:]]
print(json.dumps([[[d.box, d.confidence, d.class_name] for d in found]
                  for found in detector.detect(images)]))
"""
    paths = [str(asset(f"data/detect/{name}.jpg")) for name in photos]
    run = subprocess.run([sys.executable, "-W", "error", "-c", script, *paths], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, rows in zip(photos, json.loads(run.stdout), strict=True):
        scripted = [Detection(tuple(box), conf, cls) for box, conf, cls in rows]
        assert [d.class_name for d in scripted] == [d.class_name for d in found[name]]
        for a, b in zip(scripted, found[name], strict=True):
            assert np.allclose(a.box, b.box, atol=1.0) and abs(a.confidence - b.confidence) < 1e-3


# -- what cropping changes: a bird pasted small into an unrelated photo ----------------------


def composite(bird: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    """The bird photo at 224 px, somewhere in the background scaled to 1024 px wide:
    about 5% of the frame, the way a product sits in a cluttered snapshot."""
    width = 1024
    scene = background.resize((width, round(background.height * width / background.width)),
                              Image.Resampling.BICUBIC)
    side = 224
    scene.paste(bird.resize((side, side), Image.Resampling.BICUBIC),
                (rng.randrange(0, scene.width - side), rng.randrange(0, scene.height - side)))
    return scene


def top1(embedder: Any, store: Any, images: Sequence[Image.Image]) -> list[str]:
    vectors = embedder.embed_images(images)
    return [store.search(v, limit=1)[0].image_id for v in vectors]


def test_largest_crop_finds_the_pasted_birds_original(
    detector: Detector, embedder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from qdrant_client import QdrantClient

    from shared.store.base import CollectionSpec, PointRecord
    from shared.store.qdrant import QdrantStore

    birds_dir, sample = asset("data/birds"), asset("data/imagenet-sample")
    first_of_species: dict[str, str] = {}  # one test photo per species, 50 in all
    with (birds_dir / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test":
                first_of_species.setdefault(row["label"], row["path"])
    originals = {path: Image.open(birds_dir / path).convert("RGB")
                 for path in first_of_species.values()}
    assert len(originals) == 50

    with (sample / "labels.csv").open() as handle:
        scenes = [Image.open(sample / r["path"]).convert("RGB") for r in csv.DictReader(handle)
                  if r["name"] in BACKGROUND_CLASSES]
    # Unrelated backgrounds hold nothing the detector knows; otherwise "largest" would
    # rightly crop that object instead of the bird.
    backgrounds = [s for s, f in zip(scenes, detector.detect(scenes), strict=True) if not f]
    assert len(backgrounds) >= 8, f"only {len(backgrounds)} empty backgrounds"

    spec = CollectionSpec(name="birds", dim=embedder.dim, model=embedder.info.as_metadata())
    store = QdrantStore(QdrantClient(":memory:"), spec)
    ids = list(originals)
    store.upsert([PointRecord(i, v, {"image_id": i}) for i, v in
                  zip(ids, embedder.embed_images(list(originals.values())), strict=True)])

    rng = random.Random(7)
    queries = [composite(originals[i], backgrounds[n % len(backgrounds)], rng)
               for n, i in enumerate(ids)]
    whole = top1(embedder, store, queries)
    crops = Cropper(detector, "largest").crops_for(queries)
    cropped = top1(embedder, store, [c[0].image for c in crops])  # type: ignore[misc]

    hits_whole = sum(a == b for a, b in zip(whole, ids, strict=True))
    hits_cropped = sum(a == b for a, b in zip(cropped, ids, strict=True))
    birds_found = sum(1 for c in crops if c[0].detection and c[0].detection.class_name == "bird")
    with capsys.disabled():
        print(f"\n  pasted-bird queries: top-1 = original  without cropping {hits_whole}/50, "
              f"CROP_MODE=largest {hits_cropped}/50 (largest box was a bird in "
              f"{birds_found}/50; {len(backgrounds)} backgrounds)")
    assert hits_cropped >= 40, (hits_cropped, hits_whole)
    assert hits_cropped >= hits_whole + 10, (hits_cropped, hits_whole)


def test_loading_the_detector_leaves_pillow_and_torch_alone(detector: Detector) -> None:
    """ultralytics patches PIL.Image.open and torch.save on import; the rest of the product
    must keep their own behaviour (an unknown format is undecodable, not an import error)."""
    from PIL import Image as PILImage

    from shared.errors import UndecodableImageError
    from shared.images import decode_image

    assert PILImage.open.__module__ == "PIL.Image"
    assert torch.save.__module__ == "torch.serialization"
    with pytest.raises(UndecodableImageError):
        decode_image(b"just some text, named .jpg", max_pixels=10_000)


def test_with_a_detector_phone_photos_decode_for_the_detector(detector: Detector,
                                                              embedder: Any) -> None:
    """A 12 MP JPEG decodes at 1/2 scale (2016 px, covering DETECT_MAX_SIDE) and shrinks
    to 1280 for the detector; the payload's size and boxes stay in original pixels."""
    from bench.phone_photos import phone_jpeg
    from shared.detection import DETECT_MAX_SIDE
    from shared.events import ImageUploaded
    from shared.fetch import ImageFetcher
    from shared.images import DecodeNeed
    from shared.pipeline.stages import IngestPipeline

    pipeline = IngestPipeline(embedder, None, ImageFetcher(), max_pixels=10**8,  # type: ignore[arg-type]
                              cropper=Cropper(detector, "largest"))
    try:
        assert pipeline.decode_need == DecodeNeed(359, DETECT_MAX_SIDE)
        data = phone_jpeg(asset("data/detect/bus.jpg"), 0, orientation=6)
        prepared = pipeline.prepare(ImageUploaded("e", "test", "bus", None, data), None)
    finally:
        pipeline.close()
    assert prepared.size == (4032, 3024)
    assert prepared.image is not None and max(prepared.image.size) == DETECT_MAX_SIDE
    [crops] = Cropper(detector, "largest").crops_for([prepared.image], [prepared.size])
    assert crops[0].detection is not None and crops[0].detection.class_name == "bus"
    assert crops[0].box[2] <= 4032 and crops[0].box[3] <= 3024
