"""Boxes and crops: what a detection is, which crops CROP_MODE keeps, cutting them, and
YOLOv5's letterbox and NMS around whichever engine runs the model.

Pure geometry on numpy and torchvision's NMS; no model here (shared/detection/yolo.py
loads one, detector.py runs it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from PIL import Image

from shared.errors import ConfigError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Size = tuple[int, int]  # (width, height), as PIL reports it
CropMode = Literal["largest", "all"]

PAD_VALUE = 114  # YOLOv5's letterbox grey


@dataclass(frozen=True)
class Detection:
    box: Box  # in the original image's pixel coordinates
    confidence: float
    class_name: str

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class Crop:
    """One part of an image to embed: a detected box, or the whole image."""

    box: Box  # in the original image's pixel coordinates
    detection: Detection | None = None  # None: the whole image
    # The cut pixels, once ``Cropper.crops_for`` has cut them.
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def whole(self) -> bool:
        return self.detection is None

    def payload(self) -> dict[str, Any]:
        """What a stored point records about its crop."""
        record: dict[str, Any] = {"cropped": not self.whole, "box": [round(v, 1) for v in self.box]}
        if self.detection is not None:
            record["class"] = self.detection.class_name
            record["confidence"] = round(self.detection.confidence, 4)
        return record


def whole_box(size: Size) -> Box:
    return (0.0, 0.0, float(size[0]), float(size[1]))


def select_crops(detections: Sequence[Detection], mode: CropMode, image_size: Size) -> list[Crop]:
    """The crops CROP_MODE asks for, for one image of ``image_size`` (original pixels).

    ``largest``: the largest box (ties go to the more confident one), or the whole image
    when nothing was detected. ``all``: the whole image first, then every box in the
    detector's order (most confident first).
    """
    whole = Crop(whole_box(image_size))
    if mode == "largest":
        if not detections:
            return [whole]
        best = max(detections, key=lambda d: (d.area, d.confidence))
        return [Crop(best.box, best)]
    if mode == "all":
        return [whole, *(Crop(d.box, d) for d in detections)]
    raise ConfigError(f"CROP_MODE must be largest or all, not {mode!r}")


def crop(image: Image.Image, box: Box, original_size: Size | None = None) -> Image.Image:
    """Cut ``box`` (original pixel coordinates) out of ``image``, the decoded pixels.

    ``original_size`` is the original's (width, height) when the image was decoded at
    another scale (JPEG draft decoding); the box is scaled to the decoded pixels.
    """
    width, height = image.size
    sx, sy = 1.0, 1.0
    if original_size is not None:
        sx, sy = width / original_size[0], height / original_size[1]
    x0, y0, x1, y1 = box
    # Round outwards so the object is never trimmed, and keep at least one pixel.
    left = min(max(int(np.floor(x0 * sx)), 0), width - 1)
    top = min(max(int(np.floor(y0 * sy)), 0), height - 1)
    right = max(min(int(np.ceil(x1 * sx)), width), left + 1)
    bottom = max(min(int(np.ceil(y1 * sy)), height), top + 1)
    if (left, top, right, bottom) == (0, 0, width, height):
        return image
    return image.crop((left, top, right, bottom))


@dataclass(frozen=True)
class Placement:
    """Where one image sits in the letterboxed batch."""

    width: int  # decoded size
    height: int
    scale_x: float  # letterboxed pixels per decoded pixel
    scale_y: float
    left: int
    top: int


def letterbox(images: Sequence[Image.Image], input_size: tuple[int, int]
              ) -> tuple[np.ndarray, list[Placement]]:
    """Scale each image to fit ``input_size`` (height, width), keeping its aspect ratio,
    and centre it on a grey canvas: YOLOv5's letterbox, batched. Returns the batch as
    float32 (N, 3, H, W) in [0, 1], and where each image sits.

    Every image gets the full square canvas. Its boxes then never depend on the rest of
    its batch, so a photo queried alone is cropped exactly as the same photo ingested
    among others. Padding each photo only to its own rectangle (YOLOv5's single-image
    inference) computes less, but splits a batch of mixed photos into one forward pass
    per shape: measured on 64 ImageNet photos on 2 CPU cores (11 shapes in a batch of
    32), 1.5 img/s against 3.3 img/s for the square.
    """
    canvas_h, canvas_w = input_size
    canvas = np.full((len(images), canvas_h, canvas_w, 3), PAD_VALUE, dtype=np.uint8)
    placements = []
    for i, image in enumerate(images):
        width, height = image.size
        r = min(canvas_w / width, canvas_h / height)
        new_w = max(1, min(canvas_w, round(width * r)))
        new_h = max(1, min(canvas_h, round(height * r)))
        resized = image if image.size == (new_w, new_h) else image.resize(
            (new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
        canvas[i, top:top + new_h, left:left + new_w] = np.asarray(resized)
        placements.append(Placement(width, height, new_w / width, new_h / height, left, top))
    batch = canvas.transpose(0, 3, 1, 2).astype(np.float32)
    batch /= np.float32(255.0)
    return batch, placements


def nms(prediction: torch.Tensor, *, conf: float, iou: float,
        class_ids: torch.Tensor | None, max_det: int) -> list[torch.Tensor]:
    """(B, anchors, 5 + classes) raw output to (n, 6) [x0 y0 x1 y1 conf class] per image.

    YOLOv5's own ``non_max_suppression`` is not used: it stops after a wall-clock limit and
    silently returns nothing for the rest of a batch on a slow CPU.
    """
    results = []
    for rows in prediction:
        rows = rows[rows[:, 4] > conf]
        scores, labels = (rows[:, 5:] * rows[:, 4:5]).max(1)  # objectness x class
        keep = scores > conf
        if class_ids is not None:
            keep &= torch.isin(labels, class_ids)
        rows, scores, labels = rows[keep], scores[keep], labels[keep]
        xy, wh = rows[:, :2], rows[:, 2:4] / 2
        boxes = torch.cat((xy - wh, xy + wh), 1)
        chosen = torchvision.ops.batched_nms(boxes, scores, labels, iou)[:max_det]
        results.append(torch.cat(
            (boxes[chosen], scores[chosen, None], labels[chosen, None].float()), 1))
    return results


def to_original(rows: np.ndarray, place: Placement, original: Size,
                names: Sequence[str]) -> list[Detection]:
    """One image's NMS rows (letterboxed pixels) as detections in original pixels."""
    orig_w, orig_h = original
    found = []
    for x0, y0, x1, y1, confidence, label in rows:
        # letterboxed -> decoded pixels -> original pixels
        fx, fy = orig_w / place.width, orig_h / place.height
        box = (
            float(np.clip((x0 - place.left) / place.scale_x, 0, place.width) * fx),
            float(np.clip((y0 - place.top) / place.scale_y, 0, place.height) * fy),
            float(np.clip((x1 - place.left) / place.scale_x, 0, place.width) * fx),
            float(np.clip((y1 - place.top) / place.scale_y, 0, place.height) * fy),
        )
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            found.append(Detection(box, float(confidence), names[int(label)]))
    return found
