"""Decode untrusted image bytes into an RGB Pillow image, safely.

The pixel limit is checked from the header, before any pixel is decoded, so a
decompression bomb costs a few bytes of parsing and nothing more.
"""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ImageTooLargeError, UndecodableImageError

# We enforce our own limit from the header; Pillow's global one would only warn below 2x.
Image.MAX_IMAGE_PIXELS = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(
    data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Return an RGB image with EXIF orientation applied.

    ``draft_size`` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) that is still at
    least that size: much less work for photos far larger than the model's input.
    """
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
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
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
