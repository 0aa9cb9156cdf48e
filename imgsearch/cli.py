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


def stack_settings(data_dir: Path | None = None) -> tuple[Settings, Any]:
    """Settings for a command that talks to Kafka: those of the ``imgsearch up`` running on
    the data directory (imgsearch/stack.py), unless KAFKA_BOOTSTRAP_SERVERS is set.
    Returns (settings, the RunningStack or None)."""
    import os

    from imgsearch.stack import data_dir_of, explicit_broker, find

    base = settings_or_exit()
    found = None if explicit_broker() else find(data_dir_of(base, data_dir))
    if found is None:
        return base, None
    overrides = {k: v for k, v in found.settings_overrides().items()
                 if k.upper() not in os.environ}
    return settings_or_exit(**overrides), found


def broker_or_exit(settings: Settings, data_dir: Path | None = None) -> None:
    """One line, within seconds, when no broker answers (never a 30 s wait and a traceback)."""
    from imgsearch.stack import broker_hint, data_dir_of
    from shared.kafka import check_reachable

    try:
        check_reachable(settings, hint=broker_hint(data_dir_of(settings, data_dir)))
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc


DATA_DIR_HELP = ("Data directory of a running `imgsearch up` to use (default: QDRANT_PATH "
                 "or ./data); KAFKA_BOOTSTRAP_SERVERS, when set, wins.")


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
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help=DATA_DIR_HELP)
def publish(paths: tuple[Path, ...], inline: bool, metadata: tuple[str, ...],
            label_from_folder: bool, id_prefix: str, data_dir: Path | None) -> None:
    """Publish one image.uploaded event per image file under PATHS (recursively).

    The image id is the path relative to the named folder, prefixed by the folder's name:
    `imgsearch publish photos/` gives ids like `photos/cats/1.jpg`. Beside a running
    `imgsearch up` it publishes to that up's broker.
    """
    from tqdm import tqdm

    from imgsearch.publish import publish_files
    from shared.kafka import EventPublisher

    settings, found = stack_settings(data_dir)
    meta = parse_metadata(metadata)
    files = files_or_exit(paths, id_prefix)
    roots = [Path(r) for r in found.file_roots] if found else list(settings.image_file_roots)
    if not inline and roots:
        outside = [f for f in files if not any(f.path.is_relative_to(r.resolve()) for r in roots)]
        if outside:
            who = "the running `imgsearch up`'s folders" if found else "IMAGE_FILE_ROOTS"
            click.echo(f"warning: {len(outside)} files are outside {who}; workers will refuse "
                       f"them (first: {outside[0].path}). Use --inline, or widen the roots.",
                       err=True)
    broker_or_exit(settings, data_dir)
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
    except Exception as exc:  # a broker that went away mid-way: say so in one line
        raise click.ClickException(f"publishing to {settings.kafka_bootstrap_servers} "
                                   f"failed: {type(exc).__name__}: {exc}") from exc
    finally:
        publisher.close(timeout_s=5)
    click.echo(f"published {len(result.published)} events to {settings.kafka_topic}"
               + (f" of {found.describe()}" if found else ""), err=True)


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--limit", "-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="Metadata filter (repeatable, ANDed).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help=DATA_DIR_HELP)
def search(image: Path, limit: int, filters: tuple[str, ...], data_dir: Path | None) -> None:
    """Print the stored images nearest to IMAGE as JSON.

    Beside a running `imgsearch up` it asks that up's API (the embedded store serves one
    process); otherwise it opens the configured store itself.
    """
    import time

    from imgsearch.stack import data_dir_of, find

    settings = settings_or_exit()
    found = None if settings.qdrant_url else find(data_dir_of(settings, data_dir))
    if found is not None:
        from imgsearch.search_http import search_running

        click.echo(json.dumps(search_running(found.api_url, image, limit, filters), indent=2))
        return

    from shared.components import Components
    from shared.query import search as search_store
    try:
        components = Components.load(settings)
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        started = time.perf_counter()
        # The one query path: decode, the gallery's crop policy and views, as the API does.
        try:
            query = components.query().embed_bytes(image.read_bytes())
        except ImgSearchError as exc:
            raise click.ClickException(f"{image}: {exc}") from exc
        hits = search_store(components.store, query.vectors, limit=limit,
                            filters=parse_metadata(filters))
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

from imgsearch.engines import engines  # noqa: E402

cli.add_command(engines)

from imgsearch.reindex import reindex  # noqa: E402

cli.add_command(reindex)


def main() -> None:
    cli()
