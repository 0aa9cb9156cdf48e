"""Logical indexes, the physical collections behind them, and the pointer between them.

The API and the workers address a *logical* index, QDRANT_COLLECTION. It resolves to one
*physical* collection, built for one embedding spec (model, weights, preprocessing,
reduction, quantization: ``spec_identity``). A re-index (shared/reindex/) builds another
physical collection beside it and moves the pointer atomically.

Names::

    images                  a deployment's first collection, as every deployment made it
                            before re-indexing existed: adopted as is, never renamed
    images--0123456789ab    a collection built by a re-index, for the spec with that digest

The pointer:

* **Qdrant server**: a Qdrant alias. It is named ``images`` once no collection holds that
  name. While the first collection does (Qdrant refuses an alias that shadows a
  collection), it is named ``images--live``; dropping the first collection moves it to
  ``images``. Every move is one ``update_collection_aliases`` request: atomic.
* **Embedded store**: ``<QDRANT_PATH>/aliases.json``, ``{"images": "images--0123456789ab"}``,
  replaced by a rename: atomic.

``resolve(logical)`` is the pointer's target when there is one, else the collection named
``logical`` when it exists (every deployment before its first swap), else None.

A catalog also keeps each logical index's migration record (shared/reindex/record.py),
a JSON object whose top-level keys are each written by one party (the backfill writes
``progress``, the commands ``state``...): ``update_record`` merges top-level keys, so
writers of different keys never undo each other. Server: the metadata of a vector-less
collection ``images--reindex``. Embedded: ``<QDRANT_PATH>/reindex-images.json``.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.errors import CollectionMismatchError
from shared.store.base import CollectionSpec

LIVE_SUFFIX = "--live"
RECORD_SUFFIX = "--reindex"
_DIGEST_CHARS = 12


# -- spec identity ----------------------------------------------------------------------------


def spec_info(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``imgsearch`` part of a collection's stored metadata (CollectionSpec.metadata())."""
    return dict((metadata or {}).get("imgsearch") or {})


