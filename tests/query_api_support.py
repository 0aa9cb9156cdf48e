"""Helpers for the query API tests: a gallery of real bird photos indexed through the real
ingest pipeline, and API servers on loopback ports."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.components import Components
from shared.config import Settings, load_settings
from shared.events import ImageUploaded
from shared.pipeline import WorkItem
from tests.conftest import MOBILENET, free_port


@dataclass(frozen=True)
class Bird:
    path: Path
    image_id: str
    label: str
    split: str

    def read(self) -> bytes:
        return self.path.read_bytes()


def bird_rows(birds: Path) -> list[Bird]:
    with (birds / "labels.csv").open() as handle:
        return [
            Bird(birds / row["path"], row["path"], row["label"], row["split"])
            for row in csv.DictReader(handle)
        ]


def pick(rows: Sequence[Bird], *, train: int, test: int, skip_test: int = 0) -> list[Bird]:
    """Per species: the first ``train`` train photos and ``test`` test photos
    (after skipping ``skip_test`` test photos), in labels.csv order."""
    chosen: list[Bird] = []
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        n = seen.get((row.label, row.split), 0)
        seen[(row.label, row.split)] = n + 1
        if row.split == "train" and n < train:
            chosen.append(row)
        elif row.split == "test" and skip_test <= n < skip_test + test:
            chosen.append(row)
    return chosen


def api_settings(store: Path, weights: Path, roots: Sequence[Path], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "qdrant_path": store,
        "model_name": MOBILENET,
        "model_weights": weights,
        "device": "cpu",
        "image_file_roots": list(roots),
        "worker_metrics_port": 0,
        "api_host": "127.0.0.1",
        "api_port": free_port(),
    }
    values.update(overrides)
    return load_settings(**values)


def upload_item(bird: Bird, n: int, *, uri: str | None = None, inline: bool = False) -> WorkItem:
    event = ImageUploaded(
        event_id=f"test-{n}",
        source="tests",
        image_id=bird.image_id,
        uri=None if inline else (uri or bird.path.as_uri()),
        image_bytes=bird.read() if inline else None,
        metadata={"label": bird.label, "split": bird.split},
    )
    return WorkItem(bird.image_id, event)


def index(components: Components, items: Sequence[WorkItem]) -> None:
    pipeline = components.pipeline()
    try:
        report = pipeline.process(list(items))
    finally:
        pipeline.close()
    failed = [(r.item.key, str(r.error)) for r in report.failures]
    assert not failed, f"indexing failed for {failed[:5]}"
    assert report.count("stored") == len(items), report.summary()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
