"""Optional object detection: find the object in a cluttered photo, so we embed that.

A YOLOv5 detector runs batched on the embedder's device. Its boxes come back in the
original image's pixel coordinates (x0, y0, x1, y1), whatever size the image was decoded
at; crops are cut from the pixels already decoded, never from a second decode.

Two ways to run the model:

* a YOLOv5 checkpoint (``.pt``) through the ``yolov5`` package (``pip install
  'imgsearch[detect]'``), whose classes the checkpoint pickles;
* a TorchScript file exported by YOLOv5's ``export.py --include torchscript``, which needs
  torch only: the package-free path.

Both go through the letterbox preprocessing and NMS below (torchvision's batched NMS),
so they give the same boxes. YOLOv5's own ``non_max_suppression`` is not used: it stops
after a wall-clock limit and silently returns nothing for the rest of a batch on a slow
CPU.

YOLOv5's code and weights are AGPL-3.0; see docs/detection.md.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import json
import logging
import os
import pickle
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from PIL import Image

from shared.config import Settings
from shared.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Size = tuple[int, int]  # (width, height), as PIL reports it
CropMode = Literal["largest", "all"]

INSTALL_HINT = "pip install 'imgsearch[detect]'"
PAD_VALUE = 114  # YOLOv5's letterbox grey
# Decoded photos wait for the detector in memory (up to a few batches of them), so the
# pipeline keeps them at most this long on their long side: twice the detector's input,
# and an object a fifth of the photo wide is still 256 px, more than a 224 px model input.
# Boxes stay in the original's coordinates.
DETECT_MAX_SIDE = 1280
# A Hugging Face repo id ("owner/name"), as opposed to a file path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".torchscript")


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


def shrink_for_detection(image: Image.Image) -> Image.Image:
    """``image`` at most DETECT_MAX_SIDE on its long side (a new image when it shrinks)."""
    if max(image.size) <= DETECT_MAX_SIDE:
        return image
    scale = DETECT_MAX_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


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


# -- loading -------------------------------------------------------------------------------


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Importing yolov5 (and ultralytics, which it imports) sets OMP_NUM_THREADS and other
    variables, and appends its folder to sys.path. Those would reach our thread pools and
    every child process; an optional detector must not retune the whole product.

    ultralytics also resolves public DNS names on import to decide whether it is online
    (for update checks and analytics we never call); YOLO_OFFLINE skips that, so loading
    the detector sends nothing over the network."""
    environ = dict(os.environ)
    path = list(sys.path)
    # ultralytics also monkey-patches PIL.Image.open (on an unidentified image it tries
    # to pip-install and import pi-heif) and torch.save, process-wide. Put them back:
    # every other decode in the product must keep Pillow's own behaviour.
    image_open, torch_save = Image.open, torch.save
    os.environ["YOLO_OFFLINE"] = "true"
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        sys.path[:] = path
        Image.open, torch.save = image_open, torch_save


def _import_yolov5() -> tuple[Any, Any, Any]:
    """The yolov5 package's model modules, or a ConfigError that says how to get them."""
    try:
        with _process_state_kept(), warnings.catch_warnings():
            # yolov5 imports pkg_resources (hence setuptools<81), which warns on import.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated",
                                    category=UserWarning)
            import yolov5.models.common as common
            import yolov5.models.experimental as experimental
            import yolov5.models.yolo as yolo
    except ImportError as exc:
        raise ConfigError(
            f"DETECTOR=yolov5 with a .pt checkpoint needs the yolov5 package, which is not "
            f"importable ({type(exc).__name__}: {exc}). Install it with: {INSTALL_HINT} "
            "(see docs/detection.md), or set DETECTOR_WEIGHTS to a TorchScript export "
            "(.torchscript), which needs torch only."
        ) from exc
    return common, yolo, experimental


