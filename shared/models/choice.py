"""Which engine runs a model (EMBED_ENGINE, DETECTOR_ENGINE) and on how many threads
(ENGINE_THREADS).

``auto`` takes the first installed engine in ``AUTO_ORDER`` for the device. The order is
what the benchmarks measured inside the ingest pipeline, decode pool running (tables in
docs/engines.md): on CPU ONNX Runtime, then OpenVINO (as fast in the pipeline under load,
slower on a quiet machine, and 180 MB to install against 110), then PyTorch; on CUDA
PyTorch with AMP, the only engine measured on a GPU so far. If the first choice cannot
export or fails its check against torch, ``auto`` logs why and takes the next one; an
engine named explicitly fails instead.

**Threads.** The decode pool (DECODE_WORKERS, one per core) and the engine share the
cores. The rule (``engine_threads``): the engine gets one thread per core, and its idle
threads sleep instead of spinning (ONNX Runtime's ``allow_spinning=0``, OpenVINO
without pinning), so whichever stage has work takes the cores; measured against giving
the engine fewer threads than cores in docs/engines.md.
"""

from __future__ import annotations

import importlib.util
import os

from shared.errors import ConfigError

ENGINES = ("torch", "onnxruntime", "openvino")
AUTO_ORDER = {
    "cpu": ("onnxruntime", "openvino", "torch"),
    "cuda": ("torch",),
}
# What each engine imports: an engine is installed when its module is.
_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}
INSTALL_HINT = ("pip install -e '.[local]' (onnxruntime) or '.[openvino]', as "
                "docs/engines.md says")


def installed(engine: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[engine]) is not None
    except (ImportError, ValueError):
        return False


def installed_engines() -> list[str]:
    return [e for e in ENGINES if installed(e)]


def candidates(setting: str, device_type: str, *, variable: str = "EMBED_ENGINE") -> list[str]:
    """The engines to try, in order, for ``setting`` on a device of ``device_type``
    ("cpu" or "cuda")."""
    if setting == "auto":
        return [e for e in AUTO_ORDER.get(device_type, ("torch",)) if installed(e)] or ["torch"]
    if setting not in ENGINES:
        raise ConfigError(f"{variable} must be auto or one of {', '.join(ENGINES)}, "
                          f"not {setting!r}")
    if not installed(setting):
        raise ConfigError(f"{variable}={setting} but {_MODULES[setting]} is not installed: "
                          f"{INSTALL_HINT}, or use {variable}=auto")
    return [setting]


def engine_threads(setting: int = 0) -> int:
    """ENGINE_THREADS, or the rule: one per core (see the module's docstring)."""
    if setting:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
