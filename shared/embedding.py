"""Images to vectors with a timm model: one code path for ingest and query.

The model is built from its timm name; its preprocessing comes from the model's own
pretrained config (``resolve_data_config`` / ``create_transform``), never hard-coded.
The vector is the pooled feature, L2-normalised, so cosine similarity is a dot product.

``Embedder`` is the embedding-model interface (shared/models/base.py) that ingest, the
query path, the CLI and eval use: the shared preprocessing in front of the engine that
EMBED_ENGINE chose (torch, onnxruntime or openvino; shared/models/choice.py), with the
exported engines checked against torch before first use (shared/models/export.py).
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.config import Settings
from shared.errors import ConfigError, ModelError
from shared.images import DecodeNeed
from shared.models.base import Engine, ModelInfo, Pixels, l2_normalize, merge_views, stack
from shared.models.choice import candidates, engine_threads
from shared.models.export import (
    MIN_COSINE,
    ExportCache,
    ExportKey,
    check_vectors,
    export_onnx,
    state_digest,
    verified,
)
from shared.models.torch_engine import TorchEngine, resolve_amp, resolve_device
from shared.preprocess import ModelInput
from shared.weights import describe_misfit, file_sha256, pretrained_source

log = logging.getLogger(__name__)

__all__ = ["Embedder", "ModelInfo", "create_backbone", "merge_views", "resolve_amp",
           "resolve_device"]


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
            # Say which tensors differ and which model the file fits, not torch's raw lines.
            why = describe_misfit(weights, name) or f"{type(exc).__name__}: {str(exc)[:300]}"
            raise ModelError(
                f"MODEL_WEIGHTS={weights} cannot be loaded into {name}: {why}"
            ) from exc
        return model, f"file:{file_sha256(weights)[:16]}"
    if not pretrained:
        log.warning("MODEL_PRETRAINED=false: %s has RANDOM weights; results are meaningless", name)
        return timm.create_model(name, pretrained=False, num_classes=0), "random"
    # Cached weights load from disk with no network; without them, an unreachable hub is
    # one ModelError within seconds (not a minute of retries).
    cached = pretrained_source(name)
    overlay = {"file": str(cached)} if cached is not None else None
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=overlay)
    except Exception as exc:  # hub/network/cache errors come in many types
        raise ModelError(
            f"cannot get pretrained weights for {name!r} from the model hub "
            f"({type(exc).__name__}: {str(exc)[:300]}). Offline? Download the weights on a "
            f"connected machine and set MODEL_WEIGHTS=/path/to/{name}.safetensors, or choose "
            "a model whose weights you have with MODEL_NAME."
        ) from exc
    hub_id = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or name
    return model, f"hub:{hub_id}"


class Embedder:
    """A timm model behind an inference engine, with its preprocessing: the one
    implementation of the embedding-model interface (shared/models/base.py).

    ``engine``: "torch" (the default for direct construction), "onnxruntime",
    "openvino" or "auto" (EMBED_ENGINE's default, through ``from_settings``). ``embed`` is
    safe to call from any thread, and forward passes never overlap (one model already
    uses every core). With torch they all run on one thread of their own: torch's OpenMP
    team belongs to the calling thread, and on a busy 2-core machine forwards from the
    main thread's team ran 3-4x slower than from any other thread. The exported engines
    keep their own thread pools, so they run on the caller's thread under a lock: one
    thread hop less per query (the API's micro-batcher calls it directly).
    """

    def __init__(
        self,
        model_name: str,
        *,
        weights: Path | str | None = None,
        pretrained: bool = True,
        device: str = "auto",
        engine: str = "torch",
        channels_last: bool = True,
        amp: str = "auto",
        compile: bool = False,
        threads: int = 0,
        cache_dir: Path | None = None,
        max_batch: int = 32,
    ) -> None:
        from timm.data import resolve_data_config

        torch_device = resolve_device(device)
        model, weights_desc = create_backbone(
            model_name, Path(weights) if weights is not None else None, pretrained
        )
        model = model.eval()
        self.input = ModelInput(resolve_data_config(model=model))
        self.dim = int(model.num_features)
        self.info = ModelInfo(
            name=model_name,
            dim=self.dim,
            weights=weights_desc,
            preprocessing={
                k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()
            },
        )
        self._cache: ExportCache | None = None
        self._backend = self._open(engine, model, torch_device, channels_last=channels_last,
                                   amp=amp, compile=compile, threads=engine_threads(threads),
                                   cache_dir=cache_dir if weights_desc != "random" else None,
                                   max_batch=max_batch)
        self.device = str(torch_device)
        log.info("model %s on %s", model_name, self._backend.describe())
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        threads = settings.engine_threads or settings.torch_threads
        if threads:
            torch.set_num_threads(threads)
        return cls(
            settings.model_name,
            weights=settings.model_weights,
            pretrained=settings.model_pretrained,
            device=settings.device,
            engine=settings.embed_engine,
            channels_last=settings.channels_last,
            amp=settings.embed_amp,
            compile=settings.torch_compile,
            threads=threads,
            cache_dir=settings.engine_cache_path,
            max_batch=max(settings.batch_size, settings.api_batch_max_size),
        )

    # -- engines -----------------------------------------------------------------------------

    def _open(self, setting: str, model: torch.nn.Module, device: torch.device, *,
              channels_last: bool, amp: str, compile: bool, threads: int,
              cache_dir: Path | None, max_batch: int) -> Engine:
        names = candidates(setting, device.type)
        for n, name in enumerate(names):
            try:
                if name == "torch":
                    return TorchEngine(model, device=device, channels_last=channels_last,
                                       amp_dtype=resolve_amp(amp, device), compile=compile)
                return self._exported(name, model, device, threads=threads,
                                      cache_dir=cache_dir, max_batch=max_batch)
            except (ModelError, ConfigError, ImportError, OSError, RuntimeError) as exc:
                if setting != "auto" or n == len(names) - 1:
                    raise
                log.warning("EMBED_ENGINE=auto: %s cannot run %s (%s); trying %s",
                            name, self.info.name, exc, names[n + 1])
        raise AssertionError("unreachable")

    def _exported(self, name: str, model: torch.nn.Module, device: torch.device, *,
                  threads: int, cache_dir: Path | None, max_batch: int) -> Engine:
        model = model.to("cpu").float()
        probe = stack([self.preprocess(image) for image in _probe_images()])
        with torch.inference_mode():
            reference = model(torch.from_numpy(probe)).float().numpy()
        self._cache = self._cache or ExportCache(cache_dir)
        key = ExportKey("embedder", self.info.name, state_digest(model), self.input.input_size)

        def open_engine(path: Path) -> Engine:
            if name == "onnxruntime":
                from shared.models.onnx_engine import OnnxRuntimeEngine

                return OnnxRuntimeEngine(path, device=str(device), threads=threads,
                                         cache_dir=path.parent / "tensorrt",
                                         input_shape=self.input.input_size, max_batch=max_batch)
            from shared.models.openvino_engine import OpenVinoEngine

            return OpenVinoEngine(path, device=device.type, threads=threads,
                                  cache_root=path.parent)

        def agrees(engine: Engine) -> str | None:
            cosine = check_vectors(reference, engine.run(probe))
            return None if cosine >= MIN_COSINE else (
                f"lowest cosine {cosine:.6f} on the probe batch, below {MIN_COSINE}")

        example = torch.from_numpy(probe[:1])
        return verified(name, self.info.name, self._cache, key,
                        lambda path: export_onnx(model, example, path), open_engine, agrees)

    # -- the interface -----------------------------------------------------------------------

    @property
    def engine(self) -> str:
        """The engine's name: torch, onnxruntime or openvino."""
        return self._backend.name

    def describe(self) -> dict[str, Any]:
        """What runs the model (engine, version, device, threads), for logs and benches."""
        return self._backend.describe()

    @property
    def decode_need(self) -> DecodeNeed:
        """How small an image may be decoded and still only be shrunk by preprocessing."""
        return self.input.decode_need

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return self.input.input_size

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image to the model's input, float32 (C, H, W)."""
        return self.input(image)

    def preprocess_views(self, image: Image.Image, *, full_frame: bool) -> list[np.ndarray]:
        """A query image's inputs: the gallery's view, and the full frame if asked.
        Embed them and combine the vectors with ``merge_views``."""
        return self.input.views(image, full_frame=full_frame)

    def embed(self, batch: Sequence[Pixels] | np.ndarray) -> np.ndarray:
        """Preprocessed images to L2-normalised float32 vectors, shape (N, dim)."""
        if self._backend.thread_bound:
            return self._forward.submit(self._embed, batch).result()
        with self._lock:
            return self._embed(batch)

    def _embed(self, batch: Sequence[Pixels] | np.ndarray) -> np.ndarray:
        array = stack(batch)
        if len(array) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(self._backend.run(array))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed([self.preprocess(image) for image in images])

    def close(self) -> None:
        self._forward.shutdown(wait=True)
        self._backend.close()
        if self._cache is not None:
            self._cache.close()

    # -- the preprocessing's parts, for its own tests (callers use the methods above) -------

    @property
    def data_config(self) -> dict[str, Any]:
        return self.input.data_config

    @property
    def transform(self) -> Any:
        return self.input.default

    @property
    def full_frame_transform(self) -> Any:
        return self.input.full_frame


def _probe_images() -> list[Image.Image]:
    """Two deterministic photo-like images (smooth colour fields, landscape and portrait)
    for checking an exported engine against torch."""
    rng = np.random.default_rng(20261120)
    return [Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC) for size in ((320, 240), (240, 320))]
