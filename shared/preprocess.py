"""A model's preprocessing, from its own timm data config, at a cost set by the model's
input size rather than by the image's shape.

timm's eval transform resizes the short side to ``input / crop_pct`` and then keeps the
centre square. For a 1 x 20,000 strip that resize makes a 256 x 5,120,000 image (1.3 G
pixels, gigabytes, tens of seconds) only to keep 224 x 224 of it. So for an image whose
long side is more than ``MAX_CHEAP_ASPECT`` times its short side, the same output is
computed as one resample of just the source box that the centre crop keeps (Pillow's
``resize(box=...)``, the same filter and scale). The result differs from timm's only by
uint8 rounding (at most 2 levels of 255 here); ordinary photos take timm's path unchanged.

The rule, for every entrance (ingest, ``/search``, ``POST /images``): any aspect ratio
is accepted, and the resize costs at most ``MAX_CHEAP_ASPECT`` x the model's input.

The same geometry says how small a JPEG may be decoded (``Preprocess.decode_need``):
``DECODE_MARGIN`` times the resize's short side (359 px for a 256 px resize), so a 12 MP
phone photo decodes at 1/8 scale (504 x 378) and the resize still shrinks it by 1.4x or
more. Decoding to just the resize's size is not enough: the scaled IDCT aliases fine
detail that the resize's antialiasing would have removed (an ImageNet photo decoded to
1.17x the resize fell to cosine 0.96 against its full decode); with margins of 1.4 to
1.5 the lowest cosine over the ImageNet sample is 0.9975 (docs/engines.md).

``ModelInput`` is what every engine (shared/models/) is fed: the gallery's view and the
full-frame query view as float32 arrays (C, H, W), from ``Preprocess.array``. It
resamples only the centre box for every image, not just for strips: the same filter,
scale and pixel centres as timm's resize-then-crop, without computing the margin the crop
throws away (1.2 ms instead of 2.2 ms for an ImageNet photo); the two differ in a few
pixels by uint8 rounding (3e-5 levels on average). The float conversion and
normalisation run in numpy with the same float32 operations as timm's tensors, so decode
threads never enter torch's thread pool, which measured 10-40x slower than numpy there
when the engine's threads were busy (docs/engines.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from shared.images import DecodeNeed

MAX_CHEAP_ASPECT = 3.0
# A scaled JPEG decode keeps at least this many times the first resize's size (see above).
DECODE_MARGIN = 1.4

_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


class Preprocess:
    """Image to the model's input tensor (C, H, W) on the CPU."""

    def __init__(self, data_config: dict[str, Any], **overrides: Any) -> None:
        from timm.data import create_transform

        self.config = {**data_config, **overrides}
        self.transform: Callable[[Image.Image], torch.Tensor] = create_transform(
            **self.config, is_training=False)
        self._boxed = self._boxed_view(self.transform)
        self._pixels, self._normalise = self._split(self.transform)
        self.decode_need = self._decode_need(self.transform)

    @staticmethod
    def _split(transform: Any) -> tuple[T.Compose | None, tuple[np.ndarray, np.ndarray] | None]:
        """(the PIL steps, (mean, std)) when the transform is PIL steps, then ToTensor and
        Normalize, as timm's eval transforms are; (None, None) otherwise."""
        steps = list(getattr(transform, "transforms", []))
        names = [type(step).__name__ for step in steps]
        if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or \
                not isinstance(steps[-1], T.Normalize):
            return None, None
        normalize = steps[-1]
        mean = np.asarray(normalize.mean, dtype=np.float32).reshape(1, 1, -1)
        std = np.asarray(normalize.std, dtype=np.float32).reshape(1, 1, -1)
        return T.Compose(steps[:-2]), (mean, std)

    @staticmethod
    def _decode_need(transform: Any) -> DecodeNeed:
        """The smallest decode that the first resize still shrinks by DECODE_MARGIN: its
        short side (for a resize to a fixed height and width, the larger of the two)."""
        for step in getattr(transform, "transforms", []):
            size = getattr(step, "size", None)
            if "Resize" not in type(step).__name__ or size is None:
                continue
            sizes = [size] if isinstance(size, int) else list(size)
            return DecodeNeed(short_side=math.ceil(max(sizes) * DECODE_MARGIN))
        return DecodeNeed()  # no resize found: decode at full size

    @staticmethod
    def _boxed_view(transform: Any) -> tuple[int, tuple[int, int], Image.Resampling, T.Compose] | None:
        """(short side, crop size, filter, the rest) when the transform starts with a
        short-side Resize and a CenterCrop; None for other crop modes (squash, border),
        whose resize already has a fixed output size."""
        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 3 or not isinstance(steps[0], T.Resize) or not isinstance(
                steps[1], T.CenterCrop):
            return None
        resize, crop = steps[0], steps[1]
        size = resize.size
        if isinstance(size, (list, tuple)):
            if len(size) != 1:
                return None
            size = size[0]
        if resize.max_size is not None or resize.interpolation not in _PIL_FILTERS:
            return None
        height, width = crop.size
        if int(size) < max(height, width):
            return None  # crop_pct > 1 pads around the image: leave that to timm
        return int(size), (int(width), int(height)), _PIL_FILTERS[resize.interpolation], \
            T.Compose(steps[2:])

    def array(self, image: Image.Image) -> np.ndarray:
        """The model's input for ``image`` as a float32 array (C, H, W), computed without
        torch: ``self(image)``'s values, up to uint8 rounding of the boxed resample."""
        if self._pixels is None or self._normalise is None:
            return self(image).numpy()
        pixels = self._pixels(image) if self._boxed is None else self._boxed_pixels(image)
        mean, std = self._normalise
        # ToTensor's x / 255, then Normalize's (x - mean) / std, in float32 as torch does.
        values = (np.asarray(pixels, dtype=np.float32) / np.float32(255) - mean) / std
        return np.ascontiguousarray(values.transpose(2, 0, 1))

    def _boxed_pixels(self, image: Image.Image) -> Image.Image:
        assert self._boxed is not None
        size, (crop_w, crop_h), resample, _ = self._boxed
        width, height = image.size
        # torchvision's Resize(int) and CenterCrop arithmetic, then one boxed resample.
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        top = int(round((new_h - crop_h) / 2.0))
        left = int(round((new_w - crop_w) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), resample, box=box)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        if self._boxed is None or max(width, height) <= MAX_CHEAP_ASPECT * min(width, height):
            return self.transform(image)
        return self._boxed[3](self._boxed_pixels(image))


class ModelInput:
    """A model's preprocessing, shared by every engine: the gallery's view, the full-frame
    view for queries (QUERY_FULL_FRAME_VIEW), and how small a decode may be."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        self.data_config = dict(data_config)
        self.input_size: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            int(v) for v in data_config["input_size"])
        self.default = Preprocess(data_config)
        # The same resize without the centre crop's margin. The gallery is embedded
        # through ``default``, which keeps the centre crop_pct (87.5% for most models) of
        # each photo; a cropped copy of a photo shows less than that, magnified, and the
        # full-frame view of it is closer in scale to what the gallery saw.
        self.full_frame = Preprocess(data_config, crop_pct=1.0)
        self.decode_need = self.default.decode_need | self.full_frame.decode_need

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.default.array(image)

    def views(self, image: Image.Image, *, full_frame: bool) -> list[np.ndarray]:
        """The gallery's view, and the full frame if asked."""
        views = [self.default.array(image)]
        if full_frame:
            views.append(self.full_frame.array(image))
        return views
