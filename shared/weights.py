"""Model weights: where pretrained ones come from, and what a weights file was made for.

Two start-up failures used to cost a new user dearly:

* Offline with no weights file, the hub client retried for about a minute, printing each
  warning twice, before the real message. ``pretrained_source`` answers in seconds: the
  cached file when there is one (loaded from disk, no network at all), else a bounded
  probe of the hub's host, else one ModelError that names ``--weights``.
* A weights file for another model failed with raw torch "size mismatch" lines.
  ``describe_misfit`` compares the file's tensor shapes with the model's and names the
  timm model the file does fit, searching a bounded number of likely candidates.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ModelError


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

HUB_PROBE_TIMEOUT_S = 3.0
# How long the search for the model a weights file fits may take (meta-device builds of
# candidate architectures, ~0.05-1 s each).
DIAGNOSE_BUDGET_S = 10.0
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")

Shapes = dict[str, tuple[int, ...]]


def offline_hint(name: str) -> str:
    return (f"Give a weights file for it: imgsearch up --model {name} --weights "
            f"/path/to/{name}.safetensors (or MODEL_NAME and MODEL_WEIGHTS). Weights come "
            "from a connected machine's ~/.cache/huggingface, or from "
            f"https://huggingface.co/timm/ (the {name} repository's model.safetensors).")


# -- pretrained weights from the hub ---------------------------------------------------------


def cached_pretrained_file(name: str) -> Path | None:
    """The pretrained weights of timm model ``name`` if a cache on this machine has them:
    the Hugging Face hub cache, or torch hub's for models hosted at a URL."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILENAMES
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        return None
    if cfg.url:
        import torch.hub

        candidate = (Path(torch.hub.get_dir()) / "checkpoints"
                     / Path(urllib.parse.urlparse(cfg.url).path).name)
        return candidate if candidate.is_file() else None
    return None


def _download_host(name: str) -> tuple[str, int] | None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        url = urllib.parse.urlparse(constants.ENDPOINT)
    elif cfg.url:
        url = urllib.parse.urlparse(cfg.url)
    else:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    return (url.hostname or "", port)


def unreachable(host: str, port: int, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why ``host:port`` cannot be reached within ``timeout_s`` (DNS included), or None."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    # getaddrinfo has no timeout of its own: an offline resolver can take 10 s or more.
    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not outcome:
        return f"no answer within {timeout_s:g} s"
    return outcome[0]


def pretrained_source(name: str) -> Path | None:
    """Where ``name``'s pretrained weights will come from: a cached file (returned, to be
    loaded without any network), or the hub (None: it answers). Raises ModelError within
    a few seconds when neither can work."""
    cached = cached_pretrained_file(name)
    if cached is not None:
        return cached
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"no weights for {name!r}: they are not in this machine's cache and "
                         f"HF_HUB_OFFLINE is set. {offline_hint(name)}")
    target = _download_host(name)
    if target is None:
        raise ModelError(f"timm has no pretrained weights for {name!r}. {offline_hint(name)}")
    why = unreachable(*target)
    if why is not None:
        raise ModelError(
            f"no weights for {name!r}: they are not in this machine's cache and "
            f"{target[0]} cannot be reached ({why}). {offline_hint(name)}")
    return None


# -- a weights file that does not fit ----------------------------------------------------------


def file_shapes(path: Path) -> Shapes:
    """Tensor name -> shape of a state dict file, reading as little as the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    import torch

    loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("state_dict_ema", "state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict):
        raise ModelError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in loaded.items()
            if hasattr(v, "shape")}


def model_shapes(name: str) -> Shapes:
    """Tensor name -> shape of timm's ``name`` without its classifier, built on the meta
    device (no memory, no initialisation cost beyond Python)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass
class Fit:
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    differing: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.differing


def compare(model: Shapes, weights: Shapes) -> Fit:
    """Does every tensor of the model (classifier excluded) have its twin in the file?
    Extra tensors in the file (a classifier, an EMA copy) do not matter."""
    fit = Fit()
    for key, shape in model.items():
        have = weights.get(key)
        if have is None:
            fit.missing.append(key)
        elif have != shape:
            fit.differing.append((key, have, shape))
    return fit


