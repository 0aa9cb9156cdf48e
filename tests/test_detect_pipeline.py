"""Cropping in the ingest pipeline and the query API: real YOLOv5 weights, the real
embedding model, real photos, a real store, the API served on loopback.

Without the ``yolov5`` package these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from qdrant_client import QdrantClient

from query_api.app import create_app
from query_api.server import BackgroundServer
from shared.components import Components, collection_spec
from shared.detection import Cropper, CropMode, Detector
from shared.events import ImageDeleted, ImageUploaded
from shared.fetch import ImageFetcher
from shared.pipeline.report import BatchReport
from shared.pipeline.scheduler import run_all
from shared.pipeline.stages import WorkItem
from shared.store.base import PARENT_FIELD
from shared.store.qdrant import QdrantStore
from tests.conftest import asset
from tests.query_api_support import api_settings
from tests.test_detection import BACKGROUND_CLASSES, composite, iou, require_yolov5
from tests.test_web_page import chromium  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def yolo_weights() -> Path:
    require_yolov5()
    return asset("weights/yolov5n.pt")


@pytest.fixture(scope="module")
def detector(yolo_weights: Path) -> Detector:
    return Detector(yolo_weights, device="cpu")


class Stack:
    """Components around an in-memory Qdrant (qdrant-client local mode), so tests can count
    every point underneath, box points included."""

    def __init__(self, settings: Any, embedder: Any, detector: Detector | None,
                 mode: CropMode) -> None:
        self.settings = settings
        self.store = QdrantStore(QdrantClient(":memory:"), collection_spec(settings, embedder))
        self.components = Components(settings, embedder, self.store,
                                     ImageFetcher.from_settings(settings),
                                     Cropper(detector, mode))

    def process(self, items: Sequence[WorkItem], cropper: Cropper | None = None) -> BatchReport:
        pipeline = self.components.pipeline()
        if cropper is not None:
            pipeline.cropper = cropper
        try:
            report = run_all(pipeline, list(items), batch_size=self.settings.batch_size,
                             prepare_workers=2)
        finally:
            pipeline.close()
        assert not report.failures, [(r.item.key, str(r.error)) for r in report.failures]
        return report

    def points(self) -> int:
        return int(self.store.client.count(self.store.spec.name, exact=True).count)

    def close(self) -> None:
        self.components.close()


@pytest.fixture
def stack(tmp_path: Path, embedder: Any, detector: Detector, mobilenet_weights: Path,
          data_dir: Path, yolo_weights: Path) -> Iterator[Any]:
    made: list[Stack] = []

    def make(mode: CropMode = "largest", *, with_detector: bool = True) -> Stack:
        settings = api_settings(
            tmp_path / "unused", mobilenet_weights, [data_dir, tmp_path], api_warmup=False,
            detector="yolov5" if with_detector else "none",
            detector_weights=str(yolo_weights) if with_detector else None, crop_mode=mode)
        made.append(Stack(settings, embedder, detector if with_detector else None, mode))
        return made[-1]

    yield make
    for s in made:
        s.close()


def upload(path: Path, image_id: str | None = None, n: int = 0, **metadata: Any) -> WorkItem:
    image_id = image_id or path.name
    event = ImageUploaded(f"e-{image_id}-{n}", "tests", image_id, path.as_uri(), None, metadata)
    return WorkItem(image_id, event)


def load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def detect_photos() -> dict[str, Path]:
    folder = asset("data/detect")
    return {name: folder / f"{name}.jpg" for name in ("bus", "zidane")}


# -- ingest ------------------------------------------------------------------------------------


def test_largest_stores_the_largest_box_and_records_it(stack: Any, detector: Detector) -> None:
    s = stack("largest")
    photos = detect_photos()
    report = s.process([upload(p, name) for name, p in photos.items()])
    assert report.count("stored") == 2
    assert report.stage_seconds["detect"] > 0

    stored = s.store.get(list(photos))
    for name, path in photos.items():
        image = load(path)
        largest = max(detector.detect([image])[0], key=lambda d: d.area)
        crop = stored[name].payload["crop"]
        assert crop["cropped"] is True and crop["class"] == largest.class_name
        assert iou(crop["box"], largest.box) > 0.98, (crop["box"], largest.box)
        assert stored[name].payload["size"] == list(image.size)
        assert "yolov5" in stored[name].payload["detector"]
    assert stored["bus"].payload["crop"]["class"] == "bus"
    assert s.points() == 2  # largest: one point per image

    # Re-delivery of the same upload is skipped; another crop mode re-embeds.
    assert s.process([upload(p, name, 1) for name, p in photos.items()]).count("unchanged") == 2
    again = s.process([upload(p, name, 2) for name, p in photos.items()],
                      cropper=Cropper(detector, "all"))
    assert again.count("stored") == 2


def test_without_a_detector_the_payload_says_the_whole_image_was_used(stack: Any) -> None:
    s = stack(with_detector=False)
    path = detect_photos()["bus"]
    report = s.process([upload(path, "bus")])
    assert "detect" not in report.stage_seconds or report.stage_seconds["detect"] == 0
    payload = s.store.get(["bus"])["bus"].payload
    width, height = load(path).size
    assert payload["crop"] == {"cropped": False, "box": [0.0, 0.0, width, height]}
    assert "detector" not in payload


def test_all_stores_a_point_per_box_and_search_returns_each_image_once(
    stack: Any, detector: Detector, embedder: Any, birds: Path, yolo_weights: Path
) -> None:
    s = stack("all")
    photos = detect_photos()
    boxes = {name: detector.detect([load(p)])[0]
             for name, p in photos.items()}
    assert len(boxes["bus"]) >= 4 and len(boxes["zidane"]) >= 3
    bird_paths = one_bird_per_species(birds)[:20]
    s.process([upload(p, name) for name, p in photos.items()]
              + [upload(p, f"bird-{i}") for i, p in enumerate(bird_paths)])

    bird_boxes = sum(s.store.get([f"bird-{i}"])[f"bird-{i}"].payload["box_points"]
                     for i in range(len(bird_paths)))
    expected_points = 22 + len(boxes["bus"]) + len(boxes["zidane"]) + bird_boxes
    assert s.store.count() == 22, "count is of images, not of points"
    assert s.points() == expected_points
    bus = s.store.get(["bus"])["bus"].payload
    assert bus["box_points"] == len(boxes["bus"]) and bus["crop"]["cropped"] is False

    # A person cut from zidane.jpg: both photos hold people, each is returned once.
    zidane = load(photos["zidane"])
    person = next(d for d in boxes["zidane"] if d.class_name == "person")
    hits = s.store.search(embedder.embed_images([zidane.crop(person.box)])[0], limit=10)
    ids = [h.image_id for h in hits]
    assert len(ids) == len(set(ids)), ids
    assert ids[0] == "zidane" and "bus" in ids[:3], ids
    best = hits[0].payload
    assert best[PARENT_FIELD] == "zidane" and best["crop"]["class"] == "person"
    assert iou(best["crop"]["box"], person.box) > 0.98

    # Deleting an image deletes its box points.
    s.process([WorkItem("del", ImageDeleted("e-del", "tests", "bus"))])
    assert s.store.count() == 21 and s.points() == expected_points - 1 - len(boxes["bus"])
    # Re-ingesting with fewer objects leaves none of the old ones behind.
    people_only = Cropper(Detector(yolo_weights, classes=["person"]), "all")
    s.process([upload(photos["zidane"], "zidane", 1)], cropper=people_only)
    people = sum(d.class_name == "person" for d in boxes["zidane"])
    assert s.points() == expected_points - 1 - len(boxes["bus"]) - (len(boxes["zidane"]) - people)


# -- query: cropping changes the answer ------------------------------------------------------


def one_bird_per_species(birds: Path) -> list[Path]:
    first: dict[str, Path] = {}
    with (birds / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test":
                first.setdefault(row["label"], birds / row["path"])
    return list(first.values())


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_query_crop_modes_on_birds_pasted_into_scenes(
    stack: Any, detector: Detector, birds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gallery is ingested with CROP_MODE=largest; queries are the same birds pasted
    small into unrelated scenes (about 6% of the frame). The API crops them as the gallery
    was, by default."""
    s = stack("largest")
    originals = one_bird_per_species(birds)
    assert len(originals) == 50
    s.process([upload(p, p.parent.name + "/" + p.name) for p in originals])

    sample = asset("data/imagenet-sample")
    with (sample / "labels.csv").open() as handle:
        scenes = [load(sample / r["path"]) for r in csv.DictReader(handle)
                  if r["name"] in BACKGROUND_CLASSES]
    backgrounds = [b for b, f in zip(scenes, detector.detect(scenes), strict=True) if not f]
    rng = random.Random(11)
    queries = [jpeg(composite(load(p), backgrounds[n % len(backgrounds)],
                              rng)) for n, p in enumerate(originals)]

    app = create_app(s.components, settings=s.settings)
    top1: dict[str, int] = {}
    with BackgroundServer(app, port=s.settings.api_port) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        assert client.get("/readyz").json()["crop"] == "largest"
        for mode in ("default", "none", "all"):
            found = 0
            for original, data in zip(originals, queries, strict=True):
                params = {"limit": 5} if mode == "default" else {"limit": 5, "crop": mode}
                response = client.post("/search", content=data, params=params,
                                       headers={"content-type": "image/jpeg"})
                assert response.status_code == 200, response.text
                body = response.json()
                ids = [h["image_id"] for h in body["hits"]]
                assert len(ids) == len(set(ids))
                found += ids[0] == original.parent.name + "/" + original.name
                if mode == "default":
                    assert body["crop"] == "largest" and len(body["query_crops"]) == 1
                    assert body["timing"]["detect_ms"] > 0
                    assert body["hits"][0]["matched"]["box"]
                elif mode == "all":
                    assert body["query_crops"][0]["cropped"] is False  # the whole image first
            top1[mode] = found
    with capsys.disabled():
        print(f"\n  birds pasted into scenes, gallery CROP_MODE=largest, top-1 = original: "
              f"crop=largest {top1['default']}/50, none {top1['none']}/50, all {top1['all']}/50")
    # Measured 34, 18 and 34 of 50. The misses: scenes where the bird was not the largest
    # detection (or nothing was found), and gallery photos, already tight shots of the bird,
    # in which the detector found something small (a "bottle") and cropped that.
    assert top1["default"] >= 30, top1
    assert top1["default"] >= top1["none"] + 10, top1
    assert top1["all"] >= 30, top1