def _allowed_globals(modules: Sequence[Any]) -> list[Any]:
    """What a YOLOv5 checkpoint may contain when loaded with weights_only=True: the
    yolov5 model classes (also under the ``models.*`` names that checkpoints written by the
    ultralytics/yolov5 repository pickle), torch.nn layers, and ``set``."""
    allowed: list[Any] = [(set, "__builtin__.set")]
    for module in modules:
        short = module.__name__.removeprefix("yolov5.")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
                    and obj.__module__ == module.__name__):
                allowed += [obj, (obj, f"{short}.{name}")]
    allowed += [obj for obj in vars(torch.nn).values()
                if inspect.isclass(obj) and issubclass(obj, torch.nn.Module)]
    return allowed


class _YoloUnpickler(pickle.Unpickler):
    """Checkpoints written in the ultralytics/yolov5 repository name its top-level
    ``models``/``utils`` packages; the installed package calls them ``yolov5.models``..."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in ("models", "utils"):
            module = f"yolov5.{module}"
        return super().find_class(module, name)


class _YoloPickle:
    """The pickle module torch.load uses for a trusted checkpoint."""

    Unpickler = _YoloUnpickler
    load = staticmethod(pickle.load)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled code; pickled checkpoints do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_weights(spec: str) -> Path:
    """DETECTOR_WEIGHTS as a local file: a path, or a hub repo id downloaded once."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"DETECTOR_WEIGHTS={spec} is not a file")
        return path
    if _HUB_ID.fullmatch(spec) and path.suffix not in _WEIGHT_SUFFIXES:
        return _download_from_hub(spec)
    raise ConfigError(
        f"DETECTOR_WEIGHTS={spec} does not exist. Give a YOLOv5 checkpoint (.pt, e.g. "
        "yolov5n.pt), a TorchScript export (.torchscript), or a Hugging Face repo id "
        "(owner/name) where the hub is reachable."
    )


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = [f for f in list_repo_files(repo_id) if f.endswith(_WEIGHT_SUFFIXES)]
        if len(files) != 1:
            raise ModelError(
                f"hub repo {repo_id} holds {len(files)} weight files "
                f"({', '.join(files) or 'none'}); "
                "download the one you want and set DETECTOR_WEIGHTS to its path"
            )
        return Path(hf_hub_download(repo_id, files[0]))
    except ModelError:
        raise
    except Exception as exc:  # hub/network/cache errors come in many types
        raise ModelError(
            f"cannot get DETECTOR_WEIGHTS={repo_id} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc)[:300]}). Offline? Download the .pt file on a "
            "connected machine and set DETECTOR_WEIGHTS=/path/to/file.pt"
        ) from exc


@dataclass(frozen=True)
class _Loaded:
    model: torch.nn.Module
    names: tuple[str, ...]
    stride: int
    backend: Literal["yolov5", "torchscript"]
    fixed_size: tuple[int, int] | None = None  # (height, width)


def _names(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, dict):
        return tuple(str(raw[k]) for k in sorted(raw, key=int))
    return tuple(str(n) for n in raw)


def _load_checkpoint(path: Path, device: torch.device, trust_pickle: bool) -> _Loaded:
    common, yolo, experimental = _import_yolov5()
    try:
        if trust_pickle:
            # DETECTOR_TRUST_PICKLE: the operator vouches for this one configured file,
            # so full unpickling (which can run code from the file) is allowed for it alone.
            checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                                    pickle_module=_YoloPickle)
        else:
            with torch.serialization.safe_globals(_allowed_globals([common, yolo, experimental])):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file fails in many ways
        hint = "" if trust_pickle else (
            " If it is a YOLOv5 checkpoint you trust that holds other classes (a custom "
            "model, an unstripped training checkpoint), set DETECTOR_TRUST_PICKLE=true."
        )
        raise ModelError(
            f"cannot load DETECTOR_WEIGHTS={path} as a YOLOv5 checkpoint: "
            f"{type(exc).__name__}: {str(exc)[:400]}.{hint}"
        ) from exc
    model = None
    if isinstance(checkpoint, dict):  # training checkpoints keep the EMA weights in "ema"
        model = checkpoint.get("ema") or checkpoint.get("model")
    head = model.model[-1] if isinstance(model, yolo.DetectionModel) else None
    if type(head) is not yolo.Detect:  # Segment/Classify heads give other outputs
        raise ModelError(
            f"DETECTOR_WEIGHTS={path} is not a YOLOv5 detection checkpoint "
            f"(found {type(model).__name__}); segmentation and classification models "
            "cannot crop"
        )
    from yolov5.utils.general import LOGGER as yolo_log

    level = yolo_log.level
    yolo_log.setLevel(logging.WARNING)  # fuse() prints a model summary otherwise
    try:
        model = model.float().fuse().eval().to(device)
    finally:
        yolo_log.setLevel(level)
    return _Loaded(model, _names(model.names), int(model.stride.max()), "yolov5")