def _names_in_path(path: Path) -> list[str]:
    """Model names the file's path suggests: ``resnet50.safetensors``,
    ``models--timm--resnet50.a1_in1k/snapshots/.../model.safetensors``."""
    import timm

    words: list[str] = []
    for part in (path.stem, *[p.name for p in path.parents][:4]):
        part = part.removeprefix("models--").replace("--", "/").split("/")[-1]
        # The architecture before its tag first: "mobilenetv2_100", not "...ra_in1k".
        words += [part.split(".")[0], part, re.sub(r"[_-](ra|a\d|tv|in1k|in21k).*$", "", part)]
    names: list[str] = []
    for word in words:
        if word and timm.is_model(word) and word not in names:
            names.append(word)
    for word in words[:3]:
        for close in difflib.get_close_matches(word, timm.list_models(), n=3, cutoff=0.85):
            if close not in names:
                names.append(close)
    return names


def _same_layout(weights: Shapes) -> list[str]:
    """Architectures whose first convolution is named as in the file: those whose
    classifier is named as in the file first, then simplest names first (resnet18 before
    resnet50d)."""
    import timm
    from timm.models import get_pretrained_cfg

    ranked = []
    for name in timm.list_models():
        cfg = get_pretrained_cfg(name)
        if cfg is None or not isinstance(cfg.first_conv, str):
            continue
        if f"{cfg.first_conv}.weight" not in weights:
            continue
        classifier = cfg.classifier if isinstance(cfg.classifier, str) else ""
        ranked.append((f"{classifier}.weight" not in weights, len(name), name))
    return [name for *_, name in sorted(ranked)]


def candidates(path: Path, weights: Shapes, exclude: str) -> Iterator[str]:
    seen = {exclude}
    for name in [*_names_in_path(path), *_same_layout(weights)]:
        if name not in seen:
            seen.add(name)
            yield name


def fitting_model(path: Path, weights: Shapes, exclude: str,
                  budget_s: float = DIAGNOSE_BUDGET_S) -> tuple[str | None, int]:
    """The first candidate model the file fits, and how many were tried in the budget."""
    deadline = time.monotonic() + budget_s
    tried = 0
    for name in candidates(path, weights, exclude):
        if time.monotonic() > deadline:
            break
        tried += 1
        try:
            if compare(model_shapes(name), weights).ok:
                return name, tried
        except Exception:  # noqa: BLE001,S112 - an architecture that cannot build is not it
            continue
    return None, tried


def describe_misfit(path: Path, name: str, budget_s: float = DIAGNOSE_BUDGET_S) -> str | None:
    """A sentence on why ``path`` does not fit timm's ``name`` and which model it seems
    to fit; None when the file does fit (the failure was something else)."""
    try:
        weights = file_shapes(path)
    except ModelError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a file torch or safetensors cannot read
        return f"{path} is not a readable state dict ({type(exc).__name__}: {exc})"
    try:
        fit = compare(model_shapes(name), weights)
    except Exception:  # noqa: BLE001 - no diagnosis beats a wrong one; the caller has its own
        return None
    if fit.ok:
        return None
    total = len(weights)
    parts = []
    if fit.differing:
        key, have, want = fit.differing[0]
        parts.append(f"{len(fit.differing)} tensors have other shapes (e.g. {key}: "
                     f"{list(have)} in the file, {list(want)} in {name})")
    if fit.missing:
        parts.append(f"{len(fit.missing)} of {name}'s tensors are not in it "
                     f"(e.g. {fit.missing[0]})")
    what = f"{path.name} ({total} tensors) does not fit {name}: {'; '.join(parts)}."
    other, tried = fitting_model(path, weights, name, budget_s)
    if other:
        return (f"{what} It fits {other}: use --model {other} (MODEL_NAME={other}), or "
                f"the weights of {name}.")
    return (f"{what} None of the {tried} timm models with the same layout that were "
            "tried fits it: name the model it was saved from with --model (MODEL_NAME).")

