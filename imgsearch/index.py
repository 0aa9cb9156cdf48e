"""``imgsearch index``: put a folder's images straight into the store, without Kafka.

For bulk backfills and machines without a broker. It feeds the same pipeline the Kafka
worker uses, with the same events ``imgsearch publish`` would send, so a folder indexed
here and the same folder published through Kafka give identical points. It is
resumable: every finished batch is durable, and images already stored with the same
bytes, URI, metadata and model are skipped without being embedded again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from imgsearch.files import ImageFile
from shared.config import Settings
from shared.events import ImageUploaded, encode, parse_event, upload_event

if TYPE_CHECKING:  # the pipeline imports torch: keep `imgsearch --help` fast
    from shared.components import Components
    from shared.pipeline.report import BatchReport


def file_event(f: ImageFile, *, metadata: dict[str, Any] | None = None,
               label_from_folder: bool = False) -> ImageUploaded:
    """The event ``imgsearch publish`` sends for ``f`` (file:// URI), as a worker parses it."""
    meta = dict(metadata or {})
    if label_from_folder:
        meta["label"] = f.label
    envelope = upload_event(f.image_id, uri=f.path.as_uri(), metadata=meta)
    event = parse_event(encode(envelope)[1])
    assert isinstance(event, ImageUploaded)
    return event


def roots_for(paths: Sequence[Path]) -> list[Path]:
    """The directories that file:// URIs for ``paths`` must be allowed to read."""
    roots = []
    for p in paths:
        real = Path(p).expanduser().resolve()
        roots.append(real if real.is_dir() else real.parent)
    return roots


def with_roots(settings_roots: Sequence[Path], paths: Sequence[Path]) -> list[Path]:
    merged = list(settings_roots)
    for root in roots_for(paths):
        if root not in merged:
            merged.append(root)
    return merged


@dataclass
class Failure:
    path: Path
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}: {self.message}"


@dataclass
class IndexResult:
    stored: int = 0
    unchanged: int = 0
    failures: list[Failure] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.stored + self.unchanged + len(self.failures)

    def add(self, report: BatchReport) -> None:
        self.stored += report.count("stored")
        self.unchanged += report.count("unchanged")
        for r in report.failures:
            assert r.error is not None
            key = r.item.key
            self.failures.append(Failure(Path(str(key)), r.error.reason, str(r.error)))


def index_files(
    components: Components,
    files: Sequence[ImageFile],
    *,
    metadata: dict[str, Any] | None = None,
    label_from_folder: bool = False,
    progress: Callable[[int], None] | None = None,
) -> IndexResult:
    """Run ``files`` through the ingest scheduler; per-file failures are collected. A
    store that stays down raises: what finished before is stored, and a rerun resumes."""
    from shared.pipeline.stages import WorkItem

    items = (
        WorkItem(f.path, file_event(f, metadata=metadata, label_from_folder=label_from_folder))
        for f in files
    )
    result = IndexResult()
    result.add(components.ingest(items, skip_unchanged=True,
                                 progress=(lambda _r: progress(1)) if progress else None))
    return result


def model_overrides(model: str | None, weights: Path | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if model:
        overrides["model_name"] = model
    if weights:
        overrides["model_weights"] = weights
    return overrides


MODEL_HELP = (
    "timm model name (MODEL_NAME; default resnet50). Its pretrained weights come from the "
    "Hugging Face hub on first use and are cached."
)
WEIGHTS_HELP = (
    "Local weights file for the model (MODEL_WEIGHTS), e.g. mobilenetv2_100.safetensors: "
    "needed on a machine without internet."
)


@click.command("index")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Embedded store directory (QDRANT_PATH; default ./data).")
@click.option("--model", help=MODEL_HELP)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=WEIGHTS_HELP)
@click.option("--label-from-folder/--no-label-from-folder", default=True, show_default=True,
              help="Store each file's parent folder name as metadata 'label'.")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE",
              help="Metadata for every image (repeatable).")
@click.option("--id-prefix", default="", help="Prefix for the image ids (default: none).")
def index(paths: tuple[Path, ...], data_dir: Path | None, model: str | None,
          weights: Path | None, label_from_folder: bool, metadata: tuple[str, ...],
          id_prefix: str) -> None:
    """Index the images under PATHS straight into the configured store (no Kafka).

    Uses the same pipeline as the ingest workers. Run it again to resume: images already
    stored with the same content are skipped. Exits with status 1 if some files failed.
    """
    from tqdm import tqdm

    from imgsearch.cli import files_or_exit, parse_metadata, settings_or_exit
    from shared.components import Components
    from shared.errors import ImgSearchError
    from shared.logs import setup_logging

    base = settings_or_exit()
    overrides: dict[str, Any] = {
        "image_file_roots": with_roots(base.image_file_roots, paths),
        **model_overrides(model, weights),
    }
    if data_dir is not None:
        overrides["qdrant_path"] = data_dir
    settings: Settings = settings_or_exit(**overrides)
    _refuse_beside_up(settings)
    setup_logging(_quiet_level())
    meta = parse_metadata(metadata)
    files = files_or_exit(paths, id_prefix)

    try:
        components = Components.load(settings)
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc
    started = time.monotonic()
    result = IndexResult()
    try:
        with tqdm(total=len(files), unit="img", desc="indexing", file=sys.stderr) as bar:
            try:
                result = index_files(components, files, metadata=meta,
                                     label_from_folder=label_from_folder, progress=bar.update)
            except KeyboardInterrupt:
                bar.close()
                click.echo("interrupted: finished batches are stored; run the same command "
                           "again to resume", err=True)
                raise
        t0 = time.monotonic()
        components.store.optimize()
        optimize_s = time.monotonic() - t0
        total = components.store.count()
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        components.close()
    elapsed = time.monotonic() - started
    click.echo(
        f"indexed {len(files)} files in {elapsed:.1f}s: stored {result.stored}, unchanged "
        f"(skipped) {result.unchanged}, failed {len(result.failures)}; store "
        f"{settings.store_location} holds {total} images (optimized in {optimize_s:.1f}s)"
    )
    if result.failures:
        click.echo(f"{len(result.failures)} files could not be indexed:", err=True)
        for failure in result.failures:
            click.echo(f"  {failure}", err=True)
        sys.exit(1)


def _refuse_beside_up(settings: Settings) -> None:
    """The embedded store serves one process: say so in one line, naming the running up."""
    from imgsearch.stack import find

    other = None if settings.qdrant_url else find(settings.embedded_store_path)
    if other is not None:
        raise click.ClickException(
            f"{other.describe()} is serving {settings.embedded_store_path}, and the embedded "
            "store serves one process. Stop it first (Ctrl-C in its terminal), or add the "
            "photos while it runs: imgsearch publish --label-from-folder PATHS (files outside "
            "the folders `up` was given need --inline), or index into another --data-dir.")


def _quiet_level() -> str:
    """Per-batch INFO lines would break the progress bar; LOG_LEVEL still wins if set."""
    return os.environ.get("LOG_LEVEL", "WARNING")
