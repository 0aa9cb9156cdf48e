"""Loading a YOLOv5 detector: a checkpoint (``.pt``) through the ``yolov5`` package, or
a TorchScript export, which needs torch only; and the weights file itself (a path, or a
Hugging Face repo id downloaded once).

The checkpoint pickles YOLOv5's classes, so loading it needs their code. By default only
an allow-list of classes may be unpickled (``weights_only=True``); DETECTOR_TRUST_PICKLE
allows full unpickling of the one configured file. YOLOv5's code and weights are
AGPL-3.0; see docs/detection.md.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from shared.errors import ConfigError, ModelError
from shared.weights import file_sha256

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'imgsearch[detect]'"
# A Hugging Face repo id ("owner/name"), as opposed to a file path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".torchscript")


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


def is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled code; pickled checkpoints do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def file_digest(path: Path) -> str:
    """The short digest a detector's signature records for its weights file."""
    return file_sha256(path)[:16]


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
class Loaded:
    model: torch.nn.Module
    names: tuple[str, ...]
    stride: int
    backend: Literal["yolov5", "torchscript"]
    fixed_size: tuple[int, int] | None = None  # (height, width)


def _names(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, dict):
        return tuple(str(raw[k]) for k in sorted(raw, key=int))
    return tuple(str(n) for n in raw)


def load_checkpoint(path: Path, device: torch.device, trust_pickle: bool) -> Loaded:
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
    return Loaded(model, _names(model.names), int(model.stride.max()), "yolov5")


def load_torchscript(path: Path, device: torch.device) -> Loaded:
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
    return Loaded(model.float().eval(), names, stride, "torchscript", (height, width))


def load(path: Path, device: torch.device, trust_pickle: bool) -> Loaded:
    """The detector in ``path`` (checkpoint or TorchScript), on ``device``."""
    if is_torchscript(path):
        return load_torchscript(path, device)
    return load_checkpoint(path, device, trust_pickle)


class _FirstOutput(torch.nn.Module):
    """The raw prediction (B, anchors, 5 + classes) only: what the engines export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        return output[0] if isinstance(output, (list, tuple)) else output


def exportable(loaded: Loaded) -> torch.nn.Module:
    """A CPU copy of the model for ONNX export, its head in YOLOv5's own export mode
    (no in-place ops, one output), returning the raw prediction."""
    model = copy.deepcopy(loaded.model).to("cpu").float().eval()
    if loaded.backend == "yolov5":
        _, yolo, _ = _import_yolov5()
        for module in model.modules():
            if isinstance(module, yolo.Detect):
                module.inplace, module.export = False, True
    return _FirstOutput(model)
