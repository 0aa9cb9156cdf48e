"""``imgsearch``: publish images, search, and run the stack.

Configuration comes from the same environment variables as the services (see README).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from shared.config import Settings, load_settings
from shared.errors import ImgSearchError


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; values that look like numbers or booleans are typed."""
    metadata: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--metadata")
        value: Any = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
        metadata[key] = value
    return metadata


def files_or_exit(paths: tuple[Path, ...], id_prefix: str = "") -> list[Any]:
    """The image files under ``paths`` with their ids, or a clear error when there are none."""
    from imgsearch.files import IMAGE_SUFFIXES
    from imgsearch.publish import collect

    try:
        files = collect(list(paths), id_prefix)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not files:
        raise click.ClickException(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, paths))}"
        )
    return files


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgsearch")
def cli() -> None:
    """Reverse image search: index photos, then find the ones that look alike."""


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--inline", is_flag=True, help="Embed the image bytes in the event instead of a file:// URI.")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Metadata for every image (repeatable).")
@click.option("--label-from-folder", is_flag=True, help="Store each file's parent folder name as metadata 'label'.")
@click.option("--id-prefix", default="", help="Prefix for the image ids (default: none).")
def publish(paths: tuple[Path, ...], inline: bool, metadata: tuple[str, ...],
            label_from_folder: bool, id_prefix: str) -> None:
    """Publish one image.uploaded event per image file under PATHS (recursively).

    The image id is the path relative to the named folder, prefixed by the folder's name:
    `imgsearch publish photos/` gives ids like `photos/cats/1.jpg`.
    """
    from tqdm import tqdm

    from imgsearch.publish import publish_files
    from shared.kafka import EventPublisher

    settings = settings_or_exit()
    meta = parse_metadata(metadata)
    files = files_or_exit(paths, id_prefix)
    if not inline and settings.image_file_roots:
        outside = [f for f in files if not any(f.path.is_relative_to(r.resolve()) for r in settings.image_file_roots)]
        if outside:
            click.echo(f"warning: {len(outside)} files are outside IMAGE_FILE_ROOTS; workers will "
                       f"refuse them (first: {outside[0].path}). Use --inline or widen the roots.",
                       err=True)
    try:
        publisher = EventPublisher(settings)
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise click.ClickException(
            f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}: {exc}"
        ) from exc
    try:
        with tqdm(total=len(files), unit="img", desc="publishing", file=sys.stderr) as bar:
            result = publish_files(publisher, files, inline=inline, metadata=meta,
                                   label_from_folder=label_from_folder, progress=bar.update)
    finally:
        publisher.close()
    click.echo(f"published {len(result.published)} events to {settings.kafka_topic}", err=True)


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--limit", "-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="Metadata filter (repeatable, ANDed).")
def search(image: Path, limit: int, filters: tuple[str, ...]) -> None:
    """Print the stored images nearest to IMAGE as JSON, using the configured store."""
    import time

    from shared.components import Components
    from shared.images import decode_image

    settings = settings_or_exit()
    try:
        components = Components.load(settings)
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        started = time.perf_counter()
        try:
            picture = decode_image(image.read_bytes(), max_pixels=settings.image_max_pixels)
        except ImgSearchError as exc:
            raise click.ClickException(f"{image}: {exc}") from exc
        vector = components.embedder.embed_images([picture])[0]
        hits = components.store.search(vector, limit=limit, filters=parse_metadata(filters))
        result = {
            "query": str(image),
            "took_ms": round((time.perf_counter() - started) * 1000, 1),
            "hits": [
                {"image_id": h.image_id, "score": round(h.score, 6), "uri": h.payload.get("uri"),
                 "metadata": h.payload.get("metadata", {})}
                for h in hits
            ],
        }
        click.echo(json.dumps(result, indent=2))
    finally:
        components.close()


# The embedded stack (up, index, demo); imported last because they use the helpers above.
from imgsearch.demo import demo  # noqa: E402
from imgsearch.index import index  # noqa: E402
from imgsearch.up import up  # noqa: E402

cli.add_command(up)
cli.add_command(index)
cli.add_command(demo)


# Commands that live in their own modules register here (they import helpers from above).
from imgsearch.dlq import dlq  # noqa: E402

cli.add_command(dlq)

from imgsearch.evaluation.command import eval_command  # noqa: E402

cli.add_command(eval_command, "eval")


def main() -> None:
    cli()
