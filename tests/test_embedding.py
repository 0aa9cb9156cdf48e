"""The embedder: the model's own preprocessing, a fast path that changes nothing, and
loading errors a user can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imgsearch.files import find_images
from shared.embedding import Embedder, resolve_amp
from shared.errors import ConfigError, ModelError
from shared.images import decode_image
from tests.conftest import MOBILENET


def test_preprocessing_comes_from_the_model_config(embedder: Any) -> None:
    assert embedder.data_config["input_size"] == (3, 224, 224)
    assert embedder.info.preprocessing["interpolation"] == "bicubic"
    assert embedder.info.preprocessing["crop_pct"] == 0.875
    assert embedder.dim == 1280


def test_vectors_are_unit_length(embedder: Any, birds: Path) -> None:
    files = list(find_images([birds / "Blue_Jay"]))[:8]
    vectors = embedder.embed_images([decode_image(f.path.read_bytes(), max_pixels=10**8) for f in files])
    assert vectors.shape == (8, 1280) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_fast_path_matches_plain_fp32(embedder: Any, mobilenet_weights: Path, birds: Path) -> None:
    """channels_last and batching (the fast path) against NCHW one image at a time."""
    plain = Embedder(MOBILENET, weights=mobilenet_weights, device="cpu", channels_last=False, amp="off")
    files = list(find_images([birds]))[::60][:40]
    tensors = [embedder.preprocess(decode_image(f.path.read_bytes(), max_pixels=10**8)) for f in files]
    fast = embedder.embed(tensors)
    slow = np.concatenate([plain.embed([t]) for t in tensors])
    cosines = np.sum(fast * slow, axis=1)
    assert cosines.min() >= 0.999, cosines.min()


def test_amp_is_off_on_cpu_by_default() -> None:
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("off", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16


def test_unknown_model_names_suggest_real_ones() -> None:
    with pytest.raises(ConfigError, match="mobilenetv2_100"):
        Embedder("mobilenetv2_10O", pretrained=False, device="cpu")


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MODEL_WEIGHTS"):
        Embedder(MOBILENET, weights=tmp_path / "nope.safetensors", device="cpu")


def test_weights_for_another_architecture_are_refused(mobilenet_weights: Path) -> None:
    with pytest.raises(ModelError, match="resnet18"):
        Embedder("resnet18", weights=mobilenet_weights, device="cpu")


def test_offline_without_weights_says_what_to_do(tmp_path: Path) -> None:
    """No network and no cache: the message names MODEL_WEIGHTS and MODEL_NAME."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    code = ("from shared.embedding import Embedder\n"
            "from shared.errors import ModelError\n"
            "try:\n    Embedder('mobilenetv2_100', device='cpu')\n"
            "except ModelError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert "MODEL_WEIGHTS" in out.stdout and "MODEL_NAME" in out.stdout, out.stdout + out.stderr
