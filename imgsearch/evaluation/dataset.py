"""Evaluation datasets: a folder with one sub-folder per label, or a CSV ``path,label[,split]``.

* A CSV's paths are relative to the CSV's folder (or absolute). Its ``split`` column, when
  present, says which images are indexed (``train``/``gallery``) and which ones query
  (``test``/``query``/``val``); without one, every image is both.
* A folder holding ``labels.csv`` is read through that CSV; any other folder gives each
  image the name of the top-level sub-folder it sits in as its label.
* A CSV without a ``label`` column still serves copy detection, which needs no labels.

Image ids are ``<dataset name>/<relative path>``, as ``imgsearch publish`` names them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from imgsearch.files import IMAGE_SUFFIXES

GALLERY_SPLITS = frozenset({"train", "gallery", "index"})
QUERY_SPLITS = frozenset({"test", "query", "val", "valid", "validation"})


class DatasetError(ValueError):
    """The dataset cannot be read as described; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    image_id: str
    path: Path
    label: str | None
    split: str | None  # "gallery", "query" or None (both)


@dataclass(frozen=True)
class Dataset:
    name: str
    source: Path
    items: tuple[Item, ...]

    @property
    def has_labels(self) -> bool:
        return all(item.label is not None for item in self.items)

    @property
    def has_split(self) -> bool:
        return any(item.split is not None for item in self.items)

    def gallery(self, use_split: bool = True) -> list[Item]:
        if not (use_split and self.has_split):
            return list(self.items)
        return [i for i in self.items if i.split == "gallery"]

    def queries(self, use_split: bool = True) -> list[Item]:
        if not (use_split and self.has_split):
            return list(self.items)
        return [i for i in self.items if i.split == "query"]

    def subset(self, limit: int, seed: int) -> Dataset:
        """A seeded random ``limit`` items, in their original order."""
        if limit >= len(self.items):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.items), limit, replace=False))
        return replace(self, items=tuple(self.items[i] for i in keep))


def _split(value: str | None, where: str) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if value in GALLERY_SPLITS:
        return "gallery"
    if value in QUERY_SPLITS:
        return "query"
    raise DatasetError(
        f"{where}: split {value!r} is neither a gallery split ({', '.join(sorted(GALLERY_SPLITS))})"
        f" nor a query split ({', '.join(sorted(QUERY_SPLITS))})"
    )


def _from_csv(csv_path: Path, name: str, label_column: str) -> Dataset:
    base = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise DatasetError(f"{csv_path} has no 'path' column (columns: {', '.join(columns)})")
        has_label = label_column in columns
        items, missing = [], []
        for line, row in enumerate(reader, start=2):
            rel = (row["path"] or "").strip()
            if not rel:
                raise DatasetError(f"{csv_path}:{line}: empty path")
            path = Path(rel) if Path(rel).is_absolute() else base / rel
            if not path.is_file():
                missing.append(str(path))
                continue
            label = (row[label_column] or "").strip() if has_label else None
            if has_label and not label:
                raise DatasetError(f"{csv_path}:{line}: empty {label_column!r}")
            image_id = f"{name}/{Path(rel).as_posix()}" if not Path(rel).is_absolute() else rel
            items.append(Item(image_id, path.resolve(), label,
                              _split(row.get("split"), f"{csv_path}:{line}")))
    if missing:
        raise DatasetError(
            f"{csv_path} lists {len(missing)} files that do not exist (first: {missing[0]})"
        )
    return Dataset(name, csv_path, tuple(items))


def _from_folders(root: Path, name: str) -> Dataset:
    items, loose = [], []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            loose.append(rel.as_posix())
            continue
        items.append(Item(f"{name}/{rel.as_posix()}", path.resolve(), rel.parts[0], None))
    if loose:
        raise DatasetError(
            f"{root} has images outside label folders (first: {loose[0]}): put each image in a "
            "sub-folder named by its label, or describe them in a CSV with path,label[,split]"
        )
    return Dataset(name, root, tuple(items))


def load_dataset(path: Path, *, label_column: str = "label") -> Dataset:
    """Read a dataset; raise DatasetError naming what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"no such dataset: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: a dataset is a folder or a .csv file")
        dataset = _from_csv(path, path.parent.name, label_column)
    elif (path / "labels.csv").is_file():
        dataset = _from_csv(path / "labels.csv", path.name, label_column)
    else:
        dataset = _from_folders(path, path.name)
    if not dataset.items:
        raise DatasetError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    seen: set[str] = set()
    for item in dataset.items:
        if item.image_id in seen:
            raise DatasetError(f"{path}: image {item.image_id} is listed twice")
        seen.add(item.image_id)
    if dataset.has_split and not (dataset.gallery() and dataset.queries()):
        raise DatasetError(f"{path}: the split column must name both gallery and query images")
    return dataset


def labels_of(items: Sequence[Item]) -> list[str]:
    return [item.label or "" for item in items]
