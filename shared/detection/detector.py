"""The YOLOv5 detector on any engine: the project's letterbox in front, its NMS behind.

The model (a checkpoint or TorchScript, shared/detection/yolo.py) runs on torch, or is
exported to ONNX once (raw prediction, dynamic batch, fixed input size) and run by ONNX
Runtime or OpenVINO (shared/models/). The letterbox and NMS around it are the same code
for every engine, and an export is checked against torch on a probe batch before first
use, so every engine gives torch's boxes (within a pixel: tests/test_engines.py).
Boxes come back in the original image's pixel coordinates (x0, y0, x1, y1), whatever
size the image was decoded at.
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import Settings
from shared.detection.boxes import Detection, Size, letterbox, nms, to_original
from shared.detection.yolo import exportable, file_digest, load, resolve_weights
from shared.errors import ConfigError, ModelError
from shared.models.base import Engine
from shared.models.choice import candidates, engine_threads
from shared.models.torch_engine import TorchEngine

log = logging.getLogger(__name__)

# An export agrees with torch when every box coordinate of the raw prediction is within
# this many letterboxed pixels, and every score within SCORE_TOLERANCE.
BOX_TOLERANCE_PX = 0.5
SCORE_TOLERANCE = 2e-3


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
        engine: str = "torch",
        threads: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        weights = Path(weights)
        if not weights.is_file():
            raise ConfigError(f"DETECTOR_WEIGHTS={weights} does not exist or is not a file")
        self.device = torch.device(device)
        names = candidates(engine, self.device.type, variable="DETECTOR_ENGINE")
        # Exported engines start from a CPU copy; torch runs where it was asked to.
        loaded = load(weights, self.device if names[0] == "torch" else torch.device("cpu"),
                      trust_pickle)
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
        self.weights_digest = file_digest(weights)
        self._lock = threading.Lock()
        self._cache: Any = None
        self._engine = self._open(engine, names, loaded, weights.name,
                                  threads=engine_threads(threads), cache_dir=cache_dir)
        # The torch model, for the torch engine only (tests and docs export from it).
        self.model = loaded.model if self._engine.name == "torch" else None
        log.info("detector %s (%s, %d classes) on %s, input %s, conf %.2f, classes %s",
                 weights.name, self.backend, len(self.names), self._engine.describe(),
                 self.input_size, conf, ",".join(self.classes) or "all")

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
            engine=settings.detector_engine,
            threads=settings.engine_threads or settings.torch_threads,
            cache_dir=settings.engine_cache_path,
        )

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def info(self) -> dict[str, Any]:
        """What produced the boxes, for logs and collection metadata. The engine is not in
        it: every engine gives the same boxes, so switching does not mean re-indexing."""
        return {
            "detector": "yolov5",
            "backend": self.backend,
            "weights": f"file:{self.weights_digest}",
            "conf": self.conf,
            "iou": self.iou,
            "classes": list(self.classes),
            "input_size": list(self.input_size),
        }

    def describe(self) -> dict[str, Any]:
        return self._engine.describe()

    def close(self) -> None:
        self._engine.close()
        if self._cache is not None:
            self._cache.close()

    # -- engines -----------------------------------------------------------------------------

    def _open(self, setting: str, names: list[str], loaded: Any, label: str, *,
              threads: int, cache_dir: Path | None) -> Engine:
        for n, name in enumerate(names):
            try:
                if name == "torch":
                    if loaded.model is None:
                        raise AssertionError("the torch model was released")
                    return TorchEngine(loaded.model, device=self.device, channels_last=False)
                return self._exported(name, loaded, label, threads=threads, cache_dir=cache_dir)
            except (ModelError, ConfigError, ImportError, OSError, RuntimeError) as exc:
                if setting != "auto" or n == len(names) - 1:
                    raise
                log.warning("DETECTOR_ENGINE=auto: %s cannot run %s (%s); trying %s",
                            name, label, exc, names[n + 1])
                if names[n + 1] == "torch":
                    loaded.model.to(self.device)
        raise AssertionError("unreachable")

    def _exported(self, name: str, loaded: Any, label: str, *, threads: int,
                  cache_dir: Path | None) -> Engine:
        from shared.models.export import ExportCache, ExportKey, export_onnx, state_digest, verified

        module = exportable(loaded)
        probe, _ = letterbox(_probe_images(), self.input_size)
        with torch.inference_mode():
            reference = module(torch.from_numpy(probe)).float().numpy()
        self._cache = self._cache or ExportCache(cache_dir)
        key = ExportKey("detector", label, state_digest(module), (3, *self.input_size))

        def open_engine(path: Path) -> Engine:
            if name == "onnxruntime":
                from shared.models.onnx_engine import OnnxRuntimeEngine

                return OnnxRuntimeEngine(path, device=str(self.device), threads=threads,
                                         cache_dir=path.parent / "tensorrt",
                                         input_shape=(3, *self.input_size))
            from shared.models.openvino_engine import OpenVinoEngine

            return OpenVinoEngine(path, device=self.device.type, threads=threads,
                                  cache_root=path.parent)

        def agrees(engine: Engine) -> str | None:
            output = engine.run(probe)
            if output.shape != reference.shape:
                return f"output shape {output.shape}, torch's {reference.shape}"
            boxes = float(np.abs(output[..., :4] - reference[..., :4]).max())
            scores = float(np.abs(output[..., 4:] - reference[..., 4:]).max())
            if boxes <= BOX_TOLERANCE_PX and scores <= SCORE_TOLERANCE:
                return None
            return (f"boxes differ by up to {boxes:.3f} px (allowed {BOX_TOLERANCE_PX}), "
                    f"scores by {scores:.4f} (allowed {SCORE_TOLERANCE})")

        example = torch.from_numpy(probe[:1])
        return verified(name, f"the detector {label}", self._cache, key,
                        lambda path: export_onnx(module, example, path), open_engine, agrees)

    # -- inference -----------------------------------------------------------------------------

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
        return torch.tensor([self.names.index(c) for c in classes])

    def _predict(self, batch: np.ndarray) -> torch.Tensor:
        """The raw prediction: on the model's device for torch (NMS runs there too),
        on the CPU for the exported engines."""
        if isinstance(self._engine, TorchEngine):
            with torch.inference_mode():
                tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
                output = self._engine.model(tensor)
            return (output[0] if isinstance(output, (list, tuple)) else output).float()
        return torch.from_numpy(self._engine.run(batch))

    def detect(
        self, images: Sequence[Any], original_sizes: Sequence[Size] | None = None
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
        batch, placements = letterbox(images, self.input_size)
        with self._lock:
            prediction = self._predict(batch)
        with torch.inference_mode():
            class_ids = None if self._class_ids is None else self._class_ids.to(prediction.device)
            per_image = [t.cpu().numpy() for t in nms(prediction, conf=self.conf, iou=self.iou,
                                                      class_ids=class_ids, max_det=self.max_det)]
        return [to_original(rows, place, size, self.names)
                for rows, place, size in zip(per_image, placements, original_sizes, strict=True)]


def _probe_images() -> list[Any]:
    """Two deterministic photo-like images for checking an export against torch."""
    from PIL import Image

    rng = np.random.default_rng(20261120)
    return [Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC) for size in ((640, 480), (360, 640))]
