"""Decoding untrusted bytes: orientation, colour modes, bombs and garbage."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.errors import ImageTooLargeError, UndecodableImageError
from shared.images import DecodeNeed, decode, decode_image
from tests.bad_inputs import png_bomb


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    decoded = decode_image(encode(image, "JPEG", exif=exif), max_pixels=10_000)
    assert decoded.size == (20, 40)


@pytest.mark.parametrize(("orientation", "shown"), [(1, (1600, 800)), (3, (1600, 800)),
                                                     (6, (800, 1600)), (8, (800, 1600))])
def test_a_scaled_decode_reports_the_originals_size_as_shown(orientation: int,
                                                             shown: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.new("RGB", (1600, 800), (20, 90, 200)), "JPEG", exif=exif)
    decoded = decode(data, max_pixels=10**7, need=DecodeNeed(short_side=150))
    assert decoded.size == shown  # the original's size, turned as a viewer shows it
    assert decoded.image.size == (shown[0] // 4, shown[1] // 4)  # 1/4: 200 >= 150 > 100
    assert decoded.scaled


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    assert decode_image(encode(image, fmt), max_pixels=100).mode == "RGB"


def test_transparency_becomes_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(image, "PNG"), max_pixels=100).getpixel((0, 0)) == (255, 255, 255)


def test_pixel_bomb_is_refused_from_the_header() -> None:
    # A valid PNG header claiming 20000x20000 pixels, with almost no data behind it.
    bomb = png_bomb(20_000, 20_000)
    with pytest.raises(ImageTooLargeError, match="400,000,000 pixels"):
        decode_image(bomb, max_pixels=40_000_000)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"just some text, named .jpg",
        encode(Image.new("RGB", (64, 64)), "JPEG")[:200],  # truncated JPEG
        encode(Image.new("RGB", (64, 64)), "PNG")[:60],  # truncated PNG
        encode(Image.new("RGB", (64, 64)), "WEBP")[:30],  # truncated WebP
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,  # PNG magic, garbage after
        b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,  # JPEG magic, corrupt tables
    ],
)
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableImageError):
        decode_image(data, max_pixels=10_000_000)
