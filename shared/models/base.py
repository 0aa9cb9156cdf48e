"""The embedding-model interface, and the engine interface behind it.

    EmbeddingModel            what ingest, the query path, the CLI and eval call:
      info, dim, engine       ModelInfo (what a collection must agree with), vector size,
                              the engine's name
      decode_need             how small an image may be decoded (shared/images.py)
      preprocess(image)       the model's input, float32 (C, H, W): shared by all engines
      preprocess_views(...)   the query's views (the gallery's, and the full frame)
      embed(batch)            L2-normalised float32 vectors (N, dim)
      close()

    Engine                    one backend's forward pass: torch, onnxruntime, openvino
      run(batch) -> array     (N, C, H, W) float32 in, the model's raw output out
      describe()              what runs it (engine, version, device, threads), for logs

shared/embedding.py's ``Embedder`` is the one implementation of ``EmbeddingModel``: the
timm model's preprocessing (shared/preprocess.py) in front of whichever engine
EMBED_ENGINE chose. Engines never see images and callers never see engines, so no torch
attribute reaches the ingest pipeline, the API, the CLI or eval. The YOLOv5 detector
(shared/detection/) runs on the same engines.

Vectors from every engine agree with torch's to a cosine of at least 0.9999 (checked on a
probe batch before first use, shared/models/export.py), so a collection built with one
engine answers queries embedded by another: switching engines never means re-indexing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from shared.images import DecodeNeed

# A preprocessed image: a float32 array (C, H, W); torch tensors on the CPU are accepted.
Pixels = Any


@dataclass(frozen=True)
class ModelInfo:
    """What a collection must agree with for its vectors to be comparable. The engine is
    not part of it: every engine gives the same vectors."""

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


class EmbeddingModel(Protocol):
    """Images to vectors. Implementations: shared/embedding.py's Embedder (and eval's
    memoising wrapper of it)."""

    info: ModelInfo
    dim: int

    @property
    def engine(self) -> str: ...

    @property
    def decode_need(self) -> DecodeNeed: ...

    def preprocess(self, image: Image.Image) -> np.ndarray: ...

    def preprocess_views(self, image: Image.Image, *, full_frame: bool) -> list[np.ndarray]: ...

    def embed(self, batch: Sequence[Pixels] | np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class Engine(ABC):
    """One backend's forward pass over a batch. Not thread-safe: callers serialise."""

    name: str = ""
    # True when forward passes must all come from one thread (torch: its OpenMP team
    # belongs to the calling thread); False when any thread may call ``run`` in turn.
    thread_bound: bool = False

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 in; the model's first output, float32, out."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What runs the model: engine, its version, device, threads, providers."""

    def close(self) -> None:
        """Release the engine's sessions and memory."""


def stack(batch: Sequence[Pixels] | np.ndarray) -> np.ndarray:
    """Preprocessed images (arrays or CPU tensors) as one contiguous float32 batch."""
    if isinstance(batch, np.ndarray):
        return np.ascontiguousarray(batch, dtype=np.float32)
    if hasattr(batch, "numpy") and hasattr(batch, "dim"):  # one stacked torch tensor
        return np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
    items = [np.asarray(item.detach().cpu() if hasattr(item, "detach") else item,
                        dtype=np.float32) for item in batch]
    if not items:
        return np.zeros((0,), dtype=np.float32)
    return np.ascontiguousarray(np.stack(items))


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Unit-length rows, float32 (as torch.nn.functional.normalize, eps 1e-12)."""
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def merge_views(vectors: np.ndarray) -> np.ndarray:
    """One query vector from the vectors of one image's views: their normalised sum.

    A sum rather than separate searches keeps a query one vector, so paging, thresholds
    and exclusions work as for any other; it measured within half a point of merging
    two searches by best score (birds, 60% crops: 0.988 vs 0.992 top-1).
    """
    total = np.asarray(vectors, dtype=np.float32).reshape(-1, vectors.shape[-1]).sum(axis=0)
    return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)
