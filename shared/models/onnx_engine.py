"""The ONNX Runtime engine: an exported ONNX file (shared/models/export.py) in an
``InferenceSession``.

As Immich's ML service does (immich_ml/sessions/ort.py): execution providers in order of
preference, TensorRT then CUDA on a GPU (where the installed onnxruntime has them), else
the CPU provider; one inter-op thread; intra-op threads set by the thread rule
(shared/models/choice.py). Idle intra-op threads do not spin
(``session.intra_op.allow_spinning=0``): with the decode pool on the same cores, spinning
threads take the cores the decoders need (measured in docs/engines.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.models.base import Engine

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def providers_for(device: str, available: list[str], *, cache_dir: Path | None = None,
                  input_name: str = "input", input_shape: tuple[int, ...] = (),
                  max_batch: int = 32) -> list[Any]:
    """The execution providers for ``device`` ("cpu", "cuda", "cuda:N"), best first."""
    if device == "cpu":
        return [CPU]
    if CUDA not in available:
        raise ConfigError(
            f"EMBED_ENGINE=onnxruntime with DEVICE={device} needs the CUDA build of "
            "onnxruntime (pip install onnxruntime-gpu); this one offers "
            f"{', '.join(available)}. Use DEVICE=cpu or EMBED_ENGINE=torch."
        )
    device_id = int(device.partition(":")[2] or 0)
    chosen: list[Any] = []
    if TENSORRT in available:
        options: dict[str, Any] = {"device_id": device_id}
        if cache_dir is not None:
            # TensorRT builds its engine on first use (minutes for large models): keep it.
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                           trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
        if input_shape:  # one optimisation profile from batch 1 to the largest batch
            dims = "x".join(str(d) for d in input_shape)
            options.update(trt_profile_min_shapes=f"{input_name}:1x{dims}",
                           trt_profile_opt_shapes=f"{input_name}:{max_batch}x{dims}",
                           trt_profile_max_shapes=f"{input_name}:{max_batch}x{dims}")
        chosen.append((TENSORRT, options))
    chosen.append((CUDA, {"device_id": device_id}))
    chosen.append(CPU)
    return chosen


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0,
                 cache_dir: Path | None = None, input_shape: tuple[int, ...] = (),
                 max_batch: int = 32) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        providers = providers_for(device, ort.get_available_providers(), cache_dir=cache_dir,
                                  input_shape=input_shape, max_batch=max_batch)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.threads = options.intra_op_num_threads
        self.device = device
        self.version = ort.__version__

    def run(self, batch: np.ndarray) -> np.ndarray:
        output = self.session.run(None, {self.input_name: batch})[0]
        return np.asarray(output, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "version": self.version, "device": self.device,
                "threads": self.threads, "providers": self.session.get_providers()}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
