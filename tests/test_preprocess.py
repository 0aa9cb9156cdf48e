"""The model's preprocessing costs what the model's input costs, whatever the image's shape,
and gives timm's own result (ordinary photos: exactly; strips: to uint8 rounding)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from shared.images import decode_image
from shared.preprocess import MAX_CHEAP_ASPECT, Preprocess


@pytest.fixture(scope="module")
def photo(data_dir: Path) -> Image.Image:
    path = sorted((data_dir / "imagenet-sample").rglob("*.JPEG"))[3]
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("crop_pct", [None, 1.0])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (4032, 3024), (300, 899)])
def test_ordinary_photos_get_timms_transform_exactly(embedder: Any, photo: Image.Image,
                                                     size: tuple[int, int],
                                                     crop_pct: float | None) -> None:
    overrides = {} if crop_pct is None else {"crop_pct": crop_pct}
    pre = Preprocess(embedder.data_config, **overrides)
    image = photo.resize(size)
    assert max(size) <= MAX_CHEAP_ASPECT * min(size)
    assert torch.equal(pre(image), pre.transform(image))


@pytest.mark.parametrize("size", [(100, 2000), (2000, 100), (333, 1000 + 1), (640, 1923 * 2),
                                  (37, 999), (3, 70), (1, 500)])
def test_strips_match_timm_within_rounding(embedder: Any, photo: Image.Image,
                                           size: tuple[int, int]) -> None:
    image = photo.resize(size)
    for view in (embedder.transform, embedder.full_frame_transform):
        fast, reference = view(image), view.transform(image)
        assert fast.shape == reference.shape
        # uint8 rounding of the resample: at most 2 levels of 255 after normalisation.
        assert float((fast - reference).abs().max()) < 2.5 / 255 / 0.224
        vectors = embedder.embed([fast, reference])
        assert float(np.dot(vectors[0], vectors[1])) > 0.999


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (8000, 1), (2, 6_000_000)])
def test_a_thin_image_costs_what_a_photo_does(embedder: Any, size: tuple[int, int]) -> None:
    """The probe's case: a few hundred bytes of PNG used to become a 256 x 5 M resize."""
    data = _png(size)
    assert len(data) < 100_000
    started = time.perf_counter()
    tensor = embedder.preprocess(decode_image(data, max_pixels=40_000_000))
    elapsed = time.perf_counter() - started
    assert tensor.shape == (3, 224, 224)
    assert elapsed < 1.0, f"{size}: {elapsed:.2f}s"
