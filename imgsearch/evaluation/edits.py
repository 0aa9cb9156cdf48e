"""The edited copies that "find the source" queries with: fixed, documented, seeded.

Each edit is a pure function of the original image and a random generator seeded from
``(seed, image_id, edit name)``, so a rerun, or a run over another subset in another order,
makes the same copy of the same image. Only the text overlay draws from the generator
(its position); the others are fully fixed.

| name        | what it does                                                              |
|-------------|---------------------------------------------------------------------------|
| half        | resize to half width and height (bicubic)                                 |
| crop80      | keep the centre 80% of width and height (64% of the area)                 |
| crop60      | keep the centre 60% of width and height (36% of the area)                 |
| jpeg30      | re-encode as JPEG at quality 30                                           |
| brightness  | brightness x1.3 (PIL ImageEnhance.Brightness)                             |
| greyscale   | convert to greyscale (kept as 3 equal RGB channels)                       |
| text        | white text with a black outline across the image, at a seeded position:  |
|             | "© imgsearch 2026", font height 1/8 of the image height                   |
| hflip       | mirror left-right                                                         |
| rotate10    | rotate 10 degrees anticlockwise, same canvas, black corners (bicubic)     |
| combined    | half, then crop80, then jpeg30                                            |
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

EditFn = Callable[[Image.Image, np.random.Generator], Image.Image]

OVERLAY_TEXT = "© imgsearch 2026"


def _half(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    return image.resize((max(1, round(width / 2)), max(1, round(height / 2))),
                        Image.Resampling.BICUBIC)


def _centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    width, height = image.size
    keep_w, keep_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    return image.crop((left, top, left + keep_w, top + keep_h))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = image.copy()
    width, height = out.size
    font = ImageFont.load_default(size=max(8, height // 8))
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), OVERLAY_TEXT, font=font, stroke_width=2)
    text_w, text_h = right - left, bottom - top
    x = int(rng.integers(0, max(1, width - text_w + 1)))
    y = int(rng.integers(0, max(1, height - text_h + 1)))
    draw.text((x - left, y - top), OVERLAY_TEXT, font=font, fill=(255, 255, 255),
              stroke_width=2, stroke_fill=(0, 0, 0))
    return out


def _combined(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return _jpeg(_centre_crop(_half(image, rng), 0.8), 30)


@dataclass(frozen=True)
class Edit:
    name: str
    description: str
    detail: str
    apply: EditFn


EDITS: dict[str, Edit] = {
    e.name: e
    for e in (
        Edit("half", "half size", "resize to half width and height, bicubic", _half),
        Edit("crop80", "crop 80%", "keep the centre 80% of width and height (64% of the area)",
             lambda im, rng: _centre_crop(im, 0.8)),
        Edit("crop60", "crop 60%", "keep the centre 60% of width and height (36% of the area)",
             lambda im, rng: _centre_crop(im, 0.6)),
        Edit("jpeg30", "JPEG q30", "re-encode as JPEG at quality 30",
             lambda im, rng: _jpeg(im, 30)),
        Edit("brightness", "brightness", "brightness x1.3 (PIL ImageEnhance.Brightness)",
             lambda im, rng: ImageEnhance.Brightness(im).enhance(1.3)),
        Edit("greyscale", "greyscale", "luminance only, as 3 equal RGB channels",
             lambda im, rng: ImageOps.grayscale(im).convert("RGB")),
        Edit("text", "text overlay",
             f"'{OVERLAY_TEXT}' in white, black outline, 1/8 of the height, seeded position",
             _text),
        Edit("hflip", "horizontal flip", "mirror left-right", lambda im, rng: ImageOps.mirror(im)),
        Edit("rotate10", "rotate 10°", "10 degrees anticlockwise, same canvas, black corners",
             lambda im, rng: im.rotate(10, resample=Image.Resampling.BICUBIC, expand=False)),
        Edit("combined", "half + crop 80% + JPEG q30", "half, then crop80, then jpeg30",
             _combined),
    )
}


def edit_rng(seed: int, image_id: str, edit: str) -> np.random.Generator:
    """A generator that depends only on the seed, the image and the edit."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}\x00{edit}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def resolve_edits(names: Sequence[str] | None) -> list[Edit]:
    """The named edits (all of them for None), refusing unknown names."""
    if not names:
        return list(EDITS.values())
    unknown = [n for n in names if n not in EDITS]
    if unknown:
        raise ValueError(f"unknown edit(s) {', '.join(unknown)}; choose from {', '.join(EDITS)}")
    return [EDITS[n] for n in names]


def make_copy(image: Image.Image, edit: Edit, *, seed: int, image_id: str) -> Image.Image:
    """The edited copy of ``image`` (RGB), the same on every run."""
    return edit.apply(image.convert("RGB"), edit_rng(seed, image_id, edit.name))
