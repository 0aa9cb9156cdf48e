"""Kept images: a bounded-size copy of what the index cannot fetch again.

An inline upload (``image_b64``, POST /images) carries its bytes in the event, and the
store keeps only its vector and payload: a re-index to another model (shared/reindex/)
could not embed it again. So ingest keeps a *derivative* of each inline upload here,
keyed by its image id:

* a JPEG whose longest side is at most BLOB_MAX_SIDE and needs no EXIF turn is kept
  byte for byte (re-embedding it gives the very same vector);
* anything else is decoded, turned upright (EXIF), shrunk to BLOB_MAX_SIDE on its longest
  side and kept as JPEG at BLOB_JPEG_QUALITY.

It is written before the point (in the pipeline's prepare stage, shared/pipeline/), so a
point the store has confirmed always has its blob; it is deleted after the image's
``image.deleted`` is stored. Where: ``<QDRANT_PATH>/imgsearch-blobs/`` beside the embedded
store, or any directory or ``s3://bucket/prefix`` (the ``s3`` extra) set as BLOB_STORE.

Keys are ``sha256(image_id)``, sharded by their first two bytes (``ab/cd/abcd....jpg``),
so any image id (slashes, unicode) maps to a safe, evenly spread name. Other features
(thumbnails, source verification) can keep every image here with the same keys.
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from shared.config import Settings
from shared.errors import ConfigError, InternalError, StoreError
from shared.events import ImageUploaded
from shared.pipeline.stages import IngestPipeline, Prepared
from shared.store.base import PointRecord, StoredImage

log = logging.getLogger(__name__)

DIRECTORY = "imgsearch-blobs"  # under QDRANT_PATH, beside the embedded collections


def blob_key(image_id: str) -> str:
    digest = hashlib.sha256(image_id.encode("utf-8")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.jpg"


def derivative(data: bytes, *, max_side: int = 1024, quality: int = 90) -> bytes:
    """What is kept of an image's bytes (see the module docstring). Raises on bytes that
    do not decode: the pipeline refuses those before this runs."""
    with Image.open(io.BytesIO(data)) as probe:
        size, fmt = probe.size, probe.format
        orientation = probe.getexif().get(0x0112, 1)
    if fmt == "JPEG" and max(size) <= max_side and orientation in (None, 1):
        return data
    with Image.open(io.BytesIO(data)) as image:
        if fmt == "JPEG":
            # Decode at the smallest DCT scale that still covers max_side.
            image.draft("RGB", (max_side, max_side))
        image.load()
        upright = ImageOps.exif_transpose(image) or image
        rgb = upright.convert("RGB")
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality, optimize=True)
        return out.getvalue()


class BlobStore(abc.ABC):
    """Bytes by image id. Every method raises StoreError when the backend fails."""

    location: str

    @abc.abstractmethod
    def put(self, image_id: str, data: bytes) -> None:
        """Durable once it returns."""

    @abc.abstractmethod
    def get(self, image_id: str) -> bytes | None: ...

    @abc.abstractmethod
    def delete(self, image_id: str) -> None:
        """Idempotent: deleting what is not there is fine."""

    @abc.abstractmethod
    def sizes(self) -> Iterator[int]:
        """The size in bytes of every kept blob (for `imgsearch reindex status`)."""

    def close(self) -> None:
        """Release connections."""


class DirectoryBlobs(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def _path(self, image_id: str) -> Path:
        return self.root / blob_key(image_id)

    def put(self, image_id: str, data: bytes) -> None:
        path = self._path(image_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}.tmp")
            with tmp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        except OSError as exc:
            raise StoreError(f"cannot keep the image {image_id!r} in {self.root}: {exc}") from exc

    def get(self, image_id: str) -> bytes | None:
        try:
            return self._path(image_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the kept image {image_id!r}: {exc}") from exc

    def delete(self, image_id: str) -> None:
        try:
            self._path(image_id).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete the kept image {image_id!r}: {exc}") from exc

    def sizes(self) -> Iterator[int]:
        if self.root.is_dir():
            for path in self.root.glob("*/*/*.jpg"):
                yield path.stat().st_size


class S3Blobs(BlobStore):
    """``s3://bucket/prefix``, through boto3 (the ``s3`` extra) with the usual AWS
    credentials and endpoint settings."""

    def __init__(self, uri: str) -> None:
        parts = urllib.parse.urlsplit(uri)
        if not parts.netloc:
            raise ConfigError(f"BLOB_STORE={uri!r}: an S3 location is s3://bucket[/prefix]")
        try:
            import boto3  # optional extra
        except ImportError as exc:
            raise ConfigError("BLOB_STORE=s3://... needs the s3 extra: "
                              "pip install 'imgsearch[s3]'") from exc
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.location = uri
        self._s3: Any = boto3.client("s3")

    def _key(self, image_id: str) -> str:
        return f"{self.prefix}/{blob_key(image_id)}" if self.prefix else blob_key(image_id)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StoreError(f"S3 {what} in {self.location} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} in {self.location} failed: {exc}") from exc

    def put(self, image_id: str, data: bytes) -> None:
        self._call("put", self._s3.put_object, Key=self._key(image_id), Body=data,
                   ContentType="image/jpeg")

    def get(self, image_id: str) -> bytes | None:
        found = self._call("get", self._s3.get_object, Key=self._key(image_id))
        return None if found is None else bytes(found["Body"].read())

    def delete(self, image_id: str) -> None:
        self._call("delete", self._s3.delete_object, Key=self._key(image_id))

    def sizes(self) -> Iterator[int]:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                yield int(obj["Size"])


def open_blobs(settings: Settings) -> BlobStore | None:
    """The configured blob store; None when keeping is off (BLOB_KEEP=none, BLOB_STORE=off,
    or a Qdrant server without BLOB_STORE: its workers share no directory)."""
    where = settings.blob_store
    if settings.blob_keep == "none" or where == "off":
        return None
    if where is None:
        if settings.qdrant_url:
            return None
        return DirectoryBlobs(settings.embedded_store_path / DIRECTORY)
    if where.startswith("s3://"):
        return S3Blobs(where)
    return DirectoryBlobs(Path(where).expanduser().absolute())


class BlobKeepingPipeline(IngestPipeline):
    """The ingest pipeline, keeping a derivative of each inline upload (BLOB_KEEP=inline).

    The derivative is made in the prepare stage (the parallel pool) and written in the
    write stage just before the point, so a store outage of either kind is waited out
    like any store outage (the scheduler retries the write) and never loses an event. The
    blob of a deleted image goes once its delete is stored.
    """

    # Derivatives made but not written yet (a cancelled event never reaches write).
    MAX_PENDING = 4096

    def __init__(self, *args: Any, blobs: BlobStore, max_side: int = 1024, quality: int = 90,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blobs = blobs
        self.max_side = max_side
        self.quality = quality
        self._pending: dict[str, bytes] = {}
        self._pending_lock = threading.Lock()
        # While an index migrates, one pipeline per process keeps blobs (the serving
        # collection's): ingest_worker/service.py turns it off on the others.
        self.keeping = True

    def prepare(self, event: ImageUploaded, existing: StoredImage | None) -> Prepared:
        prepared = super().prepare(event, existing)  # the bytes decode: safe to keep
        if event.image_bytes is None or not self.keeping:
            return prepared
        try:
            kept = derivative(event.image_bytes, max_side=self.max_side, quality=self.quality)
        except Exception as exc:
            raise InternalError.wrap(exc, "decode") from exc
        if prepared.unchanged:
            # Stored already: its blob is there unless keeping started after it was stored.
            try:
                self.blobs.put(event.image_id, kept)
            except StoreError as exc:
                log.warning("could not keep the image %r: %s", event.image_id, exc)
            return prepared
        with self._pending_lock:
            self._pending[event.image_id] = kept
            while len(self._pending) > self.MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
        return prepared

    def write(self, records: Sequence[PointRecord], deletes: Sequence[str]) -> None:
        images = {r.image_id for r in records if r.crop_index == 0}
        with self._pending_lock:
            kept = {i: self._pending[i] for i in images if i in self._pending}
        for image_id, data in kept.items():
            self.blobs.put(image_id, data)  # StoreError: the scheduler retries the batch
        super().write(records, deletes)
        with self._pending_lock:
            for image_id, data in kept.items():
                if self._pending.get(image_id) is data:
                    del self._pending[image_id]
        for image_id in deletes if self.keeping else ():
            try:
                self.blobs.delete(image_id)
            except StoreError as exc:  # the point is gone; a stray blob only costs space
                log.warning("could not delete the kept image of %r: %s", image_id, exc)
