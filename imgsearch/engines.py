"""``imgsearch engines``: which inference engines are installed, which one ``auto``
picks, and prebuilding their cached exports (for Docker images: docs/engines.md).

    imgsearch engines list
    imgsearch engines build                       # the configured model (and detector)
    imgsearch engines build --engine onnxruntime --model mobilenetv2_100 --weights FILE
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from imgsearch.cli import settings_or_exit
from shared.errors import ImgSearchError

EXPORTED = ("onnxruntime", "openvino")


@click.group()
def engines() -> None:
    """Inference engines: list them, prebuild their cached exports."""


@engines.command("list")
def list_engines() -> None:
    """Installed engines, what EMBED_ENGINE=auto picks here, and the cache's entries."""
    from shared.models.choice import AUTO_ORDER, ENGINES, installed
    from shared.models.torch_engine import resolve_device

    settings = settings_or_exit()
    try:
        device = resolve_device(settings.device).type
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc
    order = [e for e in AUTO_ORDER.get(device, ("torch",)) if installed(e)] or ["torch"]
    cache = settings.engine_cache_path
    entries = sorted(p.name for p in cache.glob("*-*") if (p / "manifest.json").is_file()) \
        if cache.is_dir() else []
    click.echo(json.dumps({
        "device": device,
        "installed": [e for e in ENGINES if installed(e)],
        "auto_order": order,
        "embed_engine": settings.embed_engine,
        "detector_engine": settings.detector_engine,
        "cache_dir": str(cache),
        "cached": entries,
    }, indent=2))


@engines.command()
@click.option("--engine", "chosen", multiple=True, type=click.Choice(EXPORTED),
              help="Engine to build for (repeatable; default: every installed one).")
@click.option("--model", help="timm model name (default: MODEL_NAME).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Weights file (default: MODEL_WEIGHTS).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to build (default: ENGINE_CACHE_DIR or the user cache).")
def build(chosen: tuple[str, ...], model: str | None, weights: Path | None,
          cache_dir: Path | None) -> None:
    """Export the configured model (and the detector, with DETECTOR set) for each engine,
    check every export against torch, and keep them in the engine cache.

    Workers and the API then start without exporting anything. Run it in a Docker image
    build with the same MODEL_NAME, MODEL_WEIGHTS and ENGINE_CACHE_DIR as at run time.
    """
    from shared.detection.detector import Detector
    from shared.detection.yolo import resolve_weights
    from shared.embedding import Embedder
    from shared.models.choice import installed

    overrides: dict[str, Any] = {}
    if model:
        overrides["model_name"] = model
    if weights:
        overrides["model_weights"] = weights
    if cache_dir:
        overrides["engine_cache_dir"] = cache_dir
    settings = settings_or_exit(**overrides)
    targets = list(chosen) or [e for e in EXPORTED if installed(e)]
    if not targets:
        raise click.ClickException("no exported engine is installed: pip install -e '.[local]'")
    threads = settings.engine_threads or settings.torch_threads
    for engine in targets:
        started = time.perf_counter()
        try:
            embedder = Embedder(
                settings.model_name, weights=settings.model_weights,
                pretrained=settings.model_pretrained, device="cpu", engine=engine,
                threads=threads, cache_dir=settings.engine_cache_path,
                max_batch=max(settings.batch_size, settings.api_batch_max_size))
            embedder.close()
            if settings.detector != "none" and settings.detector_weights:
                Detector(resolve_weights(settings.detector_weights), engine=engine,
                         img_size=settings.detector_img_size, threads=threads,
                         trust_pickle=settings.detector_trust_pickle,
                         cache_dir=settings.engine_cache_path).close()
        except ImgSearchError as exc:
            raise click.ClickException(f"{engine}: {exc}") from exc
        click.echo(f"{engine}: {settings.model_name}"
                   + (" and the detector" if settings.detector != "none" else "")
                   + f" exported and checked against torch in {time.perf_counter() - started:.1f}s"
                   f" -> {settings.engine_cache_path}", err=True)
