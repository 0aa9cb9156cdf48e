"""Exported models, cached on disk and checked against torch before first use.

A timm model (or the YOLOv5 detector) is exported once to ONNX (``torch.onnx.export``,
opset 18, dynamic batch) and kept under ENGINE_CACHE_DIR (default
``$XDG_CACHE_HOME/imgsearch/engines``, else ``~/.cache/imgsearch/engines``)::

    <kind>-<model>-<key>/
        model.onnx          what ONNX Runtime loads and OpenVINO compiles
        manifest.json       the key's fields and the file's sha256
        openvino-<version>/ OpenVINO's compiled blob (one folder per OpenVINO release)
        tensorrt/           TensorRT's engine cache (CUDA)

The key is a digest of everything the file depends on: the model's name, a digest of its
weights (of the tensors actually loaded, so hub weights are covered too), the input size,
and the exporter (torch's version, the opset). The engines' own versions key their own
caches inside an entry (OpenVINO's folder; TensorRT keys its engines itself).

**Never corrupt, never trusted blindly.** An entry is built in a temporary folder beside
the cache and renamed into place in one step, under a lock file, so concurrent workers
either build it once or find it finished; a crash leaves only a temporary folder that
nobody reads. Every load checks the file against the manifest's sha256 (a damaged file is
rebuilt), and before first use in every process the engine's output is compared with
torch's on a probe batch (``check_vectors``: cosine at least 0.9999 per image; the
detector compares raw boxes and scores, shared/detection/detector.py). A cached entry that
fails is rebuilt once; a fresh export that fails is refused with a ModelError naming the
engine and the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import ModelError
from shared.weights import file_sha256

log = logging.getLogger(__name__)

EXPORT_OPSET = 18
MIN_COSINE = 0.9999
FORMAT = 1  # bump when the layout or the export changes meaning
MODEL_FILE = "model.onnx"
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgsearch" / "engines"


def state_digest(module: torch.nn.Module) -> str:
    """A digest of the module's parameters and buffers: names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ExportKey:
    kind: str  # "embedder" or "detector"
    model: str  # the timm name, or the detector's weights file name
    weights: str  # state_digest of the loaded module
    input_size: tuple[int, ...]  # (C, H, W)

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "weights": self.weights,
                "input_size": list(self.input_size), "opset": EXPORT_OPSET,
                "exporter": f"torch {torch.__version__}", "format": FORMAT}

    @property
    def digest(self) -> str:
        text = json.dumps(self.fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)[:64]
        return f"{self.kind}-{slug}-{self.digest}"


class ExportCache:
    """Verified exports on disk. ``root`` None: a private temporary folder, removed by
    ``close`` (models with random weights, which no later process can reuse)."""

    def __init__(self, root: Path | None) -> None:
        self._temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="imgsearch-engines-")) if root is None \
            else Path(root).expanduser()

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def entry(self, key: ExportKey) -> Path:
        return self.root / key.dirname

    def find(self, key: ExportKey) -> Path | None:
        """The entry's model file if it is complete and intact; None otherwise."""
        folder = self.entry(key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        model = folder / MODEL_FILE
        if manifest.get("key") != key.fields():
            log.warning("engine cache entry %s was written for another key; rebuilding", folder)
            return None
        try:
            if file_sha256(model) != manifest.get("sha256"):
                log.warning("engine cache file %s is damaged (sha256 differs from its "
                            "manifest); rebuilding it", model)
                return None
        except OSError:
            return None
        return model

    def get(self, key: ExportKey, export: Callable[[Path], None]) -> tuple[Path, bool]:
        """The model file for ``key``, exported now by ``export(path)`` if the cache has no
        intact one. Returns (path, True if it was exported by this call)."""
        found = self.find(key)
        if found is not None:
            return found, False
        with self._locked(key):
            found = self.find(key)  # another process may have finished it meanwhile
            if found is not None:
                return found, False
            return self._build(key, export), True

    def discard(self, key: ExportKey) -> None:
        """Remove an entry (it failed its check against torch), safely for readers: it is
        renamed out of the way first."""
        with self._locked(key):
            self._remove(self.entry(key))

    @contextlib.contextmanager
    def _locked(self, key: ExportKey) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / f".{key.dirname}.lock").open("a+")
        except OSError as exc:
            raise ModelError(
                f"cannot write the engine cache in {self.root} ({exc}); set ENGINE_CACHE_DIR "
                "to a writable folder, or prebuild it with `imgsearch engines build`"
            ) from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove(self, folder: Path) -> None:
        if folder.exists():
            trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _build(self, key: ExportKey, export: Callable[[Path], None]) -> Path:
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key.dirname}-", dir=self.root))
        try:
            model = staging / MODEL_FILE
            export(model)
            manifest = {"key": key.fields(), "sha256": file_sha256(model),
                        "bytes": model.stat().st_size,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            for path in (model, staging / MANIFEST):
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            final = self.entry(key)
            self._remove(final)  # a damaged or stale entry (we hold the lock)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("exported %s %s to %s in %.1fs", key.kind, key.model, final,
                 time.perf_counter() - started)
        return final / MODEL_FILE


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``module`` (CPU, eval, float32) to ONNX at ``path``: one input, its first output,
    batch size dynamic."""
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # The TorchScript-based exporter: no onnxscript needed, and it is what the
            # figures in docs/engines.md were measured with. Its deprecation notice and
            # tracer warnings say nothing about this export's correctness, which the
            # probe check decides.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=EXPORT_OPSET,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter fails in many ways on unusual models
        raise ModelError(
            f"cannot export the model to ONNX ({type(exc).__name__}: {str(exc)[:300]}); "
            "use EMBED_ENGINE=torch (or DETECTOR_ENGINE=torch) for this model"
        ) from exc


def check_vectors(reference: np.ndarray, output: np.ndarray) -> float:
    """The lowest cosine between matching rows of two feature batches."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(output, dtype=np.float64).reshape(len(output), -1)
    if a.shape != b.shape:
        return -1.0
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                      1e-12)
    return float(cos.min())


def verified(name: str, what: str, cache: ExportCache, key: ExportKey,
             export: Callable[[Path], None], open_engine: Callable[[Path], Any],
             agrees: Callable[[Any], str | None]) -> Any:
    """An engine over the cached export of ``what``, checked by ``agrees(engine)`` (None
    when it matches torch, else what differs). A cached export that fails is rebuilt
    once; a fresh one that fails is refused."""
    for attempt in (1, 2):
        path, fresh = cache.get(key, export)
        engine = open_engine(path)
        problem = agrees(engine)
        if problem is None:
            return engine
        engine.close()
        if fresh or attempt == 2:
            raise ModelError(
                f"the {name} engine's export of {what} does not match torch ({problem}); "
                f"refusing to use it. Use EMBED_ENGINE=torch (DETECTOR_ENGINE=torch for the "
                f"detector), or report this with the model's name and the engine's version"
            )
        log.warning("cached %s export of %s does not match torch (%s); rebuilding it",
                    name, what, problem)
        cache.discard(key)
    raise AssertionError("unreachable")
