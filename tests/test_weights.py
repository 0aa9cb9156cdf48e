"""Model weights at start-up: fast, clear failures, and cached weights used with no network.

Offline is simulated without touching any outside address: HF_HUB_OFFLINE, or the hub
pointed at a closed loopback port (HF_ENDPOINT), with an empty cache (HF_HOME).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.embedding import Embedder
from shared.errors import ModelError
from shared.weights import describe_misfit
from tests.conftest import MOBILENET, REPO, free_port


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "MODEL_", "KAFKA_", "QDRANT_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), TORCH_HOME=str(tmp_path / "torch-home"),
               HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", PYTHONPATH=str(REPO),
               PYTHONUNBUFFERED="1", **extra)
    return env


def _load_into_resnet50(weights: Path) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        Embedder("resnet50", weights=weights, device="cpu")
    took = time.monotonic() - started
    message = str(caught.value)
    print(f"\n{weights} into resnet50: {took:.1f}s: {message}")
    assert "does not fit resnet50" in message
    assert "size mismatch" not in message and "\n" not in message
    assert took < 20
    return message, took


def test_weights_for_another_model_name_the_model_they_fit(mobilenet_weights: Path,
                                                            tmp_path: Path) -> None:
    # Named after its model, or in the hub cache's layout (models--timm--<model>.<tag>).
    hub = tmp_path / "models--timm--mobilenetv2_100.ra_in1k" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    shutil.copy(mobilenet_weights, hub / "model.safetensors")
    for weights in (mobilenet_weights, hub / "model.safetensors"):
        message, _ = _load_into_resnet50(weights)
        assert "It fits mobilenetv2_100: use --model mobilenetv2_100" in message


def test_anonymous_weights_are_searched_for_within_a_bound(mobilenet_weights: Path,
                                                           tmp_path: Path) -> None:
    """A file whose name says nothing: candidates with the same layout are tried for at
    most DIAGNOSE_BUDGET_S (10 s); the answer is the model, or how many were tried."""
    anonymous = tmp_path / "download" / "weights.safetensors"
    anonymous.parent.mkdir()
    shutil.copy(mobilenet_weights, anonymous)
    message, _ = _load_into_resnet50(anonymous)
    assert ("It fits mobilenetv2_100" in message
            or "timm models with the same layout that were tried fits it" in message)


def test_weights_that_fit_are_not_questioned(mobilenet_weights: Path) -> None:
    assert describe_misfit(mobilenet_weights, MOBILENET) is None


def test_a_file_that_is_not_a_state_dict_says_so(tmp_path: Path) -> None:
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ModelError, match="not a readable state dict"):
        Embedder(MOBILENET, weights=junk, device="cpu")


CREATE = (
    "import time; t = time.monotonic()\n"
    "from shared.embedding import create_backbone\n"
    "from shared.errors import ModelError\n"
    "try:\n"
    "    model, desc = create_backbone({name!r}, None, True)\n"
    "    print('LOADED', desc, round(time.monotonic() - t, 1))\n"
    "except ModelError as exc:\n"
    "    print('FAILED', round(time.monotonic() - t, 1), exc)\n"
)


@pytest.mark.parametrize("how", ["hub unreachable", "HF_HUB_OFFLINE"])
def test_no_weights_offline_fails_in_seconds_naming_weights(tmp_path: Path, how: str) -> None:
    extra = {"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {}
    result = subprocess.run([sys.executable, "-c", CREATE.format(name="resnet50")],
                            env=offline_env(tmp_path, **extra), capture_output=True, text=True,
                            timeout=120, check=False, cwd=REPO)
    out = result.stdout.strip()
    print(f"\n{how}: {out}")
    assert out.startswith("FAILED"), result.stdout + result.stderr
    seconds = float(out.split()[1])
    assert seconds < 10, "the model hub must not be retried for a minute"
    assert "--weights" in out and "MODEL_WEIGHTS" in out
    assert "Traceback" not in result.stderr


def test_cached_hub_weights_load_with_no_network(tmp_path: Path, mobilenet_weights: Path) -> None:
    """Weights in the Hugging Face cache are read from disk: no request, no retries."""
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(MOBILENET).hf_hub_id
    revision = "0" * 40
    cache = tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(revision)
    snapshot = cache / "snapshots" / revision
    snapshot.mkdir(parents=True)
    shutil.copy(mobilenet_weights, snapshot / "model.safetensors")
    result = subprocess.run([sys.executable, "-c", CREATE.format(name=MOBILENET)],
                            env=offline_env(tmp_path), capture_output=True, text=True,
                            timeout=120, check=False, cwd=REPO)
    assert result.stdout.startswith(f"LOADED hub:{repo}"), result.stdout + result.stderr