def _load_torchscript(path: Path, device: torch.device) -> _Loaded:
    extra = {"config.txt": ""}
    try:
        with warnings.catch_warnings():
            # torch 2.15 marks TorchScript deprecated; loading still works, and this file
            # format is what YOLOv5's export.py writes.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                    category=FutureWarning)
            model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # a corrupt archive fails in many ways
        raise ModelError(
            f"cannot load DETECTOR_WEIGHTS={path} as TorchScript: {type(exc).__name__}: "
            f"{str(exc)[:400]}"
        ) from exc
    try:
        config = json.loads(extra["config.txt"])
        names = _names(config["names"])
        stride = int(config["stride"])
        height, width = (int(v) for v in config["shape"][2:4])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"DETECTOR_WEIGHTS={path} is TorchScript without YOLOv5's config.txt (names, "
            "stride, input shape); export it with YOLOv5's export.py --include torchscript"
        ) from exc
    return _Loaded(model.float().eval(), names, stride, "torchscript", (height, width))


# -- inference -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Where one image sits in the letterboxed batch."""

    width: int  # decoded size
    height: int
    scale_x: float  # letterboxed pixels per decoded pixel
    scale_y: float
    left: int
    top: int


class Detector:
    """A loaded YOLOv5 model. ``detect`` is safe to call from several threads; forward
    passes are serialised, as the embedder's are."""

    def __init__(
        self,
        weights: Path | str,
        *,
        device: str | torch.device = "cpu",
        conf: float = 0.25,
        iou: float = 0.45,
        classes: Sequence[str] = (),
        img_size: int = 640,
        max_det: int = 100,
        trust_pickle: bool = False,
    ) -> None:
        weights = Path(weights)
        if not weights.is_file():
            raise ConfigError(f"DETECTOR_WEIGHTS={weights} does not exist or is not a file")
        self.device = torch.device(device)
        loaded = (
            _load_torchscript(weights, self.device) if _is_torchscript(weights)
            else _load_checkpoint(weights, self.device, trust_pickle)
        )
        self.model = loaded.model
        self.names = loaded.names
        self.backend = loaded.backend
        self.stride = loaded.stride
        if img_size % self.stride:
            raise ConfigError(f"DETECTOR_IMG_SIZE={img_size} must be a multiple of {self.stride}")
        # TorchScript exports are traced at one size; checkpoints take any stride multiple.
        self.input_size: tuple[int, int] = loaded.fixed_size or (img_size, img_size)
        self.conf = conf
        self.iou = iou
        self.max_det = max_det
        self.classes = tuple(classes)
        self._class_ids = self._class_indices(self.classes)
        self.weights_digest = _file_digest(weights)
        self._lock = threading.Lock()
        log.info("detector %s (%s, %d classes) on %s, input %s, conf %.2f, classes %s",
                 weights.name, self.backend, len(self.names), self.device, self.input_size,
                 conf, ",".join(self.classes) or "all")

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | torch.device) -> Detector | None:
        """The configured detector, or None for DETECTOR=none. ``device``: the embedder's."""
        if settings.detector == "none":
            return None
        if not settings.detector_weights:
            raise ConfigError(f"DETECTOR={settings.detector} needs DETECTOR_WEIGHTS")
        return cls(
            resolve_weights(settings.detector_weights),
            device=device,
            conf=settings.detector_conf,
            iou=settings.detector_iou,
            classes=settings.detector_classes,
            img_size=settings.detector_img_size,
            max_det=settings.detector_max_det,
            trust_pickle=settings.detector_trust_pickle,
        )

    @property
    def info(self) -> dict[str, Any]:
        """What produced the boxes, for logs and collection metadata."""
        return {
            "detector": "yolov5",
            "backend": self.backend,
            "weights": f"file:{self.weights_digest}",
            "conf": self.conf,
            "iou": self.iou,
            "classes": list(self.classes),
            "input_size": list(self.input_size),
        }

    def _class_indices(self, classes: Sequence[str]) -> torch.Tensor | None:
        if not classes:
            return None
        unknown = [c for c in classes if c not in self.names]
        if unknown:
            hints = {c: difflib.get_close_matches(c, self.names, n=3) for c in unknown}
            detail = "; ".join(f"{c!r} (did you mean {', '.join(h)}?)" if h else repr(c)
                               for c, h in hints.items())
            raise ConfigError(
                f"DETECTOR_CLASSES names classes this model does not have: {detail}. "
                f"It knows: {', '.join(self.names)}"
            )
        return torch.tensor([self.names.index(c) for c in classes], device=self.device)

    def _letterbox(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[_Placement]]:
        """Scale each image to fit the input size (keeping its aspect ratio) and centre it
        on a grey canvas: YOLOv5's letterbox, batched.

        Every image gets the full square canvas. Its boxes then never depend on the rest
        of its batch, so a photo queried alone is cropped exactly as the same photo
        ingested among others. Padding each photo only to its own rectangle (YOLOv5's
        single-image inference) computes less, but splits a batch of mixed photos into
        one forward pass per shape: measured on 64 ImageNet photos on 2 CPU cores
        (11 shapes in a batch of 32), 1.5 img/s against 3.3 img/s for the square.
        """
        canvas_h, canvas_w = self.input_size
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
            placements.append(_Placement(width, height, new_w / width, new_h / height, left, top))
        batch = torch.from_numpy(canvas).to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous(), placements

    def _nms(self, prediction: torch.Tensor) -> list[torch.Tensor]:
        """(B, anchors, 5 + classes) raw output to (n, 6) [x0 y0 x1 y1 conf class] per image."""
        results = []
        for rows in prediction:
            rows = rows[rows[:, 4] > self.conf]
            scores, labels = (rows[:, 5:] * rows[:, 4:5]).max(1)  # objectness x class
            keep = scores > self.conf
            if self._class_ids is not None:
                keep &= torch.isin(labels, self._class_ids)
            rows, scores, labels = rows[keep], scores[keep], labels[keep]
            xy, wh = rows[:, :2], rows[:, 2:4] / 2
            boxes = torch.cat((xy - wh, xy + wh), 1)
            chosen = torchvision.ops.batched_nms(boxes, scores, labels, self.iou)[: self.max_det]
            results.append(torch.cat(
                (boxes[chosen], scores[chosen, None], labels[chosen, None].float()), 1))
        return results

    def detect(
        self, images: Sequence[Image.Image], original_sizes: Sequence[Size] | None = None
    ) -> list[list[Detection]]:
        """Objects in each RGB image, most confident first, in one forward pass.

        ``original_sizes`` gives each original's (width, height) when the images were
        decoded at another scale; boxes are reported in those coordinates.
        """
        if not images:
            return []
        if original_sizes is None:
            original_sizes = [image.size for image in images]
        if len(original_sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(original_sizes)} original sizes")
        batch, placements = self._letterbox(images)
        with torch.inference_mode():
            with self._lock:
                output = self.model(batch)
            prediction = output[0] if isinstance(output, (list, tuple)) else output
            per_image = [t.cpu().numpy() for t in self._nms(prediction.float())]
        detections = []
        for rows, place, (orig_w, orig_h) in zip(per_image, placements, original_sizes,
                                                strict=True):
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
                    found.append(Detection(box, float(confidence), self.names[int(label)]))
            detections.append(found)
        return detections


class Cropper:
    """What to embed for each decoded image: the whole image when no detector is
    configured, otherwise the crops CROP_MODE selects, cut from the decoded pixels."""

    def __init__(self, detector: Detector | None, mode: CropMode = "largest") -> None:
        if mode not in ("largest", "all"):
            raise ConfigError(f"CROP_MODE must be largest or all, not {mode!r}")
        self.detector = detector
        self.mode: CropMode = mode

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | torch.device) -> Cropper:
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
