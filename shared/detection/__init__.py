"""Optional object detection: find the object in a cluttered photo, so we embed that.

    boxes.py     Detection, Crop, crop selection and cutting, YOLOv5's letterbox and NMS
    yolo.py      loading a checkpoint (.pt, via the yolov5 package) or TorchScript
    detector.py  Detector: letterbox -> engine (torch, onnxruntime, openvino) -> NMS
    cropper.py   Cropper: CROP_MODE's policy, and how large photos are decoded for it

The names below are re-exported for callers that take them from ``shared.detection``.
YOLOv5's code and weights are AGPL-3.0; see docs/detection.md.
"""

from shared.detection.boxes import (
    PAD_VALUE,
    Box,
    Crop,
    CropMode,
    Detection,
    Size,
    crop,
    select_crops,
    whole_box,
)
from shared.detection.cropper import (
    DETECT_DECODE_NEED,
    DETECT_MAX_SIDE,
    Cropper,
    shrink_for_detection,
)
from shared.detection.detector import Detector
from shared.detection.yolo import INSTALL_HINT, resolve_weights

__all__ = [
    "DETECT_DECODE_NEED", "DETECT_MAX_SIDE", "INSTALL_HINT", "PAD_VALUE", "Box", "Crop",
    "CropMode", "Cropper", "Detection", "Detector", "Size", "crop", "resolve_weights",
    "select_crops", "shrink_for_detection", "whole_box",
]
