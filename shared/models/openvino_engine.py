"""The OpenVINO engine: the exported ONNX file compiled by OpenVINO's CPU plugin.

OpenVINO reads the ONNX file itself; its compiled blob is cached beside it (``CACHE_DIR``,
one folder per OpenVINO version), so later starts skip compilation. Precision is pinned
to f32: on CPUs with AMX or AVX-512 BF16, OpenVINO would otherwise infer in bf16 and the
vectors would no longer match the other engines'. One stream, the latency hint and the
thread rule's thread count (shared/models/choice.py); threads are not pinned to cores,
since the decode pool shares them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.models.base import Engine


class OpenVinoEngine(Engine):
    name = "openvino"

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0,
                 cache_root: Path | None = None) -> None:
        import openvino as ov

        if device != "cpu":
            raise ConfigError(
                f"EMBED_ENGINE=openvino runs on the CPU here, not DEVICE={device}; use "
                "EMBED_ENGINE=torch or onnxruntime on a CUDA device"
            )
        core = ov.Core()
        self.version = ov.get_version()
        if cache_root is not None:
            release = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.version.split("-")[0])
            cache_dir = cache_root / f"openvino-{release}"
            cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.threads = threads or (os.cpu_count() or 1)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(self.threads),
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": "NO",
        }
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        # The output tensor's memory is reused by the next inference: copy it out.
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "version": self.version, "device": "cpu",
                "threads": self.threads}

    def close(self) -> None:
        self.request = self.compiled = None  # type: ignore[assignment]
