"""Phone-size JPEGs made from the shared photos, deterministically: what `imgsearch index
~/Pictures` meets, rather than 500 x 375 ImageNet crops.

Each one is a shared photo's centre 4:3 crop, upscaled to 4032 x 3024 (12 MP), with a
fixed pattern of fine luma grain (as a phone sensor leaves after its own denoising; it
brings the file to a phone's 3-5 MB: 3.2 MB on average), saved as JPEG quality 90 with
4:2:0 chroma and a camera's EXIF tags. ``orientation`` adds EXIF orientation (the pixels
then stored turned the other way, as a phone held upright stores them). Without grain
(``grain=0``, bench/ingest.py's ``phone-smooth``) the upscaled photos are smooth, 1.3 MB:
the kind of file ../shared/README.md's decode figures were measured on; the grain's
entropy coding is what makes real 3-5 MB photos cost more to decode at any scale.

    python bench/phone_photos.py OUT_DIR --n 200     # what bench/ingest.py --dataset phone makes
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (4032, 3024)
QUALITY = 90
GRAIN = 8  # +- levels of luma grain
# EXIF orientation -> the turn that stores an upright photo so a viewer shows it upright.
_STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
              8: Image.Transpose.ROTATE_270}


def sources(assets: Path) -> list[Path]:
    """The shared photos a phone set is made from: ImageNet sample first, then birds."""
    found = sorted((assets / "data" / "imagenet-sample").glob("*.JPEG"))
    found += sorted((assets / "data" / "birds").rglob("*.jpg"))
    return found


def upright(source: Path, seed: int, size: tuple[int, int] = SIZE,
            grain: int = GRAIN) -> Image.Image:
    """The photo as the camera saw it: 4:3, ``size``, with ``grain``."""
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if width * 3 > height * 4:
        new_w = height * 4 // 3
        image = image.crop(((width - new_w) // 2, 0, (width - new_w) // 2 + new_w, height))
    else:
        new_h = width * 3 // 4
        image = image.crop((0, (height - new_h) // 2, width, (height - new_h) // 2 + new_h))
    big = image.resize(size, Image.Resampling.BICUBIC)
    if not grain:
        return big
    noise = np.random.default_rng(seed).integers(-grain, grain + 1, size=(size[1], size[0], 1),
                                                dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(big).astype(np.int16) + noise, 0, 255)
                           .astype(np.uint8))


def phone_jpeg(source: Path, seed: int, *, orientation: int = 1,
               size: tuple[int, int] = SIZE, grain: int = GRAIN) -> bytes:
    """One phone-style JPEG of ``source``; ``orientation`` is its EXIF orientation (1, 3,
    6 or 8): the stored pixels are turned so that a viewer applying it shows the photo
    upright, as ``upright(source, seed)``."""
    image = upright(source, seed, size, grain)
    if orientation != 1:
        image = image.transpose(_STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x010F] = "imgsearch"  # Make
    exif[0x0110] = "bench phone"  # Model
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=QUALITY, subsampling="4:2:0", exif=exif)
    return out.getvalue()


def _write(job: tuple[Path, int, Path, int]) -> Path:
    source, n, target, grain = job
    if not target.exists():
        partial = target.with_suffix(".part")
        partial.write_bytes(phone_jpeg(source, n, grain=grain))
        partial.rename(target)
    return target


def make_phone_photos(assets: Path, folder: Path, n: int, *, grain: int = GRAIN,
                      workers: int | None = None) -> list[Path]:
    """``n`` phone JPEGs in ``folder`` (made once: existing files are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sources(assets)
    if not found:
        raise SystemExit(f"no photos under {assets}/data: set IMGSEARCH_ASSETS")
    jobs = [(found[i % len(found)], i, folder / f"phone-{i:04d}.jpg", grain) for i in range(n)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(_write, jobs))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--grain", type=int, default=GRAIN)
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    assets = Path(os.environ.get("IMGSEARCH_ASSETS", repo.parent / "shared"))
    paths = make_phone_photos(assets, args.out, args.n, grain=args.grain)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} photos, {total / len(paths) / 1e6:.1f} MB each on average, in "
          f"{args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
