"""What ``imgsearch up`` must do to make the index mirror its folders.

* **New or changed files** are published as uploads. "Changed" is the pipeline's own rule
  (bytes, URI, metadata, model), so ``up`` and the workers agree on "unchanged".
* **Removed files** are deleted from the index, through ``image.deleted`` events. Which
  images are ``up``'s to delete: those whose ``uri`` is a ``file://`` path under one of the
  folders given to this ``up``, and whose file is no longer there. That rule needs no
  marker and holds whoever published the image (``up``, ``imgsearch publish``, a producer
  of file:// events): the folder is the truth for the files under it. Images added
  through the API (``POST /images``, inline bytes, no uri), with http(s):// or s3:// URIs,
  or from files outside those folders are never touched.
* **Files that failed** for a reason retrying cannot fix (not an image, too large, too
  many pixels) are remembered in ``<data dir>/imgsearch-up/failed-<collection>.json`` with
  their size and modification time, and not published again until one of those changes
  (or ``--retry-failed``).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsearch.files import ImageFile
from imgsearch.index import Failure, file_event
from imgsearch.stack import state_dir
from shared.images import sha256_hex

if TYPE_CHECKING:  # these import torch: keep `imgsearch --help` fast
    from shared.pipeline.stages import IngestPipeline
    from shared.store.base import VectorStore

CHECK_CHUNK = 256
# Reasons that depend on the file alone: publishing it again unchanged fails again.
PERMANENT_REASONS = frozenset({"undecodable", "too_large", "too_many_pixels"})


# -- new or changed ------------------------------------------------------------------------


def new_or_changed(
    pipeline: IngestPipeline,
    store: VectorStore,
    files: Sequence[ImageFile],
    *,
    label_from_folder: bool,
    max_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> list[ImageFile]:
    """Files whose stored point differs from what publishing them would store."""
    todo: list[ImageFile] = []
    for start in range(0, len(files), CHECK_CHUNK):
        chunk = files[start : start + CHECK_CHUNK]
        stored = store.get([f.image_id for f in chunk])
        for f in chunk:
            have = stored.get(f.image_id)
            if have is None or _differs(pipeline, f, have.payload, label_from_folder, max_bytes):
                todo.append(f)
        if progress:
            progress(len(chunk))
    return todo


def _differs(pipeline: IngestPipeline, f: ImageFile, payload: dict[str, Any],
             label_from_folder: bool, max_bytes: int) -> bool:
    try:
        if f.path.stat().st_size > max_bytes:
            return True  # the worker will refuse it and say why
        data = f.path.read_bytes()
    except OSError:
        return True  # the worker reports the read error
    event = file_event(f, label_from_folder=label_from_folder)
    return not pipeline.is_unchanged(event, sha256_hex(data), payload)


# -- removed -------------------------------------------------------------------------------


def mirror_roots(paths: Iterable[Path]) -> list[Path]:
    """The folders (or single files) whose contents ``up`` mirrors."""
    return [Path(p).expanduser().resolve() for p in paths]


def uri_path(uri: object) -> Path | None:
    """The local path of a ``file://`` URI; None for anything else."""
    if not isinstance(uri, str) or not uri.startswith("file://"):
        return None
    parsed = urllib.parse.urlparse(uri)
    return Path(urllib.request.url2pathname(parsed.path))


def removed_images(store: VectorStore, files: Sequence[ImageFile],
                   roots: Sequence[Path]) -> list[str]:
    """Ids of stored images whose file:// source is under ``roots`` but is not one of
    ``files`` any more (the files found under those roots now)."""
    on_disk = {f.path for f in files}
    gone = []
    for image in store.scroll_images(("image_id", "uri")):
        path = uri_path(image.payload.get("uri"))
        if path is None or path in on_disk:
            continue
        if any(path.is_relative_to(root) for root in roots):
            gone.append(image.image_id)
    return gone


# -- failed before ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFailure:
    path: str
    size: int
    mtime_ns: int
    reason: str
    message: str
    failed_at: str = ""

    def matches(self, path: Path) -> bool:
        """True while the file is the one that failed (same size and modification time)."""
        try:
            st = path.stat()
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


class FailedFiles:
    """Files that failed for a permanent reason, remembered across runs of ``up``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, KnownFailure] = {}
        try:
            body = json.loads(path.read_text())
            for entry in body.get("files", []):
                known = KnownFailure(**entry)
                self.entries[known.path] = known
        except (OSError, ValueError, TypeError):
            pass  # none yet, or unreadable: every file is tried again, which is safe

    @classmethod
    def for_collection(cls, data_dir: Path, collection: str) -> FailedFiles:
        return cls(state_dir(data_dir) / f"failed-{collection}.json")

    def known(self, f: ImageFile) -> KnownFailure | None:
        entry = self.entries.get(str(f.path))
        return entry if entry is not None and entry.matches(f.path) else None

    def update(self, failures: Sequence[Failure], succeeded: Iterable[ImageFile]) -> None:
        """Remember this run's permanent failures; forget files that are stored now."""
        for f in succeeded:
            self.entries.pop(str(f.path), None)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for failure in failures:
            key = str(failure.path)
            if failure.reason not in PERMANENT_REASONS:
                self.entries.pop(key, None)
                continue
            try:
                st = failure.path.stat()
            except OSError:
                continue
            self.entries[key] = KnownFailure(key, st.st_size, st.st_mtime_ns, failure.reason,
                                             failure.message, now)

    def prune(self) -> None:
        """Forget files that no longer exist."""
        self.entries = {k: v for k, v in self.entries.items() if Path(k).exists()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"files": [vars(e) for e in sorted(self.entries.values(), key=lambda e: e.path)]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(self.path)


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class MirrorPlan:
    files: list[ImageFile]
    todo: list[ImageFile] = field(default_factory=list)  # to publish as uploads
    skipped: list[KnownFailure] = field(default_factory=list)  # failed before, unchanged
    removed: list[str] = field(default_factory=list)  # image ids to delete

    @property
    def unchanged(self) -> int:
        return len(self.files) - len(self.todo) - len(self.skipped)

    @property
    def empty(self) -> bool:
        return not self.todo and not self.removed


def plan(
    pipeline: IngestPipeline,
    store: VectorStore,
    files: list[ImageFile],
    roots: Sequence[Path],
    failed: FailedFiles,
    *,
    label_from_folder: bool,
    max_bytes: int,
    mirror: bool = True,
    retry_failed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MirrorPlan:
    result = MirrorPlan(files)
    changed = new_or_changed(pipeline, store, files, label_from_folder=label_from_folder,
                             max_bytes=max_bytes, progress=progress)
    for f in changed:
        known = None if retry_failed else failed.known(f)
        if known is not None:
            result.skipped.append(known)
        else:
            result.todo.append(f)
    if mirror:
        result.removed = removed_images(store, files, roots)
    return result
