"""Kept images (shared/blobs.py): what an inline upload leaves behind so a re-index can
embed it again, how big it is, and when it goes."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from shared.blobs import DirectoryBlobs, blob_key, derivative, open_blobs
from shared.components import Components
from shared.config import load_settings
from shared.events import ImageDeleted, parse_event, upload_event
from shared.pipeline.stages import WorkItem
from tests.conftest import MOBILENET


def jpeg(size: tuple[int, int], *, orientation: int | None = None, quality: int = 90) -> bytes:
    image = Image.new("RGB", size, (200, 120, 40))
    image.paste((20, 60, 200), (0, 0, size[0] // 2, size[1] // 3))  # something to see
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(out, format="JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def test_a_small_upright_jpeg_is_kept_byte_for_byte() -> None:
    data = jpeg((640, 480))
    assert derivative(data) == data


@pytest.mark.parametrize(("size", "orientation", "kept"), [
    ((4032, 3024), None, (1024, 768)),  # a phone photo: shrunk to 1024 on its long side
    ((3024, 4032), None, (768, 1024)),
    ((800, 600), 6, (600, 800)),  # turned by EXIF: kept upright
    ((4032, 3024), 6, (768, 1024)),
])
def test_large_or_turned_images_are_kept_upright_and_bounded(
        size: tuple[int, int], orientation: int | None, kept: tuple[int, int]) -> None:
    out = derivative(jpeg(size, orientation=orientation))
    with Image.open(io.BytesIO(out)) as image:
        assert image.format == "JPEG"
        assert image.size == kept
        assert image.getexif().get(0x0112) in (None, 1)


def test_other_formats_become_jpeg() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (300, 200), (10, 200, 10, 128)).save(out, format="PNG")
    with Image.open(io.BytesIO(derivative(out.getvalue()))) as image:
        assert image.format == "JPEG" and image.size == (300, 200)


def test_a_directory_keeps_bytes_by_image_id(tmp_path: Path) -> None:
    blobs = DirectoryBlobs(tmp_path / "blobs")
    odd = "shop/sku 1/ünïcode:front.jpg"
    blobs.put(odd, b"one")
    blobs.put("x", b"two")
    assert blobs.get(odd) == b"one" and blobs.get("missing") is None
    key = blob_key(odd)
    assert (tmp_path / "blobs" / key).is_file() and key.count("/") == 2
    blobs.put(odd, b"three")  # a new upload replaces the old one
    assert blobs.get(odd) == b"three"
    blobs.delete(odd)
    blobs.delete(odd)  # idempotent
    assert blobs.get(odd) is None
    assert sorted(blobs.sizes()) == [3]


def test_where_blobs_are_kept_by_default(tmp_path: Path) -> None:
    embedded = open_blobs(load_settings(qdrant_path=tmp_path))
    assert isinstance(embedded, DirectoryBlobs)
    assert embedded.root == tmp_path / "imgsearch-blobs"
    assert open_blobs(load_settings(qdrant_url="http://127.0.0.1:1")) is None  # no shared dir
    assert open_blobs(load_settings(qdrant_path=tmp_path, blob_store="off")) is None
    assert open_blobs(load_settings(qdrant_path=tmp_path, blob_keep="none")) is None
    assert isinstance(open_blobs(load_settings(qdrant_url="http://127.0.0.1:1",
                                               blob_store=str(tmp_path / "b"))), DirectoryBlobs)


def _inline(image_id: str, data: bytes) -> WorkItem:
    return WorkItem(image_id, parse_event(
        json.dumps(upload_event(image_id, image_bytes=data)).encode()))


def test_ingest_keeps_inline_uploads_before_their_point_and_drops_them_with_it(
        tmp_path: Path, mobilenet_weights: Path, birds: Path, embedder: Any) -> None:
    settings = load_settings(qdrant_path=tmp_path / "store", model_name=MOBILENET,
                             model_weights=mobilenet_weights, device="cpu",
                             image_file_roots=[birds])
    photos = sorted(birds.rglob("*.jpg"))[:6]
    components = Components.load(settings, embedder=embedder)
    try:
        assert components.blobs is not None
        report = components.ingest(
            [_inline(f"up/{n}", p.read_bytes()) for n, p in enumerate(photos[:4])]
            + [WorkItem("file", parse_event(json.dumps(
                upload_event("by-uri", uri=photos[4].as_uri())).encode()))])
        assert [r.outcome for r in report.results] == ["stored"] * 5
        for n, p in enumerate(photos[:4]):
            # 227 px bird JPEGs are kept as they came: the re-index embeds the same bytes.
            assert components.blobs.get(f"up/{n}") == p.read_bytes()
        assert components.blobs.get("by-uri") is None  # its uri is enough
        components.ingest([WorkItem("del", ImageDeleted("e", "t", "up/0"))])
        assert components.blobs.get("up/0") is None
        assert components.store.get(["up/0"]) == {}
    finally:
        components.close()


def test_kept_bytes_per_image(data_dir: Path) -> None:
    """What keeping costs: real photos as they are, and the same photos at phone size."""
    photos = sorted((data_dir / "imagenet-sample").rglob("*.JPEG"))[:60]
    assert photos
    as_is = [len(derivative(p.read_bytes())) for p in photos]
    phone = []
    for p in photos[:15]:
        with Image.open(p) as image:
            big = image.convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        big.save(out, format="JPEG", quality=90)
        phone.append((len(out.getvalue()), len(derivative(out.getvalue()))))
    print(f"\nkept bytes per image: ImageNet sample (about 500x375, kept as is) mean "
          f"{statistics.mean(as_is) / 1024:.0f} KiB; the same photos as 12 MP q90 JPEGs "
          f"(mean {statistics.mean(a for a, _ in phone) / 1024:.0f} KiB) keep "
          f"{statistics.mean(b for _, b in phone) / 1024:.0f} KiB (1024 px, q90)")
    assert max(b for _, b in phone) < 600 * 1024
    assert all(b < a for a, b in phone)