def test_crop_without_a_detector_is_a_clear_422(stack: Any, birds: Path) -> None:
    s = stack(with_detector=False)
    app = create_app(s.components, settings=s.settings)
    data = one_bird_per_species(birds)[0].read_bytes()
    with BackgroundServer(app, port=s.settings.api_port) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        ok = client.post("/search", content=data, headers={"content-type": "image/jpeg"})
        assert ok.status_code == 200 and ok.json()["crop"] == "none"
        refused = client.post("/search", content=data, params={"crop": "largest"},
                              headers={"content-type": "image/jpeg"})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["code"] == "crop_unavailable" and "DETECTOR" in error["message"]
        bad = client.post("/search", content=data, params={"crop": "biggest"},
                          headers={"content-type": "image/jpeg"})
        assert bad.status_code == 422


def test_the_page_outlines_the_object_it_searched_with(
    stack: Any, detector: Detector, birds: Path, tmp_path: Path, chromium: str
) -> None:
    from tests.test_web_page import ARTIFACTS, in_browser

    s = stack("largest")
    originals = one_bird_per_species(birds)[:12]
    s.process([upload(p, p.parent.name + "/" + p.name) for p in originals])
    sample = asset("data/imagenet-sample")
    with (sample / "labels.csv").open() as handle:
        scenes = [load(sample / r["path"]) for r in csv.DictReader(handle)
                  if r["name"] in BACKGROUND_CLASSES]
    scene = next(b for b, f in zip(scenes, detector.detect(scenes), strict=True) if not f)
    query = tmp_path / "bird-in-a-scene.jpg"
    query.write_bytes(jpeg(composite(load(originals[3]), scene, random.Random(5))))
    ARTIFACTS.mkdir(exist_ok=True)

    app = create_app(s.components, settings=s.settings)
    with BackgroundServer(app, port=s.settings.api_port) as srv:
        async def scenario(page: Any) -> None:
            await page.goto(srv.url + "/")
            await page.wait_for_function("!document.querySelector('#crop-option').hidden")
            await page.set_input_files("#file-input", str(query))
            await page.wait_for_selector("#results[data-state=done]", timeout=60_000)
            await page.wait_for_selector(".crop-box", timeout=10_000)
            label = await page.text_content(".crop-box span")
            assert label and label.startswith("bird"), label
            first = await page.eval_on_selector("#results li.card", "e => e.dataset.imageId")
            assert first == originals[3].parent.name + "/" + originals[3].name
            assert "detect" in await page.text_content("#timing")
            await page.screenshot(path=str(ARTIFACTS / "web-page-crop.png"), full_page=True)

            # Searching with the whole image instead drops the outline.
            await page.select_option("#crop", "none")
            await page.wait_for_function("!document.querySelector('.crop-box')")

        in_browser(scenario)


