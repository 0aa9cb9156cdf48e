"""Scaled JPEG decode: phone photos decode at the smallest DCT scale that still covers
what the next step needs, keep their EXIF orientation, and embed as a full decode does
(cosine >= 0.99 per photo, phone-size versions of the shared photos)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.phone_photos import phone_jpeg, sources, upright
from shared.detection.cropper import DETECT_DECODE_NEED
from shared.fetch import ImageFetcher
from shared.images import DecodeNeed, decode, decode_image
from shared.pipeline.stages import IngestPipeline
from tests.conftest import ASSETS, asset

PHONE = (4032, 3024)


@pytest.mark.parametrize(("size", "need", "denominator"), [
    ((4032, 3024), DecodeNeed(359), 8),  # 504 x 378 still covers the model's 359 px
    ((3024, 4032), DecodeNeed(359), 8),
    ((2000, 1500), DecodeNeed(359), 4),  # 375 >= 359; 1/8 would give 188
    ((1600, 1200), DecodeNeed(359), 2),  # 1/4 would give 300
    ((500, 375), DecodeNeed(359), 1),  # ImageNet-size: no power-of-two scale fits
    ((227, 227), DecodeNeed(359), 1),  # smaller than the need: never scaled
    ((4032, 3024), DecodeNeed(359) | DETECT_DECODE_NEED, 2),  # long side 2016 >= 1280
    ((1280, 960), DETECT_DECODE_NEED, 1),
    ((4032, 3024), DecodeNeed(), 1),  # no need stated: full size
    ((100_000, 1), DecodeNeed(256), 1),  # a strip's short side rules
])
def test_the_smallest_scale_that_covers_the_need(size: tuple[int, int], need: DecodeNeed,
                                                  denominator: int) -> None:
    assert need.scale_for(size) == denominator


@pytest.fixture(scope="module")
def phone_sources() -> list[Path]:
    asset("data/imagenet-sample")
    found = sources(ASSETS)
    return found[::97][:6]  # ImageNet sample and birds, spread out


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_kept_at_every_scale(phone_sources: list[Path],
                                                 orientation: int) -> None:
    data = phone_jpeg(phone_sources[0], 0, orientation=orientation)
    full = decode(data, max_pixels=10**8)
    scaled = decode(data, max_pixels=10**8, need=DecodeNeed(256))
    assert full.size == scaled.size == PHONE  # the original's size, as a viewer shows it
    assert full.image.size == PHONE and scaled.image.size == (504, 378)  # 1/8
    assert scaled.scaled and not full.scaled
    # The same picture, the same way up: the scaled pixels match the full ones shrunk.
    reference = np.asarray(upright(phone_sources[0], 0).resize((504, 378)), dtype=np.float32)
    pixels = np.asarray(scaled.image, dtype=np.float32)
    assert np.abs(pixels - reference).mean() < 6
    wrong_way = np.asarray(scaled.image.transpose(Image.Transpose.ROTATE_180), dtype=np.float32)
    assert np.abs(wrong_way - reference).mean() > 3 * np.abs(pixels - reference).mean()


def test_scaled_decode_embeds_as_the_full_decode_does(phone_sources: list[Path],
                                                     embedder: Any) -> None:
    """Per photo, the vector of the scaled decode (1/8: 378 px, >= 1.4x the 256 px resize)
    against the full 12 MP decode's; and the product's need on the whole ImageNet sample's
    photos that are large enough to be scaled."""
    cosines = []
    for n, source in enumerate(phone_sources):
        data = phone_jpeg(source, n, orientation=(1, 6, 8, 3)[n % 4])
        full = decode(data, max_pixels=10**8)
        scaled = decode(data, max_pixels=10**8, need=embedder.decode_need)
        assert scaled.image.size == (504, 378)
        vectors = embedder.embed([embedder.preprocess(full.image),
                                  embedder.preprocess(scaled.image)])
        cosines.append(float(vectors[0] @ vectors[1]))
    # Real detail: the ImageNet sample's photos big enough to decode at a reduced scale
    # (a corkscrew among them fell to 0.96 when decoded to just the resize's size).
    large = [p.read_bytes() for p in sorted(asset("data/imagenet-sample").glob("*.JPEG"))]
    large = [d for d in large if decode(d, max_pixels=10**8, need=embedder.decode_need).scaled]
    assert len(large) >= 5
    for data in large:
        vectors = embedder.embed([
            embedder.preprocess(decode(data, max_pixels=10**8).image),
            embedder.preprocess(decode(data, max_pixels=10**8, need=embedder.decode_need).image)])
        cosines.append(float(vectors[0] @ vectors[1]))
    print(f"\nscaled vs full decode, cosine per photo: min {min(cosines):.4f}, "
          f"median {np.median(cosines):.4f} ({len(phone_sources)} phone, {len(large)} ImageNet)")
    assert min(cosines) >= 0.99, cosines


def test_the_pipeline_decodes_for_the_model(phone_sources: list[Path], embedder: Any) -> None:
    """Ingest decodes a phone photo at 1/8 scale; its payload keeps the original's size.
    (With a detector: tests/test_detection.py.)"""
    from shared.events import ImageUploaded

    assert embedder.decode_need == DecodeNeed(short_side=359)  # 1.4 x the 256 px resize
    pipeline = IngestPipeline(embedder, None, ImageFetcher(), max_pixels=10**8)  # type: ignore[arg-type]
    try:
        assert pipeline.decode_need == DecodeNeed(359)
        data = phone_jpeg(phone_sources[1], 1, orientation=6)
        prepared = pipeline.prepare(ImageUploaded("e", "test", "phone", None, data), None)
    finally:
        pipeline.close()
    assert prepared.size == PHONE and prepared.tensor is not None
    full = embedder.preprocess(decode(data, max_pixels=10**8).image)
    vectors = embedder.embed([prepared.tensor, full])
    assert float(vectors[0] @ vectors[1]) >= 0.99


def test_other_formats_and_small_jpegs_decode_in_full() -> None:
    image = Image.new("RGB", (2000, 1500), (10, 200, 30))
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        decoded = decode(buffer.getvalue(), max_pixels=10**8, need=DecodeNeed(256))
        assert decoded.image.size == decoded.size == (2000, 1500)
    small = io.BytesIO()
    Image.new("RGB", (400, 300)).save(small, "JPEG")
    assert decode(small.getvalue(), max_pixels=10**8, need=DecodeNeed(256)).image.size == (400, 300)


def test_thumbnails_keep_their_draft_size() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(buffer, "JPEG")
    assert decode_image(buffer.getvalue(), max_pixels=10**8, draft_size=(256, 256)).size == (500, 375)
