"""Images to vectors with a timm model: one code path for ingest and query.

The model is built from its timm name; its preprocessing comes from the model's own
pretrained config (``resolve_data_config`` / ``create_transform``), never hard-coded.
The vector is the pooled feature, L2-normalised, so cosine similarity is a dot product.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.config import Settings
from shared.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What a collection must agree with for its vectors to be comparable."""

    name: str
    dim: int
    weights: str  # "hub:<hf id>", "file:<sha256 prefix>" or "random"
    preprocessing: dict[str, Any]

    def as_metadata(self) -> dict[str, Any]:
        return {
            "model_name": self.name,
            "dim": self.dim,
            "weights": self.weights,
            "preprocessing": self.preprocessing,
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={device} but no CUDA device is available; use DEVICE=cpu")
    return torch.device(device)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def create_backbone(name: str, weights: Path | None, pretrained: bool) -> tuple[torch.nn.Module, str]:
    """Build a timm model without its classifier. Returns (model, weights description)."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"MODEL_NAME={name!r} is not a timm model.{hint} "
            "List them with: python -c \"import timm; print(timm.list_models())\""
        )
    if weights is not None:
        if not weights.is_file():
            raise ConfigError(f"MODEL_WEIGHTS={weights} does not exist or is not a file")
        try:
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(weights)}
            )
        except Exception as exc:  # any loader failure means the same: this file won't do
            raise ModelError(
                f"cannot load MODEL_WEIGHTS={weights} into {name}: {type(exc).__name__}: {exc}. "
                f"The file must be a state dict (.safetensors, .pth, .bin) for timm's {name}."
            ) from exc
        return model, f"file:{_file_digest(weights)}"
    if not pretrained:
        log.warning("MODEL_PRETRAINED=false: %s has RANDOM weights; results are meaningless", name)
        return timm.create_model(name, pretrained=False, num_classes=0), "random"
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # hub/network/cache errors come in many types
        raise ModelError(
            f"cannot get pretrained weights for {name!r} from the model hub "
            f"({type(exc).__name__}: {str(exc)[:300]}). Offline? Download the weights on a "
            f"connected machine and set MODEL_WEIGHTS=/path/to/{name}.safetensors, or choose "
            "a model whose weights you have with MODEL_NAME."
        ) from exc
    hub_id = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or name
    return model, f"hub:{hub_id}"


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for plain fp32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class Embedder:
    """A loaded model plus its preprocessing. ``embed`` is safe to call from any thread."""

    def __init__(
        self,
        model_name: str,
        *,
        weights: Path | str | None = None,
        pretrained: bool = True,
        device: str = "auto",
        channels_last: bool = True,
        amp: str = "auto",
        compile: bool = False,
    ) -> None:
        from timm.data import create_transform, resolve_data_config

        self.device = resolve_device(device)
        model, weights_desc = create_backbone(
            model_name, Path(weights) if weights is not None else None, pretrained
        )
        self.channels_last = channels_last
        self.amp_dtype = resolve_amp(amp, self.device)
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model
        self.data_config = resolve_data_config(model=model)
        self.transform = create_transform(**self.data_config, is_training=False)
        # A second view for queries (QUERY_FULL_FRAME_VIEW): the same resize without the
        # centre crop's margin. The gallery is embedded through ``transform``, which keeps
        # the centre crop_pct (87.5% for most models) of each photo; a cropped copy of a
        # photo shows less than that, magnified, and the full-frame view of it is closer
        # in scale to what the gallery saw.
        self.full_frame_transform = create_transform(
            **{**self.data_config, "crop_pct": 1.0}, is_training=False)
        self.dim = int(model.num_features)
        self.info = ModelInfo(
            name=model_name,
            dim=self.dim,
            weights=weights_desc,
            preprocessing={
                k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()
            },
        )
        # Every forward pass runs on this one thread, whoever asks. It serialises them (one
        # model already uses every core), and it sidesteps a measured slowdown: on a busy
        # 2-core machine, forwards from the main thread's OpenMP team ran 3-4x slower
        # (9 vs 35 img/s, mobilenetv2_100, batch 32) than from any other thread.
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="forward")

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        return cls(
            settings.model_name,
            weights=settings.model_weights,
            pretrained=settings.model_pretrained,
            device=settings.device,
            channels_last=settings.channels_last,
            amp=settings.embed_amp,
            compile=settings.torch_compile,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image to the model's input tensor (C, H, W) on the CPU."""
        return self.transform(image)

    def preprocess_views(self, image: Image.Image, *, full_frame: bool) -> list[torch.Tensor]:
        """A query image's input tensors: the gallery's view, and the full frame if asked.
        Embed them and combine the vectors with ``merge_views``."""
        views = [self.transform(image)]
        if full_frame:
            views.append(self.full_frame_transform(image))
        return views

    def embed(self, tensors: Sequence[torch.Tensor] | torch.Tensor) -> np.ndarray:
        """Preprocessed tensors to L2-normalised float32 vectors, shape (N, dim)."""
        return self._forward.submit(self._embed, tensors).result()

    @torch.inference_mode()
    def _embed(self, tensors: Sequence[torch.Tensor] | torch.Tensor) -> np.ndarray:
        batch = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.device.type == "cuda":
            # Page-locked memory lets the copy run asynchronously with the host.
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                features = self.model(batch)
        else:
            features = self.model(batch)
        features = torch.nn.functional.normalize(features.float(), dim=1)
        return features.cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed([self.preprocess(image) for image in images])


def merge_views(vectors: np.ndarray) -> np.ndarray:
    """One query vector from the vectors of one image's views: their normalised sum.

    A sum rather than separate searches keeps a query one vector, so paging, thresholds
    and exclusions work as for any other; it measured within half a point of merging
    two searches by best score (birds, 60% crops: 0.988 vs 0.992 top-1).
    """
    total = np.asarray(vectors, dtype=np.float32).reshape(-1, vectors.shape[-1]).sum(axis=0)
    return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)
