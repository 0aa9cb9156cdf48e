"""An embedding spec as settings: what a process must set to load a collection's model
and vectors. Kept in each collection's metadata (``load``) and in migration records, so
any process can serve, dual-write or migrate away from a collection it was not started for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.errors import ConfigError

# The Settings fields that decide what a collection's vectors mean. Everything else
# (Kafka, engine, batching, layout, API limits) stays the running process's own.
SPEC_FIELDS: tuple[str, ...] = (
    "model_name", "model_weights", "model_pretrained",
    "vector_reduction", "vector_dim", "vector_reduction_seed", "vector_reduction_file",
    "quantization",
)


def load_settings_of(settings: Settings) -> dict[str, Any]:
    """The spec fields of ``settings``, as JSON."""
    out: dict[str, Any] = {}
    for name in SPEC_FIELDS:
        value = getattr(settings, name)
        if isinstance(value, Path):
            value = str(value.absolute())
        out[name] = value
    return out


def with_spec(base: Settings, load: Mapping[str, Any]) -> Settings:
    """``base`` with a spec's fields: the settings of a process that serves that spec."""
    values = {**base.model_dump(), **{k: v for k, v in load.items() if k in SPEC_FIELDS}}
    try:
        return type(base).model_validate(values)
    except ValueError as exc:
        raise ConfigError(f"cannot use the recorded spec {dict(load)}: {exc}") from exc


def explicit_spec(settings: Settings) -> bool:
    """Whether the spec was chosen (environment or command line), not left at defaults."""
    return bool(set(SPEC_FIELDS) & settings.model_fields_set)


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two specs that load the same network with the same weights (one embedder serves both)."""
    keys = ("model_name", "model_weights", "model_pretrained")
    return all(a.get(k) == b.get(k) for k in keys) and a.get("model_pretrained") is not False


def spec_overrides(*, model: str | None = None, weights: Path | None = None,
                   random_weights: bool = False, variant: str | None = None,
                   reduction_file: Path | None = None) -> dict[str, Any]:
    """Settings overrides for a target spec from CLI-style choices. ``variant`` is eval's
    notation: ``full``, ``random:N``, ``pca:N``, ``int8``, ``binary``, ``pca:320+int8``."""
    overrides: dict[str, Any] = {}
    if model:
        overrides["model_name"] = model
        overrides["model_weights"] = None
        overrides["model_pretrained"] = not random_weights
    if weights:
        overrides["model_weights"] = weights
        overrides["model_pretrained"] = True
    if variant:
        reduction, dim, quantization = "none", None, "none"
        for part in (p.strip() for p in variant.split("+") if p.strip()):
            method, _, size = part.partition(":")
            if method in ("full", "none") and not size:
                continue
            if method in ("int8", "binary") and not size:
                quantization = method
            elif method in ("random", "pca") and size.isdigit() and int(size) > 0:
                reduction, dim = method, int(size)
            else:
                raise ConfigError(
                    f"cannot read spec variant {variant!r}: use full, random:N, pca:N, int8, "
                    "binary, or a reduction and a quantization joined by '+', e.g. pca:320+int8")
        overrides.update(vector_reduction=reduction, vector_dim=dim, quantization=quantization,
                         vector_reduction_file=reduction_file if reduction == "pca" else None)
    return overrides