def test_concurrent_queries_share_detector_passes_and_get_their_own_boxes(
    stack: Any, birds: Path
) -> None:
    """Query detection is micro-batched like embedding: concurrent queries share a
    detector forward pass, and each still gets exactly the boxes it gets alone (every
    image has its own letterbox square, so its batch-mates cannot change its boxes)."""
    import asyncio

    s = stack("largest")
    photos = [*detect_photos().values(), *one_bird_per_species(birds)[:6]]
    s.process([upload(p, p.name, n) for n, p in enumerate(photos)])
    bodies = [p.read_bytes() for p in photos]

    def detect_batches(client: httpx.Client) -> float:
        text = client.get("/metrics").text
        line = next(x for x in text.splitlines()
                    if x.startswith("imgsearch_api_detect_batch_size_count"))
        return float(line.split()[-1])

    app = create_app(s.components, settings=s.settings.model_copy(
        update={"api_batch_max_wait_ms": 50.0}))
    with BackgroundServer(app, port=s.settings.api_port) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        alone = [client.post("/search", content=b, params={"crop": "all", "limit": 3},
                             headers={"content-type": "image/jpeg"}).json() for b in bodies]
        before = detect_batches(client)

        async def together() -> list[Any]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                return await asyncio.gather(*(
                    ac.post("/search", content=b, params={"crop": "all", "limit": 3},
                            headers={"content-type": "image/jpeg"}) for b in bodies))

        concurrent = [r.json() for r in asyncio.run(together())]
        passes = detect_batches(client) - before
    assert passes < len(bodies), f"{len(bodies)} concurrent queries took {passes} passes"
    for one, many in zip(alone, concurrent, strict=True):
        assert [c["class"] for c in one["query_crops"]] == [c["class"] for c in many["query_crops"]]
        for a, b in zip(one["query_crops"], many["query_crops"], strict=True):
            assert iou(a["box"], b["box"]) > 0.99
        assert [h["image_id"] for h in one["hits"]] == [h["image_id"] for h in many["hits"]]
