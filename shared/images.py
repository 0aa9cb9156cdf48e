"""Decode untrusted image bytes into an RGB Pillow image, safely, and no larger than needed.

The pixel limit is checked from the header, before any pixel is decoded, so a
decompression bomb costs a few bytes of parsing and nothing more.

**Scaled JPEG decode.** The model sees a 224 px crop; a phone photo is 4032 x 3024. A JPEG
can be decoded at 1/2, 1/4 or 1/8 of its size inside the inverse DCT (libjpeg's
scaling, Pillow's ``draft``), which skips most of the decode's work: 12 MP photos decode
in about a third to an eighth of the time (docs/engines.md). ``decode`` takes what the
next step needs (a ``DecodeNeed``: the model's resize, the detector's working size) and
picks the smallest power-of-two scale that still covers it, so the next step only ever
shrinks. The caller gets the original's size beside the pixels: boxes and payloads stay in
the original's coordinates. EXIF orientation is applied after the scaled decode (the
scale is the same on both axes, so it does not matter which way the photo is turned).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ImageTooLargeError, UndecodableImageError

# We enforce our own limit from the header; Pillow's global one would only warn below 2x.
Image.MAX_IMAGE_PIXELS = None

Size = tuple[int, int]  # (width, height), as Pillow reports it
# libjpeg's DCT scales that cost less than a full decode (3/8, 5/8, ... exist in
# libjpeg-turbo but decode slower than 1/1 without SIMD kernels: measured, docs/engines.md).
JPEG_SCALES = (8, 4, 2)
# EXIF orientations that swap width and height (90 or 270 degree turns).
_TURNED = {5, 6, 7, 8}


@dataclass(frozen=True)
class DecodeNeed:
    """The least a decoded image must keep for the step after it: its short side at
    least ``short_side`` pixels and its long side at least ``long_side`` (0: no need)."""

    short_side: int = 0
    long_side: int = 0

    def __or__(self, other: DecodeNeed) -> DecodeNeed:
        """What covers both needs."""
        return DecodeNeed(max(self.short_side, other.short_side),
                          max(self.long_side, other.long_side))

    def scale_for(self, size: Size) -> int:
        """The largest JPEG scale denominator (8, 4, 2 or 1) whose decode of an image of
        ``size`` still covers this need."""
        short, long = min(size), max(size)
        if self.short_side <= 0 and self.long_side <= 0:
            return 1  # nobody said: decode it all
        for denominator in JPEG_SCALES:
            if -(-short // denominator) >= self.short_side and \
                    -(-long // denominator) >= self.long_side:
                return denominator
        return 1


@dataclass(frozen=True)
class Decoded:
    """An RGB image with EXIF orientation applied, and the size the original has in that
    orientation (``image.size`` is smaller when the JPEG was decoded at a reduced scale)."""

    image: Image.Image
    size: Size

    @property
    def scaled(self) -> bool:
        return self.image.size != self.size


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, *, max_pixels: int, need: DecodeNeed | None = None) -> Decoded:
    """Decode ``data``; a JPEG at the smallest DCT scale that still covers ``need``
    (None or an empty need: full size). Raises UndecodableImageError / ImageTooLargeError."""
    if not data:
        raise UndecodableImageError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise UndecodableImageError(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height:,} pixels; "
                    f"IMAGE_MAX_PIXELS is {max_pixels:,}"
                )
            if need is not None and image.format == "JPEG":
                denominator = need.scale_for((width, height))
                if denominator > 1:
                    # Pillow picks the largest scale s with size // request >= s.
                    image.draft("RGB", (width // denominator, height // denominator))
            image.load()
            turned = image.getexif().get(0x0112) in _TURNED
            image = ImageOps.exif_transpose(image) or image
            return Decoded(_to_rgb(image), (height, width) if turned else (width, height))
    except (ImageTooLargeError, UndecodableImageError):
        raise
    except UnidentifiedImageError as exc:
        raise UndecodableImageError("not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    # Decoders of untrusted bytes fail in many ways (truncated data, bad tables, bad EXIF);
    # each one means the same thing to us: this image cannot be used.
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError,
            ZeroDivisionError, MemoryError, Image.DecompressionBombWarning) as exc:
        raise UndecodableImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def decode_image(
    data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Return an RGB image with EXIF orientation applied, at full size unless
    ``draft_size`` lets a JPEG decode at a reduced scale that is still at least that
    size on both axes (thumbnails). ``decode`` is the same with the original's size."""
    need = None
    if draft_size is not None:
        need = DecodeNeed(short_side=min(draft_size), long_side=max(draft_size))
    return decode(data, max_pixels=max_pixels, need=need).image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white, as a viewer would show them, not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