def spec_identity(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a collection's vectors mean: two collections with the same identity hold
    interchangeable vectors. Layout, query-time knobs and load settings are not part of it."""
    info = spec_info(metadata)
    return {
        "model_name": info.get("model_name"),
        "weights": info.get("weights"),
        "preprocessing": info.get("preprocessing"),
        "dim": info.get("dim"),
        "distance": info.get("distance", "cosine"),
        "reduction": (info.get("reduction") or {}).get("identity"),
        "quantization": info.get("quantization", "none"),
    }


def spec_digest(metadata: Mapping[str, Any] | None) -> str:
    canonical = json.dumps(spec_identity(metadata), sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe_spec(metadata: Mapping[str, Any] | None) -> str:
    """One line for people: model, weights, dim, reduction, quantization."""
    ident = spec_identity(metadata)
    parts = [str(ident["model_name"]), str(ident["weights"]), f"{ident['dim']}-d"]
    if ident["reduction"]:
        parts.append(f"{ident['reduction'].get('method')}:{ident['reduction'].get('out_dim')}")
    if ident["quantization"] != "none":
        parts.append(str(ident["quantization"]))
    return " ".join(parts)


def physical_name(logical: str, metadata: Mapping[str, Any]) -> str:
    """The collection a re-index builds for this spec."""
    return f"{logical}--{spec_digest(metadata)[:_DIGEST_CHARS]}"


def is_physical_of(logical: str, name: str) -> bool:
    return name == logical or re.fullmatch(
        re.escape(logical) + f"--[0-9a-f]{{{_DIGEST_CHARS}}}", name) is not None


def compatible(spec: CollectionSpec, metadata: Mapping[str, Any] | None) -> bool:
    """Whether a process configured for ``spec`` may open a collection stored with
    ``metadata`` (the store's own check, which accepts partial identities)."""
    if metadata is None:
        return False
    try:
        spec.check_compatible(metadata, int(spec_info(metadata).get("dim", -1)))
    except CollectionMismatchError:
        return False
    return True


# -- the catalog --------------------------------------------------------------------------------


class Catalog(abc.ABC):
    """The physical collections of a store, the pointers of its logical indexes, and their
    migration records. Every method raises StoreError when the store cannot answer."""

    def resolve(self, logical: str) -> str | None:
        """The physical collection that serves ``logical`` now."""
        target = self.pointer(logical)
        if target is not None:
            return target
        return logical if self.exists(logical) else None

    @abc.abstractmethod
    def pointer(self, logical: str) -> str | None:
        """Where the pointer of ``logical`` goes (None: no pointer, the name itself serves)."""

    @abc.abstractmethod
    def exists(self, physical: str) -> bool: ...

    @abc.abstractmethod
    def collections(self, logical: str) -> list[str]:
        """The physical collections of ``logical`` (the first one and every re-index's)."""

    @abc.abstractmethod
    def stored_metadata(self, physical: str) -> Mapping[str, Any] | None:
        """CollectionSpec.metadata() as stored with ``physical``; None if it does not exist."""

    @abc.abstractmethod
    def switch(self, logical: str, physical: str) -> None:
        """Point ``logical`` at ``physical``, atomically."""

    @abc.abstractmethod
    def drop(self, logical: str, physical: str) -> None:
        """Delete ``physical`` (never the one ``logical`` resolves to)."""

    @abc.abstractmethod
    def read_record(self, logical: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def update_record(self, logical: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``patch``'s top-level keys into the record (None deletes a key); returns
        the record as it is now."""

    def close(self) -> None:
        """Release connections."""

    def _refuse_serving(self, logical: str, physical: str) -> None:
        if self.resolve(logical) == physical:
            raise CollectionMismatchError(
                f"collection {physical!r} serves index {logical!r}: it cannot be dropped; "
                "swap to another collection first")


# -- the embedded store's catalog: files beside the collections -------------------------------


def write_json_atomically(path: Path, body: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class FileCatalog(Catalog):
    """``<root>/aliases.json`` (pointers), ``<root>/reindex-<logical>.json`` (records) and
    one directory per collection (shared/store/edge.py). Readable by any process, also
    while ``imgsearch up`` holds the collections; changes are serialised by a lock file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.aliases_file = self.root / "aliases.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".catalog.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _aliases(self) -> dict[str, str]:
        return dict(read_json(self.aliases_file) or {})

    def pointer(self, logical: str) -> str | None:
        return self._aliases().get(logical)

    def exists(self, physical: str) -> bool:
        return (self.root / physical / "collection.json").is_file()

    def collections(self, logical: str) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if is_physical_of(logical, p.name) and self.exists(p.name))

    def stored_metadata(self, physical: str) -> Mapping[str, Any] | None:
        body = read_json(self.root / physical / "collection.json")
        return None if body is None else (body.get("metadata") or {})

    def switch(self, logical: str, physical: str) -> None:
        if not self.exists(physical):
            raise CollectionMismatchError(f"collection {physical!r} does not exist")
        with self._locked():
            aliases = self._aliases()
            if physical == logical:
                aliases.pop(logical, None)  # the first collection serves under its own name
            else:
                aliases[logical] = physical
            write_json_atomically(self.aliases_file, aliases)

    def drop(self, logical: str, physical: str) -> None:
        with self._locked():
            self._refuse_serving(logical, physical)
            directory = self.root / physical
            if not directory.exists():
                return
            # A rename first: the collection disappears at once and whole, even if the
            # deletion of its files is interrupted.
            trash = self.root / f".dropped-{physical}-{int(time.time())}"
            directory.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _record_file(self, logical: str) -> Path:
        return self.root / f"reindex-{logical}.json"

    def read_record(self, logical: str) -> dict[str, Any] | None:
        body = read_json(self._record_file(logical))
        return dict(body) if body else None

    def update_record(self, logical: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        with self._locked():
            record = self.read_record(logical) or {}
            for key, value in patch.items():
                if value is None:
                    record.pop(key, None)
                else:
                    record[key] = value
            write_json_atomically(self._record_file(logical), record)
            return record
