"""Publish one image.uploaded event per image file: ``imgsearch publish`` and ``imgsearch up``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsearch.files import ImageFile, find_images
from shared.events import delete_event, upload_event
from shared.kafka import EventPublisher
from shared.metadata import InvalidValue, check_image_id


@dataclass
class PublishResult:
    published: list[ImageFile] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset + 1


def publish_files(
    publisher: EventPublisher,
    files: Sequence[ImageFile],
    *,
    inline: bool = False,
    metadata: dict[str, Any] | None = None,
    label_from_folder: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PublishResult:
    """Publish every file and wait until the broker has acknowledged all of them."""
    result = PublishResult()
    futures = []
    for f in files:
        meta = dict(metadata or {})
        if label_from_folder:
            meta["label"] = f.label
        if inline:
            envelope = upload_event(f.image_id, image_bytes=f.path.read_bytes(), metadata=meta)
        else:
            envelope = upload_event(f.image_id, uri=f.path.as_uri(), metadata=meta)
        futures.append(publisher.publish(envelope))
        result.published.append(f)
        if progress:
            progress(1)
    publisher.flush()
    for future in futures:
        meta = future.get(timeout=60)
        result.offsets[meta.partition] = max(result.offsets.get(meta.partition, 0), meta.offset + 1)
    return result


def publish_deletes(
    publisher: EventPublisher,
    image_ids: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """Publish one image.deleted event per id and wait for the broker's acks; returns the
    offsets after the last one per partition (as ``PublishResult.offsets``)."""
    futures = []
    for image_id in image_ids:
        futures.append(publisher.publish(delete_event(image_id, source="imgsearch-up")))
        if progress:
            progress(1)
    publisher.flush()
    offsets: dict[int, int] = {}
    for future in futures:
        meta = future.get(timeout=60)
        offsets[meta.partition] = max(offsets.get(meta.partition, 0), meta.offset + 1)
    return offsets


def check_unique_ids(files: Sequence[ImageFile]) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        if f.image_id in seen and seen[f.image_id] != f.path:
            raise ValueError(
                f"two files would get image_id {f.image_id!r}: {seen[f.image_id]} and {f.path}. "
                "Publish folders with distinct names, or one at a time with --id-prefix."
            )
        seen[f.image_id] = f.path


SHOW_UNNAMABLE = 10


def collect(paths: Sequence[Path], id_prefix: str = "") -> list[ImageFile]:
    """The image files under ``paths`` (index, publish and up all start here). A file whose
    path cannot be an image id (a control character in its name, or nested so deep that the
    id passes 512 characters) is left out and named on stderr, so that one odd name neither
    stops a run nor fails later in the middle of one."""
    files: list[ImageFile] = []
    unnamable: list[tuple[ImageFile, InvalidValue]] = []
    for found in find_images(paths):
        f = ImageFile(found.path, f"{id_prefix}{found.image_id}", found.label)
        try:
            check_image_id(f.image_id)
        except InvalidValue as exc:
            unnamable.append((f, exc))
            continue
        files.append(f)
    for f, exc in unnamable[:SHOW_UNNAMABLE]:
        print(f"skipped {str(f.path)!r}: its path cannot be an image id ({exc}); rename it, "
              "or name a folder nearer to it", file=sys.stderr)
    if len(unnamable) > SHOW_UNNAMABLE:
        print(f"skipped {len(unnamable) - SHOW_UNNAMABLE} more files whose paths cannot be "
              "image ids", file=sys.stderr)
    check_unique_ids(files)
    return files
