"""Crop policy: what to embed of each decoded image, with or without a detector."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from PIL import Image

from shared.config import Settings
from shared.detection.boxes import Crop, CropMode, Size, crop, select_crops, whole_box
from shared.detection.detector import Detector
from shared.errors import ConfigError
from shared.images import DecodeNeed

# Decoded photos wait for the detector in memory (up to a few batches of them), so the
# pipeline keeps them at most this long on their long side: twice the detector's input,
# and an object a fifth of the photo wide is still 256 px, more than a 224 px model input.
# Boxes stay in the original's coordinates.
DETECT_MAX_SIDE = 1280
# What a decode must keep for the detector and its crops: JPEGs larger than this decode
# at a reduced DCT scale (shared/images.py), then shrink to it.
DETECT_DECODE_NEED = DecodeNeed(long_side=DETECT_MAX_SIDE)


def shrink_for_detection(image: Image.Image) -> Image.Image:
    """``image`` at most DETECT_MAX_SIDE on its long side (a new image when it shrinks)."""
    if max(image.size) <= DETECT_MAX_SIDE:
        return image
    scale = DETECT_MAX_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


class Cropper:
    """What to embed for each decoded image: the whole image when no detector is
    configured, otherwise the crops CROP_MODE selects, cut from the decoded pixels."""

    def __init__(self, detector: Detector | None, mode: CropMode = "largest") -> None:
        if mode not in ("largest", "all"):
            raise ConfigError(f"CROP_MODE must be largest or all, not {mode!r}")
        self.detector = detector
        self.mode: CropMode = mode

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str) -> Cropper:
        return cls(Detector.from_settings(settings, device=device), settings.crop_mode)

    @property
    def detects(self) -> bool:
        return self.detector is not None

    @property
    def signature(self) -> str | None:
        """What decides the crops (detector, its settings, the mode); None without one.

        Stored with every point, so re-ingesting an image after any of it changed embeds
        it again instead of skipping it as unchanged.
        """
        if self.detector is None:
            return None
        return json.dumps({**self.detector.info, "crop_mode": self.mode}, sort_keys=True)

    def crops_for(
        self, images: Sequence[Image.Image], original_sizes: Sequence[Size] | None = None,
        modes: Sequence[CropMode] | None = None,
    ) -> list[list[Crop]]:
        """Per image, the crops to embed (``Crop.image`` set), detected in one batch.

        ``modes`` gives each image its own crop mode (queries batched together may ask
        for different ones); by default every image gets this cropper's mode.
        """
        sizes = list(original_sizes) if original_sizes is not None else [i.size for i in images]
        if self.detector is None:
            return [[Crop(whole_box(size), image=image)]
                    for image, size in zip(images, sizes, strict=True)]
        detections = self.detector.detect(images, sizes)
        per_image = list(modes) if modes is not None else [self.mode] * len(images)
        return [
            [replace(c, image=crop(image, c.box, size))
             for c in select_crops(found, mode, size)]
            for image, size, found, mode in zip(images, sizes, detections, per_image,
                                                strict=True)
        ]
