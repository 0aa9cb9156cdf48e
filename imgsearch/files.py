"""Finding image files under the paths a user names, and naming them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageFile:
    path: Path  # absolute, symlinks resolved
    image_id: str  # <argument's folder name>/<path relative to it>
    label: str  # the parent folder's name


def find_images(paths: Sequence[Path]) -> Iterator[ImageFile]:
    """Yield image files under each path (recursively, sorted), with stable ids.

    Raises FileNotFoundError for a path that does not exist.
    """
    for arg in paths:
        arg = Path(arg).expanduser()
        if not arg.exists():
            raise FileNotFoundError(f"no such file or directory: {arg}")
        base = arg.resolve()
        if base.is_file():
            yield ImageFile(base, base.name, base.parent.name)
            continue
        for path in sorted(base.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                rel = path.relative_to(base).as_posix()
                yield ImageFile(path.resolve(), f"{base.name}/{rel}", path.parent.name)
