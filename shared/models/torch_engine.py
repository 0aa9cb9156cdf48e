"""The PyTorch engine: the timm model in eager mode (channels-last), with AMP and
optionally ``torch.compile`` on CUDA. It is also the reference that every exported
engine is checked against (shared/models/export.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared.errors import ConfigError
from shared.models.base import Engine


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={device} but no CUDA device is available; use DEVICE=cpu")
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for plain fp32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class TorchEngine(Engine):
    name = "torch"
    thread_bound = True

    def __init__(self, module: torch.nn.Module, *, device: torch.device,
                 channels_last: bool = True, amp_dtype: torch.dtype | None = None,
                 compile: bool = False) -> None:
        self.device = device
        self.channels_last = channels_last
        self.amp_dtype = amp_dtype
        module = module.eval().to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.model = torch.compile(module) if compile else module
        self.compiled = compile

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(batch)
        if self.device.type == "cuda":
            # Page-locked memory lets the copy run asynchronously with the host.
            tensor = tensor.pin_memory()
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                output = self.model(tensor)
        else:
            output = self.model(tensor)
        if isinstance(output, (list, tuple)):
            output = output[0]
        return output.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "version": torch.__version__, "device": str(self.device),
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                "channels_last": self.channels_last,
                "amp": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off",
                "compile": self.compiled}

    def close(self) -> None:
        self.model = self.module = None  # type: ignore[assignment]
